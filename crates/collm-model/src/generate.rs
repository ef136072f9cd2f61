//! Batched sampling with a KV cache: ragged prompts are left-padded, every row decodes in step.

use crate::model::{KvCache, Transformer};
use crate::ops::with_f32;
use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off).
    pub top_p: f64,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Take the most likely token at every step.
    pub greedy: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { max_new_tokens: 64, temperature: 1.0, top_p: 1.0, top_k: 0, greedy: false }
    }
}

/// One generated response.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated tokens, the stop token included when one ended the response.
    pub tokens: Vec<u32>,
    /// log π(token) under the model's raw distribution (before temperature/top-p), per token.
    pub logprobs: Vec<f32>,
    /// True when a stop token ended the response (false: max_new_tokens reached).
    pub stopped: bool,
}

/// A seeded random stream per row, so a row's sample does not depend on what it is batched with.
pub fn row_rngs(seed: u64, rows: usize) -> Vec<StdRng> {
    (0..rows).map(|r| StdRng::seed_from_u64(seed ^ (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))).collect()
}

/// Chooses a token from one row of logits; returns (token, raw log-prob).
pub fn sample_row(logits: &[f32], p: &SamplingParams, rng: &mut StdRng) -> (u32, f32) {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
    if p.greedy || p.temperature <= 0.0 {
        let (i, _) = logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
        return (i as u32, logits[i] - lse);
    }
    let t = p.temperature as f32;
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &v)| (i as u32, (v - max) / t)).collect();
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
        cand.truncate(p.top_k);
    }
    let mut probs: Vec<(u32, f32)> = cand.iter().map(|&(i, v)| (i, v.exp())).collect();
    let z: f32 = probs.iter().map(|x| x.1).sum();
    probs.iter_mut().for_each(|x| x.1 /= z);
    if p.top_p < 1.0 {
        probs = nucleus(probs, p.top_p as f32);
        let z: f32 = probs.iter().map(|x| x.1).sum();
        probs.iter_mut().for_each(|x| x.1 /= z);
    }
    let u: f32 = rng.random();
    let mut acc = 0f32;
    let mut choice = probs.last().map(|x| x.0).unwrap_or(0);
    for &(i, pr) in &probs {
        acc += pr;
        if u < acc {
            choice = i;
            break;
        }
    }
    (choice, logits[choice as usize] - lse)
}

/// The smallest set of most likely tokens whose probability reaches `top_p`, most likely first
/// (ties broken by id). Sorting the whole vocabulary per token is slow, so the candidates grow
/// from the top 64 until their mass reaches `top_p`; the result is the same as a full sort's.
fn nucleus(mut probs: Vec<(u32, f32)>, top_p: f32) -> Vec<(u32, f32)> {
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut take = 64usize;
    loop {
        if take < probs.len() {
            probs.select_nth_unstable_by(take - 1, order);
        }
        let end = take.min(probs.len());
        probs[..end].sort_by(order);
        let mut acc = 0f32;
        if let Some(n) = probs[..end].iter().position(|x| {
            acc += x.1;
            acc >= top_p
        }) {
            probs.truncate(n + 1);
            return probs;
        }
        if take >= probs.len() {
            return probs;
        }
        take *= 4;
    }
}

/// Runs `prompts` (any lengths, each non-empty) through the model, left-padded into one batch,
/// leaving their keys and values in a new cache. Returns the cache and the last position's logits
/// [batch, vocab].
pub fn prefill(model: &Transformer, prompts: &[Vec<u32>], pad: u32) -> Result<(KvCache, Tensor)> {
    if prompts.iter().any(|p| p.is_empty()) {
        bail!("every prompt needs at least one token");
    }
    let mut cache = KvCache::new(prompts.len(), model.cfg.num_layers);
    let logits = extend(model, &mut cache, prompts, pad)?;
    Ok((cache, logits))
}

