//! MAGRPO and its Monte Carlo relatives (GRPO for one agent, MA-REINFORCE, MA-RLOO, MA-ReMax).
//!
//! Each agent samples K responses at every node. Joint actions take the k-th sample of every
//! agent (`aligned`, K of them) or every combination (`cross`, K^n, one turn). Over turns the
//! rollout is a tree; a joint action's return is
//!   R = r + γ · mean(returns of the child node's joint actions)      (R = r at a leaf).
//! Agent i's sample k at a node gets the return of its joint action (`cross`: the mean over the
//! joint actions that use it); within the node's group of K:
//!   mean: A = R − mean(R)   rloo: A = R − mean(others)   max: A = R − max(R)   raw: A = R
//! then Â = A z-normalized per agent and per turn over the buffer, and
//!   L_i = −Σ Â · log π_i(a_i | h_i)   (mean over the buffer).

use super::cc::mean;
use super::{actor_step, UpdateStats};
use crate::config::Config;
use crate::returns::{group_advantages, normalize_by, tree_return};
use crate::rollout::Rollout;
use crate::team::Team;
use anyhow::Result;

/// R of every joint action of every node: returns[node][joint].
pub fn joint_returns(rollout: &Rollout, gamma: f64) -> Vec<Vec<f64>> {
    let mut out: Vec<Vec<f64>> = vec![vec![]; rollout.nodes.len()];
    // Children always come after their parents, so a reverse sweep sees children first.
    for x in (0..rollout.nodes.len()).rev() {
        let nd = &rollout.nodes[x];
        out[x] = nd
            .joints
            .iter()
            .map(|j| match j.child {
                Some(c) => tree_return(j.reward, gamma, &out[c]),
                None => j.reward,
            })
            .collect();
    }
    out
}

/// Agent i's K sample returns at node x.
pub fn sample_returns(rollout: &Rollout, returns: &[Vec<f64>], x: usize, i: usize) -> Vec<f64> {
    let nd = &rollout.nodes[x];
    let k = nd.responses[i].len();
    (0..k)
        .map(|kk| {
            let r: Vec<f64> = nd.joints.iter().zip(&returns[x]).filter(|(j, _)| j.choice[i] == kk).map(|(_, &r)| r).collect();
            mean(&r)
        })
        .collect()
}

pub fn update(team: &mut Team, rollout: &Rollout, cfg: &Config) -> Result<UpdateStats> {
    let returns = joint_returns(rollout, cfg.gamma);
    let mode = cfg.advantage_mode();
    let mut stats = UpdateStats::default();
    let mut raw_all = vec![];
    for (i, p) in team.agents.iter_mut().enumerate() {
        let adv_of: Vec<Vec<f64>> =
            (0..rollout.nodes.len()).map(|x| group_advantages(&sample_returns(rollout, &returns, x, i), mode)).collect();
        let seqs = rollout.agent_sequences(i);
        let ids: Vec<(usize, usize)> = seqs.iter().flat_map(|s| s.2.clone()).collect();
        let mut adv: Vec<f64> = ids.iter().map(|&(x, k)| adv_of[x][k]).collect();
        raw_all.extend(adv.iter().cloned());
        let turns: Vec<usize> = ids.iter().map(|&(x, _)| rollout.nodes[x].turn).collect();
        normalize_by(&mut adv, &turns);
        let s: Vec<_> = seqs.into_iter().map(|(t, sp, _)| (t, sp)).collect();
        let (loss, norm) = actor_step(p, &s, &adv, cfg.micro_batch, cfg.max_grad_norm)?;
        stats.policy_loss.push(loss);
        stats.grad_norm.push(norm);
    }
    stats.advantage_mean = mean(&raw_all);
    Ok(stats)
}
