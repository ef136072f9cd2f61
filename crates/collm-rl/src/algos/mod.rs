//! The algorithms, one file each behind the small `Algorithm` trait; what they share is here:
//! the loss terms written as formulas, advantage normalization, the optimizer steps of an agent
//! and of a critic, and the update schedule (which samples each step learns from).

pub mod cc;
pub mod dc;
pub mod magrpo;

use crate::config::{AdvantageNorm, AgentInput, Algo, Config, Schedule};
use crate::returns::normalize_by;
use crate::rollout::{AgentSeq, ResponseId, Rollout};
use crate::team::{Agent, Critic, Team};
use anyhow::{bail, Result};
use candle_core::Tensor;
use collm_model::{score_spans, Grads};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::collections::BTreeMap;

/// What one update reports.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct UpdateStats {
    /// Per agent: the policy loss, mean over its optimizer steps.
    pub policy_loss: Vec<f64>,
    /// Per agent: the gradient norm before clipping, mean over its optimizer steps.
    pub grad_norm: Vec<f64>,
    /// Critic: c_v · mean squared TD error, mean over the critics' steps.
    pub value_loss: Option<f64>,
    /// Mean rollout-time value V_old and TD target y.
    pub value_mean: Option<f64>,
    pub target_mean: Option<f64>,
    /// Mean advantage before normalization.
    pub advantage_mean: f64,
    /// With `kl_coef`: the mean reference-KL penalty β·KL per response.
    pub kl_penalty: Option<f64>,
    /// Optimizer steps taken by the agents (all together) and by the critics.
    pub agent_steps: usize,
    pub critic_steps: usize,
}

/// What the trainer tells an update besides the config.
#[derive(Clone, Copy, Debug)]
pub struct UpdateCtx<'a> {
    /// False during the critic warm-up: only the critics learn.
    pub actors: bool,
    /// Seeds the shuffling of mini-batches.
    pub seed: u64,
    /// With `kl_coef`: per agent, each response's reference-KL penalty β·KL (empty: none).
    pub penalty: &'a [BTreeMap<ResponseId, f64>],
}

impl UpdateCtx<'_> {
    /// Agent i's penalty on response `id` (0 without `kl_coef`).
    pub fn penalty(&self, i: usize, id: ResponseId) -> f64 {
        self.penalty.get(i).and_then(|m| m.get(&id)).copied().unwrap_or(0.0)
    }
}

/// The reference-KL penalty of every response of agent i: β · Σ_tokens k3, with
/// k3 = exp(log π_ref − log π) − (log π_ref − log π) − 1 (as CoMLRL ≥ 1.3.8 computes it), log π
/// from the sampling pass and log π_ref from one teacher-forced pass of the reference.
pub fn kl_penalties(
    rollout: &Rollout,
    i: usize,
    reference: &collm_model::Transformer,
    pad: u32,
    beta: f64,
    micro: usize,
) -> Result<BTreeMap<ResponseId, f64>> {
    let seqs = rollout.agent_sequences(i);
    let mut out = BTreeMap::new();
    for r in fitted_batches(&agent_lens(&seqs), micro, &reference.cfg, false)? {
        let part = &seqs[r];
        let (toks, spans) = AgentSeq::batch(part);
        let lp = score_spans(reference, &toks, &spans, &vec![vec![]; toks.len()], pad, false)?.token_logprobs.to_vec1::<f32>()?;
        let mut off = 0;
        for id in part.iter().flat_map(|s| s.ids.iter()) {
            let own = &rollout.nodes[id.node].responses[i][id.k].logprobs;
            let k3: f64 = own
                .iter()
                .zip(&lp[off..off + own.len()])
                .map(|(&p, &q)| {
                    let d = (q - p) as f64;
                    d.exp() - d - 1.0
                })
                .sum();
            off += own.len();
            out.insert(*id, beta * k3);
        }
    }
    Ok(out)
}

