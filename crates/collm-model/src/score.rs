//! Teacher-forced scoring: log π(response | prompt) per token, in one padded, batched pass.

use crate::model::{KvCache, Transformer};
use crate::ops;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

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
    let t = needed.iter().cloned().max().unwrap_or(0).max(1);
    let mut tokens = Vec::with_capacity(b);
    let mut valid = Vec::with_capacity(b);
    let (mut rows, mut targets, mut span_lengths, mut pos_rows) = (vec![], vec![], vec![], vec![]);
    for i in 0..b {
        let n = needed[i].max(1).min(seqs[i].len());
        let mut row = seqs[i][..n].to_vec();
        row.resize(t, pad);
        let mut v = vec![true; n];
        v.resize(t, false);
        tokens.push(row);
        valid.push(v);
        for &(s, e) in &spans[i] {
            for j in s..e {
                rows.push((i * t + j - 1) as u32);
                targets.push(seqs[i][j]);
            }
            span_lengths.push(e - s);
        }
        for &p in &positions[i] {
            pos_rows.push((i * t + p) as u32);
        }
    }
    let mut cache = KvCache::new(b, model.cfg.num_layers);
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
    Ok(SpanScores { token_logprobs, span_lengths, hidden })
}