/// Appends `chunks` (one per row, any lengths, each non-empty) to a cache, left-padding the
/// shorter ones, and returns the logits at each row's last token [batch, vocab].
pub fn extend(model: &Transformer, cache: &mut KvCache, chunks: &[Vec<u32>], pad: u32) -> Result<Tensor> {
    let t = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
    if t == 0 || chunks.iter().any(|c| c.is_empty()) {
        bail!("every row needs at least one new token");
    }
    let mut tokens = Vec::with_capacity(chunks.len());
    let mut valid = Vec::with_capacity(chunks.len());
    for c in chunks {
        let n = t - c.len();
        let mut row = vec![pad; n];
        row.extend_from_slice(c);
        let mut v = vec![false; n];
        v.extend(std::iter::repeat_n(true, c.len()));
        tokens.push(row);
        valid.push(v);
    }
    let h = model.forward(&tokens, &valid, cache, false)?;
    let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
    Ok(model.logits(&last, false)?)
}

/// Samples a response for every row of the cache, starting from `logits` (the last position's).
/// Finished rows keep stepping with padding until all are done or `max_new_tokens` is reached.
pub fn decode(
    model: &Transformer,
    cache: &mut KvCache,
    mut logits: Tensor,
    params: &SamplingParams,
    stop_ids: &[u32],
    rngs: &mut [StdRng],
    pad: u32,
) -> Result<Vec<Generation>> {
    let b = cache.batch();
    if rngs.len() != b {
        bail!("decode: {} random streams for {b} rows", rngs.len());
    }
    let mut out = vec![Generation { tokens: vec![], logprobs: vec![], stopped: false }; b];
    let vocab = model.cfg.vocab_size;
    for step in 0..params.max_new_tokens {
        let picks = with_f32(&logits, |l| {
            (0..b)
                .map(|r| if out[r].stopped { (pad, 0.0) } else { sample_row(&l[r * vocab..(r + 1) * vocab], params, &mut rngs[r]) })
                .collect::<Vec<_>>()
        })?;
        let mut tokens = Vec::with_capacity(b);
        let mut valid = Vec::with_capacity(b);
        for (r, (tok, lp)) in picks.into_iter().enumerate() {
            let live = !out[r].stopped;
            if live {
                out[r].tokens.push(tok);
                out[r].logprobs.push(lp);
                if stop_ids.contains(&tok) {
                    out[r].stopped = true;
                }
            }
            tokens.push(vec![tok]);
            valid.push(vec![live]);
        }
        if out.iter().all(|g| g.stopped) || step + 1 == params.max_new_tokens {
            // The last token's keys/values still go into the cache, so the history holds it.
            model.forward(&tokens, &valid, cache, false)?;
            break;
        }
        let h = model.forward(&tokens, &valid, cache, false)?;
        logits = model.logits(&h.squeeze(1)?, false)?;
    }
    Ok(out)
}

/// Generates one response per prompt in one batch. Rows are seeded by `seed` and their index.
pub fn generate(
    model: &Transformer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    stop_ids: &[u32],
    seed: u64,
    pad: u32,
) -> Result<Vec<Generation>> {
    let (mut cache, logits) = prefill(model, prompts, pad)?;
    let mut rngs = row_rngs(seed, prompts.len());
    decode(model, &mut cache, logits, params, stop_ids, &mut rngs, pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nucleus_equals_a_full_sort() {
        let mut rng = StdRng::seed_from_u64(3);
        for (v, top_p) in [(50usize, 0.9f32), (5000, 0.9), (5000, 0.999), (3000, 0.5), (100, 1.0)] {
            // Peaked and flat distributions, with ties.
            let raw: Vec<f32> = (0..v).map(|i| if i % 7 == 0 { 0.5 } else { rng.random::<f32>().powi(8) }).collect();
            let z: f32 = raw.iter().sum();
            let probs: Vec<(u32, f32)> = raw.iter().enumerate().map(|(i, &p)| (i as u32, p / z)).collect();
            let mut full = probs.clone();
            full.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut acc = 0f32;
            let keep = full.iter().position(|x| {
                acc += x.1;
                acc >= top_p
            });
            full.truncate(keep.map_or(full.len(), |k| k + 1));
            assert_eq!(nucleus(probs, top_p), full, "vocab {v}, top_p {top_p}");
        }
    }
}
