//! CoLLM-DC: a critic per agent, V_φi(h_i,t) (or Q_φi(h_i,t, a_i,t)), on the agent's own history,
//! as CoMLRL 1.3.6's `IACTrainer`.
//!
//!   V_i,old = critic i's value when the buffer was collected (before this update)
//!   y_i,t = r_t + γ·V_i,old(h_i,t+1)        (y_i,T = r_T at the last executed turn)
//!   A_i,t = y_i,t − V_i,old(h_i,t),  z-normalized per agent and per turn (`advantage_norm`)
//!   L_actor_i = −mean Â_i,t · log π_i(a_i,t | h_i,t)   (over a mini-batch)
//!
//! `critic.dc = "separate"`: critic i is its own model; L_critic_i = c_v · mean (y_i,t − V_i)²,
//! stepped right after agent i on the same mini-batch (`schedule = "turn"`).
//! `critic.dc = "head"`: a value head on actor i's backbone, trained jointly in one pass with the
//! clipped value loss c_v · mean max((y − V)², (y − V_old − clip(V − V_old, −ε, ε))²). Clipping
//! acts once the backbone has moved since the rollout: on the later mini-batches and turn groups
//! of an update, and on later `epochs`.

use super::{
    agent_batch, agent_lens, agent_step, buffer_sequences, clipped_value_loss, critic_batch, critic_step, critic_units, critic_values,
    fitted_batches, mean, mini_batches, node_advantages, policy_loss, schedule_groups, td_by_node, tensor, Algorithm, CriticSeq, Tally,
    UpdateCtx, UpdateStats,
};
use crate::config::{AdvantageNorm, Config, CriticKind, DcCritic, PromptFormat, Schedule};
use crate::rollout::{AgentSeq, ResponseId, Rollout};
use crate::team::{Agent, Team};
use anyhow::{bail, Result};
use collm_model::{score_spans, Grads, Tokenizer};
use std::collections::BTreeMap;

pub struct CoLlmDc;

impl Algorithm for CoLlmDc {
    fn samples_per_node(&self, _: &Config) -> usize {
        1
    }

    fn critics(&self, cfg: &Config, num_agents: usize) -> usize {
        match cfg.critic.dc {
            DcCritic::Separate => num_agents,
            DcCritic::Head => 0,
        }
    }

    fn default_advantage_norm(&self) -> AdvantageNorm {
        AdvantageNorm::Turn
    }

    fn update(&self, team: &mut Team, rollout: &Rollout, cfg: &Config, ctx: UpdateCtx) -> Result<UpdateStats> {
        match cfg.critic.dc {
            DcCritic::Separate => update_separate(team, rollout, cfg, ctx),
            DcCritic::Head => update_heads(team, rollout, cfg, ctx),
        }
    }
}

/// Agent i's history of one chain as the critic's tokens, with the V (or Q) positions: each
/// turn's formatted observation, then the response as the agent emitted it, stop token included,
/// when the critic shares the agent's vocabulary (`agent_tok`), else the response's text.
/// `special`: the first chunk gets the tokenizer's special tokens (raw text; a rendered chat
/// template has them).
pub fn local_sequence(
    tok: &Tokenizer,
    agent_tok: &Tokenizer,
    rollout: &Rollout,
    chain: &[usize],
    i: usize,
    kind: CriticKind,
    special: bool,
) -> Result<CriticSeq> {
    let mut tokens = Vec::new();
    let mut positions = Vec::new();
    for &x in chain {
        let nd = &rollout.nodes[x];
        tokens.extend(tok.encode(&nd.chunk_texts[i], special && tokens.is_empty())?);
        if kind == CriticKind::V {
            positions.push(tokens.len() - 1);
        }
        let r = &nd.responses[i][0];
        // The agent's own tokens where the critic reads them alike (the same vocabulary: its stop
        // token included); else the response's text.
        match (tok.decode(&r.tokens, false), agent_tok.decode(&r.tokens, false)) {
            (Ok(a), Ok(b)) if a == b && tok.vocab_size() == agent_tok.vocab_size() => tokens.extend_from_slice(&r.tokens),
            _ => tokens.extend(tok.encode(&r.text, false)?),
        }
        if kind == CriticKind::Q {
            positions.push(tokens.len() - 1);
        }
    }
    Ok(CriticSeq { tokens, positions, nodes: chain.to_vec() })
}

