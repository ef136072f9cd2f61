//! Teacher-forced scoring: log π(response | prompt) per token, in one padded, batched pass.

use crate::model::{KvCache, Transformer};
use crate::ops;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::cell::Cell;

thread_local! {
    static SHARING: Cell<bool> = const { Cell::new(true) };
}

/// Runs `f` with prefix sharing off on this thread: every sequence goes through the model whole
/// (the reference that the shared passes are tested against).
pub fn without_prefix_sharing<R>(f: impl FnOnce() -> R) -> R {
    ops::with_switch(&SHARING, false, f)
}

/// Sequences that begin alike (MAGRPO's K samples of a node share their history) grouped so the
/// shared prefix goes through the model once: one pass over each group's prefix, whose keys and
/// values every member's rest then attends to. Gradients flow back through the prefix once, from
/// all members together, so they equal the unshared pass's; only the work changes.
struct PrefixPlan {
    /// The group of each sequence.
    group: Vec<usize>,
    /// Each group's prefix length (a group of one keeps a prefix too: it costs nothing extra).
    prefix_len: Vec<usize>,
    /// Each group's first member, whose tokens give the prefix.
    first: Vec<usize>,
    /// Tokens the sharing saves: Σ over groups of (members − 1) · prefix.
    saved: usize,
}

/// Groups save less than this many tokens in all: one pass is cheaper than two.
const MIN_SHARED_TOKENS: usize = 32;

impl PrefixPlan {
    /// Groups sequences by common prefix, `cuts[i]` the longest prefix of sequence i that may be
    /// shared. Sorted, sequences with long common prefixes are neighbours; the sorted order is cut
    /// into the runs that save the most tokens (a run of m members whose common prefix is l saves
    /// (m − 1) · l), by dynamic programming over the cut points.
    fn new(seqs: &[Vec<u32>], cuts: &[usize]) -> Option<Self> {
        let b = seqs.len();
        let mut order: Vec<usize> = (0..b).collect();
        order.sort_by(|&x, &y| seqs[x][..cuts[x]].cmp(&seqs[y][..cuts[y]]));
        let lcp = |x: usize, y: usize| seqs[x][..cuts[x]].iter().zip(&seqs[y][..cuts[y]]).take_while(|(a, b)| a == b).count();
        // adjacent[j]: the common prefix of order[j − 1] and order[j].
        let adjacent: Vec<usize> = (0..b).map(|j| if j == 0 { 0 } else { lcp(order[j - 1], order[j]) }).collect();
        // best[e]: the most tokens saved by the first e sorted sequences; from[e]: where the last run starts.
        let (mut best, mut from) = (vec![0usize; b + 1], vec![0usize; b + 1]);
        for e in 1..=b {
            best[e] = best[e - 1];
            from[e] = e - 1;
            let mut common = usize::MAX;
            for s in (0..e - 1).rev() {
                common = common.min(adjacent[s + 1]);
                if common == 0 {
                    break;
                }
                let saved = best[s] + (e - 1 - s) * common;
                if saved > best[e] {
                    best[e] = saved;
                    from[e] = s;
                }
            }
        }
        let mut groups: Vec<(Vec<usize>, usize)> = vec![];
        let mut e = b;
        while e > 0 {
            let s = from[e];
            let members: Vec<usize> = order[s..e].to_vec();
            let len = if e - s > 1 { adjacent[s + 1..e].iter().cloned().min().unwrap_or(0) } else { cuts[order[s]] };
            groups.push((members, len));
            e = s;
        }
        groups.reverse();
        let saved: usize = groups.iter().map(|(m, l)| (m.len() - 1) * l).sum();
        if saved < MIN_SHARED_TOKENS {
            return None;
        }
        // The prefix pass is as long as the longest shared prefix; a group of one fills its row
        // up to that with its own tokens instead of padding.
        let longest = groups.iter().filter(|(m, _)| m.len() > 1).map(|&(_, l)| l).max().unwrap_or(0);
        let mut group = vec![0; b];
        let (mut prefix_len, mut first) = (vec![], vec![]);
        for (g, (members, len)) in groups.iter().enumerate() {
            for &i in members {
                group[i] = g;
            }
            prefix_len.push(if members.len() > 1 { *len } else { (*len).min(longest) });
            first.push(members[0]);
        }
        Some(Self { group, prefix_len, first, saved })
    }