/// What an algorithm is to the trainer.
pub trait Algorithm: Sync {
    /// Samples per agent per node: K for the Monte Carlo methods, 1 for the actor-critic ones.
    fn samples_per_node(&self, cfg: &Config) -> usize;
    /// Critic models the team needs besides its agents.
    fn critics(&self, cfg: &Config, num_agents: usize) -> usize;
    /// The advantage normalization when the config names none (CoMLRL's for the method).
    fn default_advantage_norm(&self) -> AdvantageNorm;
    /// One update from a rollout buffer.
    fn update(&self, team: &mut Team, rollout: &Rollout, cfg: &Config, ctx: UpdateCtx) -> Result<UpdateStats>;
}

/// The algorithm a config names.
pub fn algorithm(a: Algo) -> &'static dyn Algorithm {
    match a {
        Algo::Cc => &cc::CoLlmCc,
        Algo::Dc => &dc::CoLlmDc,
        Algo::Magrpo | Algo::Grpo | Algo::Reinforce | Algo::Rloo | Algo::Remax => &magrpo::Magrpo,
    }
}

// ---------------------------------------------------------------------------------------------
// Loss terms.

/// The policy-gradient loss summed over a batch's responses and divided by `n` (the mini-batch's
/// response count, so micro-batches add up to the mean):
///   plain:            L = −Σ Â · log π(a|h) / n
///   clipped (ε):      L = −Σ min(ρ·Â, clip(ρ, 1−ε, 1+ε)·Â) / n,   ρ = exp(log π(a|h) − log π_old(a|h))
/// `logp` and `old_logp` are per response: sums of token log-probs.
pub fn policy_loss(logp: &Tensor, adv: &Tensor, old_logp: &Tensor, clip: Option<f64>, n: usize) -> Result<Tensor> {
    let per = match clip {
        None => (logp * adv)?,
        Some(eps) => {
            // ρ of a whole response; its log is bounded so that ρ stays finite (far outside any
            // clip range either way).
            let ratio = (logp - old_logp)?.clamp(-20.0, 20.0)?.exp()?;
            let unclipped = (&ratio * adv)?;
            let clipped = (ratio.clamp(1.0 - eps, 1.0 + eps)? * adv)?;
            unclipped.minimum(&clipped)?
        }
    };
    Ok((per.sum_all()? / -(n as f64))?)
}

/// The critic's loss: c_v · Σ (y − V)² / n.
pub fn value_loss(v: &Tensor, y: &Tensor, coef: f64, n: usize) -> Result<Tensor> {
    Ok(((y - v)?.sqr()?.sum_all()? * (coef / n as f64))?)
}

/// The clipped value loss: c_v · Σ max((y − V)², (y − V_clip)²) / n with
/// V_clip = V_old + clip(V − V_old, −ε, ε) (see `returns::clipped_value_loss`).
pub fn clipped_value_loss(v: &Tensor, v_old: &Tensor, y: &Tensor, eps: f64, coef: f64, n: usize) -> Result<Tensor> {
    let v_clip = (v_old + (v - v_old)?.clamp(-eps, eps)?)?;
    let a = (y - v)?.sqr()?;
    let b = (y - v_clip)?.sqr()?;
    Ok((a.maximum(&b)?.sum_all()? * (coef / n as f64))?)
}

pub(crate) fn tensor(x: &[f64], dev: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(x.iter().map(|&v| v as f32).collect::<Vec<_>>(), x.len(), dev)?)
}

pub(crate) fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

// ---------------------------------------------------------------------------------------------
// Advantages.

/// z-normalizes one agent's advantages within the groups `norm` names: a node's K samples
/// (`group`), a turn (`turn`), all of them (`agent`), or not at all (`none`).
pub fn normalize_advantages(adv: &mut BTreeMap<ResponseId, f64>, rollout: &Rollout, norm: AdvantageNorm) {
    let ids: Vec<ResponseId> = adv.keys().copied().collect();
    let keys: Vec<usize> = match norm {
        AdvantageNorm::None => return,
        AdvantageNorm::Group => ids.iter().map(|id| id.node).collect(),
        AdvantageNorm::Turn => ids.iter().map(|id| rollout.nodes[id.node].turn).collect(),
        AdvantageNorm::Agent => vec![0; ids.len()],
    };
    let mut vals: Vec<f64> = ids.iter().map(|id| adv[id]).collect();
    normalize_by(&mut vals, &keys);
    for (id, v) in ids.into_iter().zip(vals) {
        adv.insert(id, v);
    }
}

