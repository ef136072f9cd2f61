//! The algorithms, one file each; the shared pieces (a policy-gradient step, a critic's TD step)
//! are here.

pub mod cc;
pub mod dc;
pub mod magrpo;

use crate::config::{AdvantageNorm, Config};
use crate::returns::normalize_by;
use crate::rollout::Rollout;
use crate::team::{Critic, Policy};
use anyhow::{bail, Result};
use candle_core::Tensor;
use collm_model::{score_spans, Grads};

/// What one update reports.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct UpdateStats {
    /// Per agent: the policy loss −(1/N) Σ Â·log π.
    pub policy_loss: Vec<f64>,
    /// Per agent: the gradient norm before clipping.
    pub grad_norm: Vec<f64>,
    /// Critic: c_v · mean squared TD error (mean over critics).
    pub value_loss: Option<f64>,
    pub value_mean: Option<f64>,
    pub target_mean: Option<f64>,
    /// Mean advantage before normalization.
    pub advantage_mean: f64,
}

/// Splits `n` items into micro-batches of `size` (0: one batch).
pub(crate) fn micro_batches(n: usize, size: usize) -> Vec<std::ops::Range<usize>> {
    let size = if size == 0 { n.max(1) } else { size };
    (0..n).step_by(size).map(|s| s..(s + size).min(n)).collect()
}

/// One policy-gradient step of an agent: loss = −(1/N) Σ_spans Â·log π(a|h), where log π of a
/// response is the sum of its token log-probs from one teacher-forced pass over the history.
/// `seqs[j]` = (tokens, response spans); `adv` holds one advantage per span, in order.
pub(crate) fn actor_step(
    p: &mut Policy,
    seqs: &[(Vec<u32>, Vec<(usize, usize)>)],
    adv: &[f64],
    micro: usize,
    max_norm: f64,
) -> Result<(f64, f64)> {
    let total: usize = seqs.iter().map(|s| s.1.len()).sum();
    if total != adv.len() {
        bail!("actor step: {} advantages for {total} responses", adv.len());
    }
    if total == 0 {
        return Ok((0.0, 0.0));
    }
    let pad = p.tokenizer.pad_id();
    let mut grads = Grads::new();
    let mut loss_sum = 0.0;
    let mut off = 0;
    for r in micro_batches(seqs.len(), micro) {
        let toks: Vec<Vec<u32>> = seqs[r.clone()].iter().map(|s| s.0.clone()).collect();
        let spans: Vec<Vec<(usize, usize)>> = seqs[r.clone()].iter().map(|s| s.1.clone()).collect();
        let n: usize = spans.iter().map(|s| s.len()).sum();
        if n == 0 {
            continue;
        }
        let s = score_spans(&p.model, &toks, &spans, &vec![vec![]; toks.len()], pad, true)?;
        let a: Vec<f32> = adv[off..off + n].iter().map(|&x| x as f32).collect();
        off += n;
        let a = Tensor::from_vec(a, n, &p.model.device)?;
        let loss = ((s.sums()? * a)?.sum_all()? / -(total as f64))?;
        loss_sum += loss.to_scalar::<f32>()? as f64;
        let store = loss.backward()?;
        grads.accumulate(&store, p.model.trainable())?;
    }
    let norm = grads.clip_norm(max_norm as f32).map_err(|e| e.context("policy loss"))?;
    p.opt.step(p.model.trainable(), &grads)?;
    Ok((loss_sum, norm as f64))
}

/// A critic's step on sequences with value positions: V = V_φ at each position (with a graph),
/// V_old its detached copy; `targets(seq, v_old)` gives each position's TD target y; the loss is
/// c_v · mean (y − V)². Returns per position (V_old, y), and the loss.
pub(crate) fn critic_step(
    c: &mut Critic,
    seqs: &[(Vec<u32>, Vec<usize>)],
    targets: &dyn Fn(usize, &[f64]) -> Vec<f64>,
    value_coef: f64,
    micro: usize,
    max_norm: f64,
) -> Result<(Vec<Vec<(f64, f64)>>, f64)> {
    let total: usize = seqs.iter().map(|s| s.1.len()).sum();
    let pad = c.tokenizer.pad_id();
    let mut grads = Grads::new();
    let mut out = Vec::with_capacity(seqs.len());
    let mut loss_sum = 0.0;
    for r in micro_batches(seqs.len(), micro) {
        let toks: Vec<Vec<u32>> = seqs[r.clone()].iter().map(|s| s.0.clone()).collect();
        let pos: Vec<Vec<usize>> = seqs[r.clone()].iter().map(|s| s.1.clone()).collect();
        let s = score_spans(&c.model, &toks, &vec![vec![]; toks.len()], &pos, pad, true)?;
        let Some(h) = s.hidden else { continue };
        let v = c.head.forward(&h, true)?;
        let v_old: Vec<f64> = v.to_vec1::<f32>()?.into_iter().map(|x| x as f64).collect();
        let mut ys = Vec::with_capacity(v_old.len());
        let mut off = 0;
        for (j, p) in pos.iter().enumerate() {
            let vo = &v_old[off..off + p.len()];
            let y = targets(r.start + j, vo);
            out.push(vo.iter().cloned().zip(y.iter().cloned()).collect());
            ys.extend(y);
            off += p.len();
        }
        let y = Tensor::from_vec(ys.iter().map(|&x| x as f32).collect::<Vec<_>>(), ys.len(), &c.model.device)?;
        let loss = ((y - v)?.sqr()?.sum_all()? * (value_coef / total as f64))?;
        loss_sum += loss.to_scalar::<f32>()? as f64;
        let store = loss.backward()?;
        grads.accumulate(&store, c.trainable())?;
    }
    let _ = grads.clip_norm(max_norm as f32).map_err(|e| e.context("value loss"))?;
    let mut params: Vec<_> = c.model.trainable().collect();
    params.extend(c.head.trainable());
    c.opt.step(params, &grads)?;
    Ok((out, loss_sum))
}

