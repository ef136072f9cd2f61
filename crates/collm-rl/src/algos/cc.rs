//! CoLLM-CC: one centralized critic V_φ(h_t) over the joint history (or Q_φ(h_t, a_t)).
//!
//!   y_t  = r_t + γ·V_old(h_{t+1})          (y_T = r_T at the last executed turn)
//!   A_t  = y_t − V_old(h_t)                (the advantage of every agent)
//!   Â_t  = A_t normalized per agent and per turn within the rollout buffer (`advantage_norm =
//!          "agent"`: per agent over all its turns)
//!   L_actor_i  = −Σ log π_i(a_i,t | h_i,t) · Â_t   (mean over the buffer)
//!   L_critic   = c_v · (y_t − V_φ(h_t))²          (mean over the buffer)
//!
//! The critic reads the joint history as `[Agent i] …` blocks, turn by turn: every agent's
//! observation, then (for Q) every agent's response. One pass over an episode's whole joint
//! history gives V at every turn, since attention is causal.

use super::{critic_step, td_advantages, update_agent, UpdateStats};
use crate::config::{Config, CriticKind};
use crate::returns::td_targets;
use crate::rollout::Rollout;
use crate::team::Team;
use anyhow::{bail, Result};
use collm_model::Tokenizer;

/// The joint history of one episode chain as critic tokens, and the position whose hidden state
/// gives V(h_t) (end of turn t's observations) or Q(h_t, a_t) (end of its responses).
pub fn joint_sequence(tok: &Tokenizer, rollout: &Rollout, chain: &[usize], kind: CriticKind) -> Result<(Vec<u32>, Vec<usize>)> {
    let mut tokens = Vec::new();
    let mut positions = Vec::new();
    for &x in chain {
        let nd = &rollout.nodes[x];
        let obs: String = nd.observations.iter().enumerate().map(|(i, o)| format!("[Agent {}] {o}\n", i + 1)).collect();
        tokens.extend(tok.encode(&obs, tokens.is_empty())?);
        if kind == CriticKind::V {
            positions.push(tokens.len() - 1);
        }
        let acts: String = nd.responses.iter().enumerate().map(|(i, r)| format!("[Agent {}] {}\n", i + 1, r[0].text)).collect();
        tokens.extend(tok.encode(&acts, false)?);
        if kind == CriticKind::Q {
            positions.push(tokens.len() - 1);
        }
    }
    Ok((tokens, positions))
}

/// One update: the critic's TD step, then (unless `actors` is false: the critic warm-up) every
/// agent's policy-gradient step.
pub fn update(team: &mut Team, rollout: &Rollout, cfg: &Config, actors: bool) -> Result<UpdateStats> {
    if team.critics.len() != 1 {
        bail!("CoLLM-CC needs exactly one critic, the team has {}", team.critics.len());
    }
    let chains = rollout.chains();
    let critic = &mut team.critics[0];
    let seqs: Vec<(Vec<u32>, Vec<usize>)> =
        chains.iter().map(|c| joint_sequence(&critic.tokenizer, rollout, c, cfg.critic.kind)).collect::<Result<_>>()?;
    let rewards: Vec<Vec<f64>> = chains.iter().map(|c| c.iter().map(|&x| rollout.nodes[x].joints[0].reward).collect()).collect();
    let gamma = cfg.gamma;
    let targets = |j: usize, v_old: &[f64]| td_targets(&rewards[j], v_old, gamma);
    let (vy, value_loss) = critic_step(critic, &seqs, &targets, cfg.critic.value_coef, cfg.micro_batch, cfg.max_grad_norm)?;

    // A_t = y_t − V_old(h_t), per node; every agent gets the same advantage.
    let (adv_of, vs, ys) = td_advantages(rollout, &chains, &vy);
    let mut stats = UpdateStats {
        value_loss: Some(value_loss),
        value_mean: Some(mean(&vs)),
        target_mean: Some(mean(&ys)),
        advantage_mean: vs.iter().zip(&ys).map(|(v, y)| y - v).sum::<f64>() / vs.len().max(1) as f64,
        ..Default::default()
    };
    if actors {
        for (i, p) in team.agents.iter_mut().enumerate() {
            let (loss, norm, _) = update_agent(p, i, rollout, |x, _| adv_of[x], cfg)?;
            stats.policy_loss.push(loss);
            stats.grad_norm.push(norm);
        }
    }
    Ok(stats)
}

pub(crate) fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}
