//! CoLLM-DC: a critic per agent, V_φi(h_i,t) (or Q_φi(h_i,t, a_i,t)), on the agent's own history.
//!
//!   y_i,t = r_t + γ·V_i,old(h_i,t+1)        (y_i,T = r_T at the last executed turn)
//!   A_i,t = y_i,t − V_i,old(h_i,t),  normalized per agent and per turn within the buffer
//!           (or per agent over all its turns: `advantage_norm = "agent"`)
//!   L_actor_i = −Σ log π_i(a_i,t | h_i,t) · Â_i,t
//!
//! `critic.dc = "separate"`: critic i is its own model; L_critic_i = c_v · (y_i,t − V_i(h_i,t))².
//! `critic.dc = "head"`: a value head on actor i's backbone, trained jointly with the clipped
//! value loss c_v · max((y − V)², (y − V_old − clip(V − V_old, −ε, ε))²) in the same pass.

use super::cc::mean;
use super::{critic_step, td_advantages, update_agent, UpdateStats};
use crate::config::{Config, CriticKind, DcCritic};
use crate::returns::td_targets;
use crate::rollout::Rollout;
use crate::team::{Policy, Team};
use anyhow::{bail, Result};
use candle_core::Tensor;
use collm_model::{score_spans, Grads, Tokenizer};

/// Agent i's history of one chain as the critic's tokens, with the V (or Q) positions.
pub fn local_sequence(tok: &Tokenizer, rollout: &Rollout, chain: &[usize], i: usize, kind: CriticKind) -> Result<(Vec<u32>, Vec<usize>)> {
    let mut tokens = Vec::new();
    let mut positions = Vec::new();
    for &x in chain {
        let nd = &rollout.nodes[x];
        tokens.extend(tok.encode(&nd.chunk_texts[i], tokens.is_empty())?);
        if kind == CriticKind::V {
            positions.push(tokens.len() - 1);
        }
        tokens.extend(tok.encode(&nd.responses[i][0].text, false)?);
        if kind == CriticKind::Q {
            positions.push(tokens.len() - 1);
        }
    }
    Ok((tokens, positions))
}

/// One update: each critic's TD step, then (unless `actors` is false: the critic warm-up) each
/// agent's policy-gradient step with its own critic's advantages.
pub fn update(team: &mut Team, rollout: &Rollout, cfg: &Config, actors: bool) -> Result<UpdateStats> {
    match cfg.critic.dc {
        DcCritic::Separate => update_separate(team, rollout, cfg, actors),
        DcCritic::Head => update_heads(team, rollout, cfg, actors),
    }
}

fn chain_rewards(rollout: &Rollout, chains: &[Vec<usize>]) -> Vec<Vec<f64>> {
    chains.iter().map(|c| c.iter().map(|&x| rollout.nodes[x].joints[0].reward).collect()).collect()
}

fn update_separate(team: &mut Team, rollout: &Rollout, cfg: &Config, actors: bool) -> Result<UpdateStats> {
    if team.critics.len() != team.agents.len() {
        bail!("CoLLM-DC needs a critic per agent: {} critics for {} agents", team.critics.len(), team.agents.len());
    }
    let chains = rollout.chains();
    let rewards = chain_rewards(rollout, &chains);
    let mut stats = UpdateStats::default();
    let (mut losses, mut vs, mut ys, mut raw) = (vec![], vec![], vec![], vec![]);
    for (i, (p, critic)) in team.agents.iter_mut().zip(team.critics.iter_mut()).enumerate() {
        let seqs: Vec<_> =
            chains.iter().map(|c| local_sequence(&critic.tokenizer, rollout, c, i, cfg.critic.kind)).collect::<Result<_>>()?;
        let targets = |j: usize, v_old: &[f64]| td_targets(&rewards[j], v_old, cfg.gamma);
        let (vy, loss) = critic_step(critic, &seqs, &targets, cfg.critic.value_coef, cfg.micro_batch, cfg.max_grad_norm)?;
        losses.push(loss);
        let (adv_of, v, y) = td_advantages(rollout, &chains, &vy);
        raw.extend(v.iter().zip(&y).map(|(v, y)| y - v));
        vs.extend(v);
        ys.extend(y);
        if actors {
            let (loss, norm, _) = update_agent(p, i, rollout, |x, _| adv_of[x], cfg)?;
            stats.policy_loss.push(loss);
            stats.grad_norm.push(norm);
        }
    }
    stats.value_loss = Some(mean(&losses));
    stats.value_mean = Some(mean(&vs));
    stats.target_mean = Some(mean(&ys));
    stats.advantage_mean = mean(&raw);
    Ok(stats)
}