/// The actor step every algorithm ends with: agent i's responses get the advantages `adv(node, k)`,
/// z-normalized within the buffer per turn (or over all turns: `advantage_norm`), then one
/// policy-gradient step. Returns (loss, grad
/// norm) and the advantages before normalization.
pub(crate) fn update_agent(
    p: &mut Policy,
    i: usize,
    rollout: &Rollout,
    adv: impl Fn(usize, usize) -> f64,
    cfg: &Config,
) -> Result<(f64, f64, Vec<f64>)> {
    let seqs = rollout.agent_sequences(i);
    let ids: Vec<(usize, usize)> = seqs.iter().flat_map(|s| s.2.clone()).collect();
    let raw: Vec<f64> = ids.iter().map(|&(x, k)| adv(x, k)).collect();
    let turns: Vec<usize> = ids.iter().map(|&(x, _)| rollout.nodes[x].turn).collect();
    let mut a = raw.clone();
    normalize_advantages(&mut a, &turns, cfg.advantage_norm);
    let s: Vec<_> = seqs.into_iter().map(|(t, sp, _)| (t, sp)).collect();
    let (loss, norm) = actor_step(p, &s, &a, cfg.micro_batch, cfg.max_grad_norm)?;
    Ok((loss, norm, raw))
}

/// z-normalizes one agent's advantages (`turns[j]`: the turn of advantage j) per turn or over all
/// its turns.
pub(crate) fn normalize_advantages(a: &mut [f64], turns: &[usize], norm: AdvantageNorm) {
    match norm {
        AdvantageNorm::Turn => normalize_by(a, turns),
        AdvantageNorm::Agent => crate::returns::normalize(a),
    }
}

/// TD advantages per node from a critic step's (V_old, y) pairs along each chain:
/// A = y − V_old. Returns (A by node, all V_old, all y).
pub(crate) fn td_advantages(rollout: &Rollout, chains: &[Vec<usize>], vy: &[Vec<(f64, f64)>]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut adv_of = vec![0.0; rollout.nodes.len()];
    let (mut vs, mut ys) = (vec![], vec![]);
    for (c, pairs) in chains.iter().zip(vy) {
        for (&x, &(v, y)) in c.iter().zip(pairs) {
            adv_of[x] = y - v;
            vs.push(v);
            ys.push(y);
        }
    }
    (adv_of, vs, ys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_normalize_per_turn_or_over_all_turns() {
        // Turn 0: a critic's tiny, noisy advantages; turn 1: the real signal.
        let raw = [0.01, -0.01, 1.0, -1.0, 3.0];
        let turns = [0, 0, 1, 1, 1];
        let mut per_turn = raw;
        normalize_advantages(&mut per_turn, &turns, AdvantageNorm::Turn);
        // Per turn, the ±0.01 of turn 0 become ±1: as large as the signal.
        assert!((per_turn[0] - 1.0).abs() < 1e-9 && (per_turn[1] + 1.0).abs() < 1e-9);
        // Turn 1: mean 1, population std sqrt(8/3).
        let s = (8.0f64 / 3.0).sqrt();
        assert!((per_turn[2] - 0.0).abs() < 1e-9 && (per_turn[3] + 2.0 / s).abs() < 1e-9 && (per_turn[4] - 2.0 / s).abs() < 1e-9);
        // Over all turns: mean 0.6, population std sqrt(mean of squares − 0.36); turn 0 stays small.
        let mut all = raw;
        normalize_advantages(&mut all, &turns, AdvantageNorm::Agent);
        let var = raw.iter().map(|x| x * x).sum::<f64>() / 5.0 - 0.36;
        for (a, r) in all.iter().zip(raw) {
            assert!((a - (r - 0.6) / var.sqrt()).abs() < 1e-9);
        }
        assert!((all[0] - all[1]).abs() < 0.02);
    }
}