/// Values, targets and advantages of one agent's critic, collected into the update's stats.
#[derive(Default)]
struct Values {
    v: Vec<f64>,
    y: Vec<f64>,
    a: Vec<f64>,
}

impl Values {
    fn add(&mut self, nodes: &[usize], v_old: &[f64], y: &[f64], a: &[f64]) {
        for &x in nodes {
            self.v.push(v_old[x]);
            self.y.push(y[x]);
            self.a.push(a[x]);
        }
    }
    fn stats(&self) -> UpdateStats {
        UpdateStats {
            value_mean: Some(mean(&self.v)),
            target_mean: Some(mean(&self.y)),
            advantage_mean: mean(&self.a),
            ..Default::default()
        }
    }
}

fn update_separate(team: &mut Team, rollout: &Rollout, cfg: &Config, ctx: UpdateCtx) -> Result<UpdateStats> {
    if team.critics.len() != team.agents.len() {
        bail!("CoLLM-DC needs a critic per agent: {} critics for {} agents", team.critics.len(), team.agents.len());
    }
    let chains = rollout.chains();
    let nodes: Vec<usize> = chains.iter().flatten().copied().collect();
    let groups = schedule_groups(rollout, cfg.schedule);
    let mut tally = Tally::new(team.agents.len());
    let mut values = Values::default();
    for (i, (p, critic)) in team.agents.iter_mut().zip(team.critics.iter_mut()).enumerate() {
        let seqs: Vec<CriticSeq> = critic_units(rollout, cfg)
            .iter()
            .map(|c| local_sequence(&critic.tokenizer, &p.tokenizer, rollout, c, i, cfg.critic.kind, p.format == PromptFormat::Raw))
            .collect::<Result<_>>()?;
        let v_old = critic_values(critic, &seqs, cfg.micro_batch, rollout.nodes.len())?;
        let (y, a) = td_by_node(rollout, &chains, &v_old, cfg.gamma, &|x| ctx.penalty(i, ResponseId { node: x, k: 0 }));
        values.add(&nodes, &v_old, &y, &a);
        let adv = node_advantages(rollout, &nodes, &a, cfg);
        let all = buffer_sequences(rollout, i, cfg.schedule);
        for epoch in 0..cfg.epochs {
            for units in mini_batches(&groups, cfg.mini_batch, ctx.seed ^ ((i as u64) << 32) ^ epoch as u64) {
                let critic_first = cfg.schedule == Schedule::Buffer;
                if critic_first {
                    tally.value_loss.push(critic_step(critic, &critic_batch(rollout, &units, cfg.schedule, &seqs), &y, cfg)?);
                }
                if ctx.actors {
                    let batch = agent_batch(rollout, i, &units, cfg.schedule, &all);
                    tally.agent(i, agent_step(p, i, rollout, &batch, &adv, cfg)?);
                }
                if !critic_first {
                    tally.value_loss.push(critic_step(critic, &critic_batch(rollout, &units, cfg.schedule, &seqs), &y, cfg)?);
                }
            }
        }
    }
    Ok(tally.into_stats(values.stats()))
}

/// Where a value head reads a response's value: the last history token before it (V) or its
/// own last token (Q).
fn head_positions(seqs: &[AgentSeq], kind: CriticKind) -> Vec<Vec<usize>> {
    seqs.iter().map(|s| s.spans.iter().map(|&(a, e)| if kind == CriticKind::V { a - 1 } else { e - 1 }).collect()).collect()
}

fn update_heads(team: &mut Team, rollout: &Rollout, cfg: &Config, ctx: UpdateCtx) -> Result<UpdateStats> {
    let chains = rollout.chains();
    let nodes: Vec<usize> = chains.iter().flatten().copied().collect();
    let groups = schedule_groups(rollout, cfg.schedule);
    let mut tally = Tally::new(team.agents.len());
    let mut values = Values::default();
    for (i, p) in team.agents.iter_mut().enumerate() {
        let all = rollout.agent_sequences(i);
        let v_old = head_values(p, i, &all, cfg, rollout.nodes.len())?;
        let (y, a) = td_by_node(rollout, &chains, &v_old, cfg.gamma, &|x| ctx.penalty(i, ResponseId { node: x, k: 0 }));
        values.add(&nodes, &v_old, &y, &a);
        let adv = node_advantages(rollout, &nodes, &a, cfg);
        for epoch in 0..cfg.epochs {
            for units in mini_batches(&groups, cfg.mini_batch, ctx.seed ^ ((i as u64) << 32) ^ epoch as u64) {
                let batch = agent_batch(rollout, i, &units, cfg.schedule, &all);
                let (pl, vl, norm) = head_step(p, i, rollout, &batch, &adv, &v_old, &y, cfg, ctx.actors)?;
                if ctx.actors {
                    tally.agent(i, (pl, norm));
                }
                tally.value_loss.push(vl);
            }
        }
    }
    Ok(tally.into_stats(values.stats()))
}