/// The clipped value loss as a differentiable tensor (see `returns::clipped_value_loss`).
pub fn clipped_value_loss_t(v: &Tensor, v_old: &Tensor, y: &Tensor, eps: f64) -> Result<Tensor> {
    let v_clip = (v_old + (v - v_old)?.clamp(-eps, eps)?)?;
    let a = (y - v)?.sqr()?;
    let b = (y - v_clip)?.sqr()?;
    Ok(a.maximum(&b)?)
}

fn update_heads(team: &mut Team, rollout: &Rollout, cfg: &Config, actors: bool) -> Result<UpdateStats> {
    let mut stats = UpdateStats::default();
    let (mut losses, mut vs, mut ys, mut raw) = (vec![], vec![], vec![], vec![]);
    for (i, p) in team.agents.iter_mut().enumerate() {
        let (pl, vl, norm, v_old, y) = head_step(p, i, rollout, cfg, actors)?;
        stats.policy_loss.push(pl);
        stats.grad_norm.push(norm);
        losses.push(vl);
        raw.extend(y.iter().zip(&v_old).map(|(a, b)| a - b));
        vs.extend(v_old);
        ys.extend(y);
    }
    stats.value_loss = Some(mean(&losses));
    stats.value_mean = Some(mean(&vs));
    stats.target_mean = Some(mean(&ys));
    stats.advantage_mean = mean(&raw);
    Ok(stats)
}

/// One joint actor + value-head step for agent i, in one teacher-forced pass over every chain.
/// During the critic warm-up (`actors` false) only the value head learns, from the value loss.
#[allow(clippy::type_complexity)]
fn head_step(p: &mut Policy, i: usize, rollout: &Rollout, cfg: &Config, actors: bool) -> Result<(f64, f64, f64, Vec<f64>, Vec<f64>)> {
    let Some(head) = &p.head else { bail!("agent {i} has no value head (critic.dc = \"head\")") };
    let seqs = rollout.agent_sequences(i);
    let mut positions = Vec::new();
    for (_, spans, _) in &seqs {
        positions.push(spans.iter().map(|&(s, e)| if cfg.critic.kind == CriticKind::V { s - 1 } else { e - 1 }).collect::<Vec<_>>());
    }
    let toks: Vec<Vec<u32>> = seqs.iter().map(|s| s.0.clone()).collect();
    let spans: Vec<Vec<(usize, usize)>> = seqs.iter().map(|s| s.1.clone()).collect();
    let sc = score_spans(&p.model, &toks, &spans, &positions, p.tokenizer.pad_id(), true)?;
    let Some(h) = &sc.hidden else { return Ok((0.0, 0.0, 0.0, vec![], vec![])) };
    let v = head.forward(h, true)?;
    let v_old: Vec<f64> = v.to_vec1::<f32>()?.into_iter().map(|x| x as f64).collect();
    // Targets and advantages chain by chain (the spans of a chain are its turns in order).
    let (mut y, mut adv, mut turns) = (vec![], vec![], vec![]);
    let mut off = 0;
    for (_, sp, ids) in &seqs {
        let n = sp.len();
        let r: Vec<f64> = ids.iter().map(|&(x, _)| rollout.nodes[x].joints[0].reward).collect();
        let yy = td_targets(&r, &v_old[off..off + n], cfg.gamma);
        for (j, &(x, _)) in ids.iter().enumerate() {
            adv.push(yy[j] - v_old[off + j]);
            turns.push(rollout.nodes[x].turn);
        }
        y.extend(yy);
        off += n;
    }
    let mut adv_n = adv.clone();
    super::normalize_advantages(&mut adv_n, &turns, cfg.advantage_norm);
    let n = adv.len() as f64;
    let dev = &p.model.device;
    let f = |x: &[f64]| Tensor::from_vec(x.iter().map(|&v| v as f32).collect::<Vec<_>>(), x.len(), dev);
    let policy_loss = ((sc.sums()? * f(&adv_n)?)?.sum_all()? / -n)?;
    let value_loss = (clipped_value_loss_t(&v, &f(&v_old)?, &f(&y)?, cfg.critic.value_clip)?.sum_all()? * (cfg.critic.value_coef / n))?;
    let loss = if actors { (&policy_loss + &value_loss)? } else { value_loss.clone() };
    let store = loss.backward()?;
    let mut grads = Grads::new();
    let head_params: Vec<_> = head.trainable().collect();
    if actors {
        grads.accumulate(&store, p.trainable())?;
    } else {
        grads.accumulate(&store, head_params.iter().copied())?;
    }
    let norm = grads.clip_norm(cfg.max_grad_norm as f32)?;
    let mut params: Vec<_> = if actors { p.model.trainable().collect() } else { vec![] };
    params.extend(head_params);
    p.opt.step(params, &grads)?;
    Ok((policy_loss.to_scalar::<f32>()? as f64, value_loss.to_scalar::<f32>()? as f64, norm as f64, v_old, y))
}