    /// The prefixes' pass: a cache with one row per sequence, its group's prefix (rows of one
    /// group are the same tensors, selected differentiably).
    fn prefill(&self, model: &Transformer, seqs: &[Vec<u32>], pad: u32, grad: bool) -> Result<KvCache> {
        let t = self.prefix_len.iter().cloned().max().unwrap_or(0).max(1);
        let (mut tokens, mut valid) = (vec![], vec![]);
        for (g, &len) in self.prefix_len.iter().enumerate() {
            let mut row = seqs[self.first[g]][..len].to_vec();
            row.resize(t, pad);
            let mut v = vec![true; len];
            v.resize(t, false);
            tokens.push(row);
            valid.push(v);
        }
        let mut cache = KvCache::new(tokens.len(), model.cfg.num_layers);
        model.forward(&tokens, &valid, &mut cache, grad)?;
        cache.select_rows(&self.group)
    }
}

/// Per-token log-probs of a batch of responses.
pub struct Scores {
    /// Log-probs of every response token, all responses one after another: [total tokens].
    pub token_logprobs: Tensor,
    /// Response lengths, in order.
    pub lengths: Vec<usize>,
}

impl Scores {
    /// Σ_t log π(token_t) per response: [batch]. Differentiable when the scores are.
    pub fn sums(&self) -> Result<Tensor> {
        let mut sums = Vec::with_capacity(self.lengths.len());
        let mut off = 0;
        for &n in &self.lengths {
            sums.push(if n == 0 {
                Tensor::zeros((), self.token_logprobs.dtype(), self.token_logprobs.device())?
            } else {
                self.token_logprobs.narrow(0, off, n)?.sum_all()?
            });
            off += n;
        }
        Ok(Tensor::stack(&sums, 0)?)
    }

    /// Per-response token log-probs as plain vectors.
    pub fn per_response(&self) -> Result<Vec<Vec<f32>>> {
        let all = self.token_logprobs.to_vec1::<f32>()?;
        let mut out = Vec::new();
        let mut off = 0;
        for &n in &self.lengths {
            out.push(all[off..off + n].to_vec());
            off += n;
        }
        Ok(out)
    }
}

/// Scores `(prompt, response)` pairs: each row is prompt ++ response, right-padded; the logits of
/// the positions that predict response tokens go through a fused log-softmax. With `grad`, the
/// result is differentiable with respect to the model's trainable weights.
pub fn score(model: &Transformer, pairs: &[(Vec<u32>, Vec<u32>)], pad: u32, grad: bool) -> Result<Scores> {
    let b = pairs.len();
    if b == 0 {
        bail!("score: no (prompt, response) pairs");
    }
    if pairs.iter().any(|(p, _)| p.is_empty()) {
        bail!("score: every prompt needs at least one token");
    }
    // The last response token is only a target, never an input.
    let t = pairs.iter().map(|(p, r)| p.len() + r.len().saturating_sub(1)).max().unwrap();
    let mut tokens = Vec::with_capacity(b);
    let mut valid = Vec::with_capacity(b);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, (p, r)) in pairs.iter().enumerate() {
        let mut row: Vec<u32> = p.iter().chain(r.iter()).cloned().take(p.len() + r.len().saturating_sub(1)).collect();
        let n = row.len();
        row.resize(t, pad);
        let mut v = vec![true; n];
        v.resize(t, false);
        for (j, &tok) in r.iter().enumerate() {
            rows.push((i * t + p.len() - 1 + j) as u32);
            targets.push(tok);
        }
        tokens.push(row);
        valid.push(v);
    }
    let mut cache = KvCache::new(b, model.cfg.num_layers);
    let h = model.forward(&tokens, &valid, &mut cache, grad)?;
    let lengths = pairs.iter().map(|(_, r)| r.len()).collect();
    if targets.is_empty() {
        return Ok(Scores { token_logprobs: Tensor::zeros(0, candle_core::DType::F32, &model.device)?, lengths });
    }
    let h = h.reshape((b * t, model.cfg.hidden_size))?;
    let idx = Tensor::from_vec(rows, targets.len(), &Device::Cpu)?.to_device(&model.device)?;
    let picked = h.index_select(&idx, 0)?;
    let logits = model.logits(&picked, grad)?;
    let token_logprobs = ops::token_logprobs(&logits, &targets)?;
    Ok(Scores { token_logprobs, lengths })
}