/// Agent i's value head at rollout time (no gradient): V_old by node.
fn head_values(p: &Agent, i: usize, seqs: &[AgentSeq], cfg: &Config, num_nodes: usize) -> Result<Vec<f64>> {
    let Some(head) = &p.head else { bail!("agent {i} has no value head (critic.dc = \"head\")") };
    let mut out = vec![f64::NAN; num_nodes];
    for r in fitted_batches(&agent_lens(seqs), cfg.micro_batch, &p.model.cfg, false)? {
        let part = &seqs[r];
        let toks: Vec<Vec<u32>> = part.iter().map(|s| s.tokens.clone()).collect();
        let s =
            score_spans(&p.model, &toks, &vec![vec![]; toks.len()], &head_positions(part, cfg.critic.kind), p.tokenizer.pad_id(), false)?;
        let Some(h) = s.hidden else { continue };
        for (id, v) in part.iter().flat_map(|s| s.ids.iter()).zip(head.forward(&h, false)?.to_vec1::<f32>()?) {
            out[id.node] = v as f64;
        }
    }
    Ok(out)
}

/// One joint actor + value-head step for agent i on a mini-batch, one teacher-forced pass per
/// micro-batch: L = L_actor + c_v · clipped value loss. During the critic warm-up (`actors`
/// false) only the value head learns, from the value loss. Returns (policy loss, value loss, norm).
#[allow(clippy::too_many_arguments)]
fn head_step(
    p: &mut Agent,
    i: usize,
    rollout: &Rollout,
    seqs: &[AgentSeq],
    adv: &BTreeMap<ResponseId, f64>,
    v_old: &[f64],
    y: &[f64],
    cfg: &Config,
    actors: bool,
) -> Result<(f64, f64, f64)> {
    let Some(head) = &p.head else { bail!("agent {i} has no value head (critic.dc = \"head\")") };
    let total: usize = seqs.iter().map(|s| s.ids.len()).sum();
    if total == 0 {
        return Ok((0.0, 0.0, 0.0));
    }
    let dev = p.model.device.clone();
    let head_params: Vec<_> = head.trainable().collect();
    let mut grads = Grads::new();
    let (mut pl_sum, mut vl_sum) = (0.0, 0.0);
    for r in fitted_batches(&agent_lens(seqs), cfg.micro_batch, &p.model.cfg, true)? {
        let part = &seqs[r];
        let (toks, spans) = AgentSeq::batch(part);
        let ids: Vec<ResponseId> = part.iter().flat_map(|s| s.ids.iter().copied()).collect();
        let sc = score_spans(&p.model, &toks, &spans, &head_positions(part, cfg.critic.kind), p.tokenizer.pad_id(), true)?;
        let Some(h) = &sc.hidden else { continue };
        let v = head.forward(h, true)?;
        let f = |g: &dyn Fn(&ResponseId) -> f64| tensor(&ids.iter().map(g).collect::<Vec<_>>(), &dev);
        let old_lp = f(&|&id| rollout.old_logprob(i, id))?;
        let pl = policy_loss(&sc.sums()?, &f(&|id| adv[id])?, &old_lp, cfg.clip_ratio, total)?;
        let vl =
            clipped_value_loss(&v, &f(&|id| v_old[id.node])?, &f(&|id| y[id.node])?, cfg.critic.value_clip, cfg.critic.value_coef, total)?;
        let loss = if actors { (&pl + &vl)? } else { vl.clone() };
        pl_sum += pl.to_scalar::<f32>()? as f64;
        vl_sum += vl.to_scalar::<f32>()? as f64;
        grads.backward(&loss, if actors { p.trainable() } else { head_params.clone() })?;
    }
    let norm = grads.clip_norm(cfg.max_grad_norm as f32).map_err(|e| e.context(format!("agent {i}: policy and value loss")))?;
    let mut params: Vec<_> = if actors { p.model.trainable().collect() } else { vec![] };
    params.extend(head_params);
    p.opt.step(params, &grads)?;
    Ok((pl_sum, vl_sum, norm as f64))
}