/// The actor-critic methods' advantages of one agent: A[node] for each node's one response,
/// normalized as the config says.
pub fn node_advantages(rollout: &Rollout, nodes: &[usize], a: &[f64], cfg: &Config) -> BTreeMap<ResponseId, f64> {
    let mut m: BTreeMap<ResponseId, f64> = nodes.iter().map(|&x| (ResponseId { node: x, k: 0 }, a[x])).collect();
    normalize_advantages(&mut m, rollout, cfg.advantage_norm());
    m
}

/// TD targets and advantages along each chain from rollout-time values `v_old[node]`:
///   y_t = r_t − p_t + γ·V_old(h_{t+1}) (y = r − p at the chain's last turn),   A_t = y_t − V_old(h_t),
/// p_t = `penalty(node)` (the reference-KL penalty, 0 without `kl_coef`). Returns (y, A) by node.
pub fn td_by_node(
    rollout: &Rollout,
    chains: &[Vec<usize>],
    v_old: &[f64],
    gamma: f64,
    penalty: &dyn Fn(usize) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; rollout.nodes.len()];
    let mut a = vec![0.0; rollout.nodes.len()];
    for c in chains {
        let r: Vec<f64> = c.iter().map(|&x| rollout.nodes[x].joints[0].reward - penalty(x)).collect();
        let v: Vec<f64> = c.iter().map(|&x| v_old[x]).collect();
        for (j, yy) in crate::returns::td_targets(&r, &v, gamma).into_iter().enumerate() {
            y[c[j]] = yy;
            a[c[j]] = yy - v[j];
        }
    }
    (y, a)
}

// ---------------------------------------------------------------------------------------------
// The schedule.

