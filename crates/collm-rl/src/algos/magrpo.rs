//! MAGRPO and its Monte Carlo relatives (GRPO for one agent, MA-REINFORCE, MA-RLOO, MA-ReMax).
//!
//! Each agent samples K responses at every node. Joint actions take the k-th sample of every
//! agent (`aligned`, K of them) or every combination (`cross`, K^n, one turn). Over turns the
//! rollout is a tree; a joint action's return is
//!   R = r + γ · mean(returns of the child node's joint actions)      (R = r at a leaf).
//! Agent i's sample k at a node gets the return of its joint action (`cross`: the mean over the
//! joint actions that use it); within the node's group of K:
//!   mean: A = R − mean(R)   rloo: A = R − mean(others)   max: A = R − max(R)   raw: A = R
//! then Â = A z-normalized per agent and per turn over the buffer (`advantage_norm = "agent"`: per
//! agent over all its turns), and
//!   L_i = −Σ Â · log π_i(a_i | h_i)   (mean over the buffer).

use super::cc::mean;
use super::{update_agent, UpdateStats};
use crate::config::Config;
use crate::returns::{group_advantages, tree_return};
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
        let (loss, norm, raw) = update_agent(p, i, rollout, |x, k| adv_of[x][k], cfg)?;
        raw_all.extend(raw);
        stats.policy_loss.push(loss);
        stats.grad_norm.push(norm);
    }
    stats.advantage_mean = mean(&raw_all);
    Ok(stats)
}