/// What one teacher-forced pass over whole histories gives: the log-probs of the tokens in each
/// sequence's response spans, and the final hidden states at chosen positions (for value heads).
pub struct SpanScores {
    /// Log-probs of every span token, spans in order (sequence by sequence): [total span tokens].
    pub token_logprobs: Tensor,
    /// Token count of each span, in the same order.
    pub span_lengths: Vec<usize>,
    /// Hidden states at the requested positions, in order: [positions, hidden] (None if none).
    pub hidden: Option<Tensor>,
    /// Tokens that did not go through the model because their sequence shares its prefix with
    /// another one of the batch (0 when nothing was shared).
    pub shared_tokens: usize,
}

impl SpanScores {
    /// Σ log π over each span: [spans].
    pub fn sums(&self) -> Result<Tensor> {
        Scores { token_logprobs: self.token_logprobs.clone(), lengths: self.span_lengths.clone() }.sums()
    }
}

/// Scores several response spans of each sequence in one padded, batched pass: `spans[i]` holds
/// half-open token ranges `[start, end)` of `seqs[i]` (start ≥ 1) whose tokens are scored given
/// everything before them; `positions[i]` lists token indices whose final hidden state is
/// returned. Because attention is causal, a value or log-prob at a position depends only on the
/// tokens up to it, so one pass over a whole multi-turn history gives every turn's numbers.
pub fn score_spans(
    model: &Transformer,
    seqs: &[Vec<u32>],
    spans: &[Vec<(usize, usize)>],
    positions: &[Vec<usize>],
    pad: u32,
    grad: bool,
) -> Result<SpanScores> {
    score_spans_impl(model, seqs, spans, positions, pad, grad, 1.0)
}

/// `score_spans` without gradients under the distribution tempered by `temperature`:
/// log softmax(logits / T) (what sampling at temperature T draws from, before top-p / top-k).
pub fn score_spans_at(
    model: &Transformer,
    seqs: &[Vec<u32>],
    spans: &[Vec<(usize, usize)>],
    positions: &[Vec<usize>],
    pad: u32,
    temperature: f64,
) -> Result<SpanScores> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        bail!("score_spans_at: the temperature must be a positive number, got {temperature}");
    }
    score_spans_impl(model, seqs, spans, positions, pad, false, temperature)
}