/// The mini-batches of one pass over a buffer, in the order the optimizers step on them. `groups`
/// are the units of each group (`schedule = "turn"`: the nodes of each turn, turns in order;
/// `"buffer"`: all episodes at once). A group larger than `size` is shuffled (seeded) and cut into
/// mini-batches of `size` (0: the whole group in one).
pub fn mini_batches(groups: &[Vec<usize>], size: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut out = vec![];
    for (g, units) in groups.iter().enumerate() {
        if units.is_empty() {
            continue;
        }
        if size == 0 || size >= units.len() {
            out.push(units.clone());
            continue;
        }
        let mut u = units.clone();
        u.shuffle(&mut StdRng::seed_from_u64(seed ^ (g as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        out.extend(u.chunks(size).map(|c| c.to_vec()));
    }
    out
}

/// The groups a schedule steps on: the nodes of each turn, or every episode in one group.
pub fn schedule_groups(rollout: &Rollout, schedule: Schedule) -> Vec<Vec<usize>> {
    match schedule {
        Schedule::Turn => rollout.nodes_by_turn(),
        Schedule::Buffer => vec![(0..rollout.roots.len()).collect()],
    }
}

/// Agent i's sequences of the whole rollout, which the `buffer` schedule's batches are cut from
/// (`turn` builds its batches per response and needs none).
pub fn buffer_sequences(rollout: &Rollout, i: usize, schedule: Schedule) -> Vec<AgentSeq> {
    match schedule {
        Schedule::Buffer => rollout.agent_sequences(i),
        Schedule::Turn => vec![],
    }
}

/// Agent i's sequences for one mini-batch: `turn` schedule, one per response of the batch's
/// nodes (history then response); `buffer` schedule, the agent's sequences of the batch's
/// episodes (a chain is one sequence).
pub fn agent_batch(rollout: &Rollout, i: usize, units: &[usize], schedule: Schedule, all: &[AgentSeq]) -> Vec<AgentSeq> {
    match schedule {
        Schedule::Turn => units
            .iter()
            .flat_map(|&x| (0..rollout.nodes[x].responses[i].len()).map(move |k| rollout.response_sequence(i, ResponseId { node: x, k })))
            .filter(|s| s.spans[0].1 > s.spans[0].0)
            .collect(),
        Schedule::Buffer => {
            let eps: std::collections::BTreeSet<usize> = units.iter().copied().collect();
            all.iter().filter(|s| s.ids.first().is_some_and(|id| eps.contains(&rollout.nodes[id.node].episode))).cloned().collect()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Optimizer steps.

/// Micro-batches of `n` items of `size` (0: one).
pub fn micro_batches(n: usize, size: usize) -> Vec<std::ops::Range<usize>> {
    let size = if size == 0 { n.max(1) } else { size };
    (0..n).step_by(size).map(|s| s..(s + size).min(n)).collect()
}

/// The bytes a teacher-forced pass over `rows` sequences padded to `len` tokens holds at its
/// peak, `scored` positions of them through the vocabulary. With gradients every layer keeps its
/// activations for the backward pass; on SmolLM2-135M one sequence measured about 3.6 MB per
/// token (`collm bench model --train-batch 1 --train-tokens 512` and `2048`), and this estimate is
/// about 10% above that.
pub fn pass_bytes(m: &collm_model::ModelConfig, rows: usize, len: usize, scored: usize, grad: bool) -> u64 {
    let (h, i, layers, vocab) = (m.hidden_size as u64, m.intermediate_size as u64, m.num_layers as u64, m.vocab_size as u64);
    let tokens = (rows * len) as u64;
    let per_token =
        if grad { layers * (12 * h + 5 * i) * 8 } else { layers * 2 * (m.num_kv_heads * m.head_dim) as u64 * 4 + (4 * h + 2 * i) * 4 };
    tokens * per_token + scored as u64 * vocab * if grad { 12 } else { 4 }
}

/// [`micro_batches`] of sequences with (tokens, scored positions) `lens`, each split further
/// (halved) while its pass would not fit in four fifths of the memory this process may use, so a
/// long history costs time, never an abort; a single sequence that cannot fit is an error.
pub fn fitted_batches(
    lens: &[(usize, usize)],
    size: usize,
    m: &collm_model::ModelConfig,
    grad: bool,
) -> Result<Vec<std::ops::Range<usize>>> {
    // Passes under 256 MiB need no look at the machine (reading /proc on every pass of a tiny
    // model cost about 4% of a training run).
    let small = micro_batches(lens.len(), size).iter().all(|r| {
        let part = &lens[r.clone()];
        pass_bytes(m, part.len(), part.iter().map(|x| x.0).max().unwrap_or(0), part.iter().map(|x| x.1).sum(), grad) < 256 << 20
    });
    if small {
        return Ok(micro_batches(lens.len(), size));
    }
    match collm_model::model::available_memory() {
        Some(b) => batches_within(lens, size, m, grad, b / 5 * 4),
        None => Ok(micro_batches(lens.len(), size)),
    }
}

/// [`fitted_batches`] with the byte budget given.
pub fn batches_within(
    lens: &[(usize, usize)],
    size: usize,
    m: &collm_model::ModelConfig,
    grad: bool,
    budget: u64,
) -> Result<Vec<std::ops::Range<usize>>> {
    let bytes = |r: &std::ops::Range<usize>| {
        let part = &lens[r.clone()];
        let len = part.iter().map(|x| x.0).max().unwrap_or(0);
        pass_bytes(m, part.len(), len, part.iter().map(|x| x.1).sum(), grad)
    };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut out = vec![];
    let mut todo: Vec<std::ops::Range<usize>> = micro_batches(lens.len(), size).into_iter().rev().collect();
    while let Some(r) = todo.pop() {
        if bytes(&r) <= budget {
            out.push(r);
        } else if r.len() > 1 {
            let mid = r.start + r.len() / 2;
            todo.push(mid..r.end);
            todo.push(r.start..mid);
        } else {
            bail!(
                "a sequence of {} tokens needs about {:.1} GiB for its {} but only {:.1} GiB of memory is available: shorten the task's texts or its history (task.turns, sampling.max_new_tokens), or use a machine with more memory",
                lens[r.start].0,
                gib(bytes(&r)),
                if grad { "forward and backward pass" } else { "forward pass" },
                gib(budget)
            );
        }
    }
    Ok(out)
}

pub fn agent_lens(seqs: &[AgentSeq]) -> Vec<(usize, usize)> {
    seqs.iter().map(|s| (s.tokens.len(), s.spans.iter().map(|(a, b)| b - a).sum())).collect()
}

fn critic_lens(seqs: &[CriticSeq]) -> Vec<(usize, usize)> {
    seqs.iter().map(|s| (s.tokens.len(), 0)).collect()
}

/// One optimizer step of agent `i` on a mini-batch: every response in `seqs` gets its advantage
/// `adv[id]` in the policy loss (mean over the batch's responses). Returns (loss, grad norm).
pub(crate) fn agent_step(
    p: &mut Agent,
    i: usize,
    rollout: &Rollout,
    seqs: &[AgentSeq],
    adv: &BTreeMap<ResponseId, f64>,
    cfg: &Config,
) -> Result<(f64, f64)> {
    let total: usize = seqs.iter().map(|s| s.ids.len()).sum();
    if total == 0 {
        return Ok((0.0, 0.0));
    }
    let pad = p.tokenizer.pad_id();
    let mut grads = Grads::new();
    let mut loss_sum = 0.0;
    for r in fitted_batches(&agent_lens(seqs), cfg.micro_batch, &p.model.cfg, true)? {
        let part = &seqs[r];
        let (toks, spans) = AgentSeq::batch(part);
        let ids: Vec<ResponseId> = part.iter().flat_map(|s| s.ids.iter().copied()).collect();
        let mut a = Vec::with_capacity(ids.len());
        for id in &ids {
            match adv.get(id) {
                Some(&v) => a.push(v),
                None => bail!("agent {i}: no advantage for the response at node {} sample {}", id.node, id.k),
            }
        }
        let old: Vec<f64> = ids.iter().map(|&id| rollout.old_logprob(i, id)).collect();
        let s = score_spans(&p.model, &toks, &spans, &vec![vec![]; toks.len()], pad, true)?;
        let dev = p.model.device.clone();
        let loss = policy_loss(&s.sums()?, &tensor(&a, &dev)?, &tensor(&old, &dev)?, cfg.clip_ratio, total)?;
        loss_sum += loss.to_scalar::<f32>()? as f64;
        grads.backward(&loss, p.model.trainable())?;
    }
    let norm = grads.clip_norm(cfg.max_grad_norm as f32).map_err(|e| e.context(format!("agent {i}: policy loss")))?;
    p.opt.step(p.model.trainable(), &grads)?;
    Ok((loss_sum, norm as f64))
}

/// A critic's input: one token sequence and the positions whose hidden states give V (or Q) of
/// the nodes `nodes` (in order).
#[derive(Clone, Debug)]
pub struct CriticSeq {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub nodes: Vec<usize>,
}

impl CriticSeq {
    /// The sequence up to its j-th value position, with that one position: the critic's input
    /// for one node alone (the same value, since attention is causal).
    pub fn prefix(&self, j: usize) -> CriticSeq {
        let p = self.positions[j];
        CriticSeq { tokens: self.tokens[..p + 1].to_vec(), positions: vec![p], nodes: vec![self.nodes[j]] }
    }
}

/// The nodes each critic sequence covers: an episode's chain (one pass over its joint history
/// gives V at every turn, since attention is causal), or each node alone when the agents read
/// the turn's observation alone (`agent_input = "observation"`: the critic reads that turn's
/// input too, as CoMLRL 1.3.6's).
pub fn critic_units(rollout: &Rollout, cfg: &Config) -> Vec<Vec<usize>> {
    let chains = rollout.chains();
    match cfg.agent_input {
        AgentInput::History => chains,
        AgentInput::Observation => chains.into_iter().flatten().map(|x| vec![x]).collect(),
    }
}

/// The critic's sequences for one mini-batch: `turn` schedule, each node's own prefix; `buffer`,
/// the sequences of the batch's episodes.
pub fn critic_batch(rollout: &Rollout, units: &[usize], schedule: Schedule, seqs: &[CriticSeq]) -> Vec<CriticSeq> {
    match schedule {
        Schedule::Turn => {
            units.iter().filter_map(|&x| seqs.iter().find_map(|c| c.nodes.iter().position(|&n| n == x).map(|j| c.prefix(j)))).collect()
        }
        Schedule::Buffer => units
            .iter()
            .flat_map(|&e| seqs.iter().filter(move |c| c.nodes.first().is_some_and(|&x| rollout.nodes[x].episode == e)).cloned())
            .collect(),
    }
}

/// The critic's values at rollout time (no gradient): V_old by node (NaN where it has none).
pub(crate) fn critic_values(c: &Critic, seqs: &[CriticSeq], micro: usize, num_nodes: usize) -> Result<Vec<f64>> {
    let mut out = vec![f64::NAN; num_nodes];
    let pad = c.tokenizer.pad_id();
    for r in fitted_batches(&critic_lens(seqs), micro, &c.model.cfg, false)? {
        let part = &seqs[r];
        let toks: Vec<Vec<u32>> = part.iter().map(|s| s.tokens.clone()).collect();
        let pos: Vec<Vec<usize>> = part.iter().map(|s| s.positions.clone()).collect();
        let s = score_spans(&c.model, &toks, &vec![vec![]; toks.len()], &pos, pad, false)?;
        let Some(h) = s.hidden else { continue };
        let v = c.head.forward(&h, false)?.to_vec1::<f32>()?;
        for (x, v) in part.iter().flat_map(|s| s.nodes.iter()).zip(v) {
            out[*x] = v as f64;
        }
    }
    Ok(out)
}

/// One optimizer step of a critic on a mini-batch: loss c_v · mean (y − V_φ)² over its value
/// positions, against the fixed targets `y[node]`. Returns the loss.
pub(crate) fn critic_step(c: &mut Critic, seqs: &[CriticSeq], y: &[f64], cfg: &Config) -> Result<f64> {
    let total: usize = seqs.iter().map(|s| s.positions.len()).sum();
    if total == 0 {
        return Ok(0.0);
    }
    let pad = c.tokenizer.pad_id();
    let mut grads = Grads::new();
    let mut loss_sum = 0.0;
    for r in fitted_batches(&critic_lens(seqs), cfg.micro_batch, &c.model.cfg, true)? {
        let part = &seqs[r];
        let toks: Vec<Vec<u32>> = part.iter().map(|s| s.tokens.clone()).collect();
        let pos: Vec<Vec<usize>> = part.iter().map(|s| s.positions.clone()).collect();
        let s = score_spans(&c.model, &toks, &vec![vec![]; toks.len()], &pos, pad, true)?;
        let Some(h) = s.hidden else { continue };
        let v = c.head.forward(&h, true)?;
        let ys: Vec<f64> = part.iter().flat_map(|s| s.nodes.iter().map(|&x| y[x])).collect();
        let loss = value_loss(&v, &tensor(&ys, &c.model.device)?, cfg.critic.value_coef, total)?;
        loss_sum += loss.to_scalar::<f32>()? as f64;
        grads.backward(&loss, c.trainable())?;
    }
    grads.clip_norm(cfg.max_grad_norm as f32).map_err(|e| e.context("value loss"))?;
    let mut params: Vec<_> = c.model.trainable().collect();
    params.extend(c.head.trainable());
    c.opt.step(params, &grads)?;
    Ok(loss_sum)
}

/// Per-agent tallies of an update's steps.
#[derive(Default)]
pub(crate) struct Tally {
    pub loss: Vec<Vec<f64>>,
    pub norm: Vec<Vec<f64>>,
    pub value_loss: Vec<f64>,
}

impl Tally {
    pub fn new(agents: usize) -> Self {
        Self { loss: vec![vec![]; agents], norm: vec![vec![]; agents], value_loss: vec![] }
    }
    pub fn agent(&mut self, i: usize, (loss, norm): (f64, f64)) {
        self.loss[i].push(loss);
        self.norm[i].push(norm);
    }
    pub fn into_stats(self, mut stats: UpdateStats) -> UpdateStats {
        stats.agent_steps = self.loss.iter().map(|l| l.len()).sum();
        stats.critic_steps = self.value_loss.len();
        stats.policy_loss = self.loss.iter().map(|l| mean(l)).collect();
        stats.grad_norm = self.norm.iter().map(|l| mean(l)).collect();
        if !self.value_loss.is_empty() {
            stats.value_loss = Some(mean(&self.value_loss));
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passes_that_would_not_fit_are_split_and_a_sequence_that_cannot_is_an_error() {
        let m = collm_model::ModelConfig::tiny(collm_model::Arch::Llama, 100);
        // hidden 32, intermediate 64, 2 layers: with gradients 2·(12·32 + 5·64)·8 = 11264 bytes a
        // token, and 12·100 = 1200 per scored position.
        assert_eq!(pass_bytes(&m, 1, 10, 2, true), 10 * 11264 + 2 * 1200);
        let lens = [(10, 2), (10, 2), (10, 2), (10, 2)];
        let one = pass_bytes(&m, 1, 10, 2, true);
        assert_eq!(batches_within(&lens, 0, &m, true, u64::MAX).unwrap(), vec![0..4]);
        assert_eq!(batches_within(&lens, 0, &m, true, 2 * one).unwrap(), vec![0..2, 2..4]);
        assert_eq!(batches_within(&lens, 3, &m, true, 2 * one).unwrap(), vec![0..1, 1..3, 3..4]);
        assert_eq!(batches_within(&lens, 0, &m, true, one).unwrap(), vec![0..1, 1..2, 2..3, 3..4]);
        let e = batches_within(&lens, 0, &m, true, one - 1).unwrap_err().to_string();
        assert!(e.contains("a sequence of 10 tokens needs about") && e.contains("forward and backward pass"), "{e}");
    }

    use super::*;

    #[test]
    fn mini_batches_follow_the_groups_in_order_and_cover_each_unit_once() {
        let groups = vec![vec![0, 1, 2, 3, 4], vec![], vec![5, 6]];
        assert_eq!(mini_batches(&groups, 0, 1), vec![vec![0, 1, 2, 3, 4], vec![5, 6]]);
        let b = mini_batches(&groups, 2, 7);
        assert_eq!(b.iter().map(|m| m.len()).collect::<Vec<_>>(), vec![2, 2, 1, 2]);
        let mut first: Vec<usize> = b[..3].concat();
        first.sort();
        assert_eq!(first, vec![0, 1, 2, 3, 4], "turn 0's batches hold turn 0's nodes");
        assert_eq!(b, mini_batches(&groups, 2, 7), "seeded");
    }

    #[test]
    fn the_clipped_policy_loss_stops_the_gradient_outside_the_trust_region() {
        use candle_core::{Device, Var};
        // Two responses, Â = (+1, −1), log π_old = 0. Response 0 has ρ = e^0.5 > 1 + ε with
        // Â > 0: clipped, no gradient. Response 1 has ρ = e^0.05 inside: gradient −Â·ρ/n.
        let lp = Var::from_slice(&[0.5f32, 0.05], 2, &Device::Cpu).unwrap();
        let adv = Tensor::new(&[1.0f32, -1.0], &Device::Cpu).unwrap();
        let old = Tensor::new(&[0.0f32, 0.0], &Device::Cpu).unwrap();
        let l = policy_loss(lp.as_tensor(), &adv, &old, Some(0.2), 2).unwrap();
        let g = l.backward().unwrap().get(lp.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!(g[0].abs() < 1e-7, "{g:?}");
        assert!((g[1] - 0.05f32.exp() / 2.0).abs() < 1e-6, "{g:?}");
        // −(1.2·1 + e^0.05·(−1)) / 2
        let want = -(1.2 - 0.05f64.exp()) / 2.0;
        assert!((l.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
        // Without clipping: −Σ Â·log π / n.
        let plain = policy_loss(lp.as_tensor(), &adv, &old, None, 2).unwrap().to_scalar::<f32>().unwrap();
        assert!((plain as f64 + (0.5 - 0.05) / 2.0).abs() < 1e-6);
    }
}
