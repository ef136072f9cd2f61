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