fn score_spans_impl(
    model: &Transformer,
    seqs: &[Vec<u32>],
    spans: &[Vec<(usize, usize)>],
    positions: &[Vec<usize>],
    pad: u32,
    grad: bool,
    temperature: f64,
) -> Result<SpanScores> {
    let b = seqs.len();
    if b == 0 || spans.len() != b || positions.len() != b {
        bail!("score_spans: {b} sequences, {} span lists, {} position lists", spans.len(), positions.len());
    }
    // Only the tokens that something needs go through the model.
    let needed: Vec<usize> = (0..b)
        .map(|i| {
            let s = spans[i].iter().map(|&(_, e)| e.saturating_sub(1)).max().unwrap_or(0);
            let p = positions[i].iter().map(|&p| p + 1).max().unwrap_or(0);
            s.max(p)
        })
        .collect();
    for i in 0..b {
        for &(s, e) in &spans[i] {
            if s == 0 || s > e || e > seqs[i].len() {
                bail!("score_spans: span {s}..{e} does not fit sequence {i} of {} tokens", seqs[i].len());
            }
        }
        if let Some(&p) = positions[i].iter().find(|&&p| p >= seqs[i].len()) {
            bail!("score_spans: position {p} is outside sequence {i} of {} tokens", seqs[i].len());
        }
    }
    let lens: Vec<usize> = (0..b).map(|i| needed[i].max(1).min(seqs[i].len())).collect();
    // The longest prefix of each sequence that may go through the shared pass: every scored
    // position (span start − 1) and every hidden position must fall in its own rest.
    let cuts: Vec<usize> = (0..b)
        .map(|i| {
            let s = spans[i].iter().filter(|&&(s, e)| e > s).map(|&(s, _)| s - 1).min().unwrap_or(usize::MAX);
            let p = positions[i].iter().cloned().min().unwrap_or(usize::MAX);
            s.min(p).min(lens[i])
        })
        .collect();
    let plan = if SHARING.with(|s| s.get()) { PrefixPlan::new(seqs, &cuts) } else { None };
    // Each sequence's rest after its prefix (all of it without a plan) goes through the model
    // after the cache of its prefix.
    let starts: Vec<usize> = (0..b).map(|i| plan.as_ref().map_or(0, |p| p.prefix_len[p.group[i]])).collect();
    let t = (0..b).map(|i| lens[i] - starts[i]).max().unwrap_or(0).max(1);
    let mut tokens = Vec::with_capacity(b);
    let mut valid = Vec::with_capacity(b);
    let (mut rows, mut targets, mut span_lengths, mut pos_rows) = (vec![], vec![], vec![], vec![]);
    for i in 0..b {
        let (s0, n) = (starts[i], lens[i]);
        let mut row = seqs[i][s0..n].to_vec();
        row.resize(t, pad);
        let mut v = vec![true; n - s0];
        v.resize(t, false);
        tokens.push(row);
        valid.push(v);
        for &(s, e) in &spans[i] {
            for j in s..e {
                rows.push((i * t + j - 1 - s0) as u32);
                targets.push(seqs[i][j]);
            }
            span_lengths.push(e - s);
        }
        for &p in &positions[i] {
            pos_rows.push((i * t + p - s0) as u32);
        }
    }
    let mut cache = match &plan {
        Some(plan) => plan.prefill(model, seqs, pad, grad)?,
        None => KvCache::new(b, model.cfg.num_layers),
    };
    let h = model.forward(&tokens, &valid, &mut cache, grad)?.reshape((b * t, model.cfg.hidden_size))?;
    let token_logprobs = if targets.is_empty() {
        Tensor::zeros(0, candle_core::DType::F32, &model.device)?
    } else {
        let idx = Tensor::from_vec(rows, targets.len(), &Device::Cpu)?.to_device(&model.device)?;
        let mut logits = model.logits(&h.index_select(&idx, 0)?, grad)?;
        if temperature != 1.0 {
            logits = (logits / temperature)?;
        }
        ops::token_logprobs(&logits, &targets)?
    };
    let hidden = if pos_rows.is_empty() {
        None
    } else {
        let n = pos_rows.len();
        let idx = Tensor::from_vec(pos_rows, n, &Device::Cpu)?.to_device(&model.device)?;
        Some(h.index_select(&idx, 0)?)
    };
    Ok(SpanScores { token_logprobs, span_lengths, hidden, shared_tokens: plan.map_or(0, |p| p.saved) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(seqs: &[Vec<u32>], cuts: &[usize]) -> Option<(Vec<usize>, Vec<usize>, usize)> {
        PrefixPlan::new(seqs, cuts).map(|p| (p.group, p.prefix_len, p.saved))
    }

    #[test]
    fn prefixes_are_grouped_where_they_save_the_most() {
        let t = |head: &[u32], n: usize, tail: u32| -> Vec<u32> { head.iter().cloned().chain(std::iter::repeat_n(tail, n)).collect() };
        let hist_a: Vec<u32> = (0..40).collect();
        let hist_b: Vec<u32> = (0..3).chain(100..137).collect();
        // K = 3 samples of history A, K = 2 of history B and a singleton that shares 3 template
        // tokens with both (it sorts between A and B), shuffled.
        let seqs = vec![t(&hist_a, 5, 7), t(&[0, 1, 2, 50], 20, 9), t(&hist_b, 4, 1), t(&hist_a, 6, 8), t(&hist_b, 3, 2), t(&hist_a, 2, 9)];
        let cuts = vec![39, 23, 39, 39, 39, 39];
        // Joining the singleton to a group would hold that group to 3 tokens; the best cut gives
        // A and B their 39 each.
        let (group, prefix, saved) = groups(&seqs, &cuts).unwrap();
        assert_eq!(saved, 2 * 39 + 39);
        assert_eq!((group[0], group[3], group[5]), (group[0], group[0], group[0]));
        assert_eq!(group[2], group[4]);
        assert!(group[1] != group[0] && group[1] != group[2] && group[0] != group[2]);
        assert_eq!((prefix[group[0]], prefix[group[2]], prefix[group[1]]), (39, 39, 23));
        // Nothing in common, or too little to pay for a second pass: one pass.
        assert!(groups(&[vec![1, 2, 3], vec![4, 5, 6]], &[2, 2]).is_none());
        assert!(groups(&[t(&[1; 10], 3, 2), t(&[1; 10], 3, 3)], &[10, 10]).is_none());
    }
}
