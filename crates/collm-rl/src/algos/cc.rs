//! CoLLM-CC: one centralized critic V_φ(h_t) over the joint history (or Q_φ(h_t, a_t)), as
//! CoMLRL 1.3.6's `MAACTrainer`.
//!
//!   V_old(h_t) = the critic's value when the buffer was collected (before this update)
//!   y_t  = r_t + γ·V_old(h_{t+1})          (y_T = r_T at the last executed turn)
//!   A_t  = y_t − V_old(h_t)                (the advantage of every agent)
//!   Â_t  = A_t z-normalized per agent and per turn within the buffer (`advantage_norm`)
//!   L_actor_i  = −mean Â_t · log π_i(a_i,t | h_i,t)   (over a mini-batch)
//!   L_critic   = c_v · mean (y_t − V_φ(h_t))²         (over the same mini-batch)
//!
//! Schedule (`schedule = "turn"`, CoMLRL's): for each agent, for each turn group in order, for
//! each mini-batch: the agent's step, then the critic's step on the same nodes (so the shared
//! critic steps once per agent). `"buffer"`: per mini-batch of episodes, the critic's step over
//! whole chains, then every agent's.
//!
//! The critic reads the joint history as `[Agent i] …` blocks, turn by turn: every agent's
//! observation, then (for Q) every agent's response. One pass over an episode's whole joint
//! history gives V at every turn, since attention is causal. With `agent_input = "observation"`
//! the critic reads each turn's joint observation alone (CoMLRL's `_build_critic_input` over the
//! turn's prompts).

use super::{
    agent_batch, agent_step, buffer_sequences, critic_batch, critic_step, critic_units, critic_values, mean, mini_batches, node_advantages,
    schedule_groups, td_by_node, Algorithm, CriticSeq, Tally, UpdateCtx, UpdateStats,
};
use crate::config::{AdvantageNorm, Config, CriticKind, Schedule};
use crate::rollout::{ResponseId, Rollout};
use crate::team::Team;
use anyhow::{bail, Result};
use collm_model::Tokenizer;

pub struct CoLlmCc;

/// The joint history of one episode chain as critic tokens, and the position whose hidden state
/// gives V(h_t) (end of turn t's observations) or Q(h_t, a_t) (end of its responses).
pub fn joint_sequence(tok: &Tokenizer, rollout: &Rollout, chain: &[usize], kind: CriticKind) -> Result<CriticSeq> {
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
    Ok(CriticSeq { tokens, positions, nodes: chain.to_vec() })
}

impl Algorithm for CoLlmCc {
    fn samples_per_node(&self, _: &Config) -> usize {
        1
    }

    fn critics(&self, _: &Config, _: usize) -> usize {
        1
    }

    fn default_advantage_norm(&self) -> AdvantageNorm {
        AdvantageNorm::Turn
    }

    fn update(&self, team: &mut Team, rollout: &Rollout, cfg: &Config, ctx: UpdateCtx) -> Result<UpdateStats> {
        if team.critics.len() != 1 {
            bail!("CoLLM-CC needs exactly one critic, the team has {}", team.critics.len());
        }
        let chains = rollout.chains();
        let critic = &mut team.critics[0];
        let seqs: Vec<CriticSeq> = critic_units(rollout, cfg)
            .iter()
            .map(|c| joint_sequence(&critic.tokenizer, rollout, c, cfg.critic.kind))
            .collect::<Result<_>>()?;
        let v_old = critic_values(critic, &seqs, cfg.micro_batch, rollout.nodes.len())?;
        let nodes: Vec<usize> = chains.iter().flatten().copied().collect();
        let n = team.agents.len();
        // Every agent gets the same advantage A_t (with `kl_coef`, each its own reward r_t − β·KL_i,t
        // and so its own targets, which the critic learns at that agent's steps), normalized over
        // its own responses.
        let (mut ys, mut adv) = (vec![], vec![]);
        for i in 0..n {
            let (y, a) = td_by_node(rollout, &chains, &v_old, cfg.gamma, &|x| ctx.penalty(i, ResponseId { node: x, k: 0 }));
            ys.push(y);
            adv.push(node_advantages(rollout, &nodes, &a, cfg));
        }
        // The buffer schedule's critic step learns the agents' mean target.
        let y_mean: Vec<f64> = (0..rollout.nodes.len()).map(|x| ys.iter().map(|y| y[x]).sum::<f64>() / n as f64).collect();
        let stats = UpdateStats {
            value_mean: Some(mean(&nodes.iter().map(|&x| v_old[x]).collect::<Vec<_>>())),
            target_mean: Some(mean(&nodes.iter().map(|&x| y_mean[x]).collect::<Vec<_>>())),
            advantage_mean: mean(&nodes.iter().map(|&x| y_mean[x] - v_old[x]).collect::<Vec<_>>()),
            ..Default::default()
        };
        let groups = schedule_groups(rollout, cfg.schedule);
        let all: Vec<_> = (0..n).map(|i| buffer_sequences(rollout, i, cfg.schedule)).collect();
        let mut tally = Tally::new(team.agents.len());
        for epoch in 0..cfg.epochs {
            match cfg.schedule {
                Schedule::Turn => {
                    for (i, p) in team.agents.iter_mut().enumerate() {
                        for units in mini_batches(&groups, cfg.mini_batch, ctx.seed ^ ((i as u64) << 32) ^ epoch as u64) {
                            if ctx.actors {
                                let batch = agent_batch(rollout, i, &units, cfg.schedule, &all[i]);
                                tally.agent(i, agent_step(p, i, rollout, &batch, &adv[i], cfg)?);
                            }
                            let batch = critic_batch(rollout, &units, cfg.schedule, &seqs);
                            tally.value_loss.push(critic_step(critic, &batch, &ys[i], cfg)?);
                        }
                    }
                }
                Schedule::Buffer => {
                    for units in mini_batches(&groups, cfg.mini_batch, ctx.seed ^ epoch as u64) {
                        let batch = critic_batch(rollout, &units, cfg.schedule, &seqs);
                        tally.value_loss.push(critic_step(critic, &batch, &y_mean, cfg)?);
                        if ctx.actors {
                            for (i, p) in team.agents.iter_mut().enumerate() {
                                let batch = agent_batch(rollout, i, &units, cfg.schedule, &all[i]);
                                tally.agent(i, agent_step(p, i, rollout, &batch, &adv[i], cfg)?);
                            }
                        }
                    }
                }
            }
        }
        Ok(tally.into_stats(stats))
    }
}
