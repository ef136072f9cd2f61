//! MAGRPO and its Monte Carlo relatives (GRPO for one agent, MA-REINFORCE, MA-RLOO, MA-ReMax),
//! as CoMLRL 1.3.6's `MAGRPOTrainer` and its subclasses.
//!
//! Each agent samples K responses at every node. Joint actions take the k-th sample of every
//! agent (`aligned`, K of them) or every combination (`cross`, K^n at every node). Over turns the
//! rollout is a tree; a joint action's return is
//!   R = r + γ · mean(returns of the child node's joint actions)      (R = r at a leaf).
//! Agent i's sample k at a node gets the return of its joint action (`cross`: the sum over the
//! joint actions that use it, as CoMLRL). Within the node's group of K:
//!   mean: A = R − mean(R)   rloo: A = R − mean(others)   max: A = R − max(R)   raw: A = R
//! then, by default (`advantage_norm = "group"`, CoMLRL's `advantage_normalization = True`),
//!   Â = (A − mean(A)) / max(std(A), 1e-6)  within the group,
//! (under which the four modes coincide: use `advantage_norm = "none"` for the estimators as
//! written), and per mini-batch of nodes (a turn group of the buffer, turns in order):
//!   L_i = −mean over the batch's responses of Â · log π_i(a_i | h_i).

use super::{
    agent_batch, agent_step, buffer_sequences, mean, mini_batches, normalize_advantages, schedule_groups, Algorithm, Tally, UpdateCtx,
    UpdateStats,
};
use crate::config::{AdvantageNorm, Algo, Config, JointMode};
use crate::returns::{group_advantages, tree_return, AdvantageMode};
use crate::rollout::{ResponseId, Rollout};
use crate::team::Team;
use anyhow::Result;
use std::collections::BTreeMap;

pub struct Magrpo;

impl Algorithm for Magrpo {
    fn samples_per_node(&self, cfg: &Config) -> usize {
        cfg.k
    }

    fn critics(&self, _: &Config, _: usize) -> usize {
        0
    }

    fn default_advantage_norm(&self) -> AdvantageNorm {
        AdvantageNorm::Group
    }

    fn update(&self, team: &mut Team, rollout: &Rollout, cfg: &Config, ctx: UpdateCtx) -> Result<UpdateStats> {
        let returns = joint_returns(rollout, cfg.gamma);
        let groups = schedule_groups(rollout, cfg.schedule);
        let mut tally = Tally::new(team.agents.len());
        let mut raw_all = vec![];
        for (i, p) in team.agents.iter_mut().enumerate() {
            let mut adv = advantages(rollout, &returns, i, cfg, &|id| ctx.penalty(i, id));
            raw_all.extend(adv.values().copied());
            normalize_advantages(&mut adv, rollout, cfg.advantage_norm());
            let all = buffer_sequences(rollout, i, cfg.schedule);
            for epoch in 0..cfg.epochs {
                let seed = ctx.seed ^ ((i as u64) << 32) ^ (epoch as u64);
                for units in mini_batches(&groups, cfg.mini_batch, seed) {
                    let seqs = agent_batch(rollout, i, &units, cfg.schedule, &all);
                    tally.agent(i, agent_step(p, i, rollout, &seqs, &adv, cfg)?);
                }
            }
        }
        Ok(tally.into_stats(UpdateStats { advantage_mean: mean(&raw_all), ..Default::default() }))
    }
}

/// The advantage mode: the algorithm's own (REINFORCE raw, RLOO leave-one-out, ReMax max), or
/// `advantage` for MAGRPO and GRPO.
pub fn advantage_mode(cfg: &Config) -> AdvantageMode {
    match cfg.algo {
        Algo::Reinforce => AdvantageMode::Raw,
        Algo::Rloo => AdvantageMode::Rloo,
        Algo::Remax => AdvantageMode::Max,
        _ => cfg.advantage,
    }
}

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

/// Agent i's K sample returns at node x: the return of the joint action its sample is in
/// (`aligned`), or the sum over the joint actions that use it (`cross`).
pub fn sample_returns(rollout: &Rollout, returns: &[Vec<f64>], x: usize, i: usize, mode: JointMode) -> Vec<f64> {
    let nd = &rollout.nodes[x];
    (0..nd.responses[i].len())
        .map(|kk| {
            let r = nd.joints.iter().zip(&returns[x]).filter(|(j, _)| j.choice[i] == kk).map(|(_, &r)| r);
            match mode {
                JointMode::Aligned => mean(&r.collect::<Vec<_>>()),
                JointMode::Cross => r.sum(),
            }
        })
        .collect()
}

/// Agent i's advantages (before normalization) of every response in the rollout; `penalty(id)`
/// (the reference-KL penalty, 0 without `kl_coef`) comes off each sample's own return before the
/// group's baseline, as in CoMLRL ≥ 1.3.8 (it does not reach the parents' returns; in `cross`
/// mode it comes off the summed return once, as there).
pub fn advantages(
    rollout: &Rollout,
    returns: &[Vec<f64>],
    i: usize,
    cfg: &Config,
    penalty: &dyn Fn(ResponseId) -> f64,
) -> BTreeMap<ResponseId, f64> {
    let mut out = BTreeMap::new();
    for x in 0..rollout.nodes.len() {
        let mut r = sample_returns(rollout, returns, x, i, cfg.joint_mode);
        for (k, v) in r.iter_mut().enumerate() {
            *v -= penalty(ResponseId { node: x, k });
        }
        let a = group_advantages(&r, advantage_mode(cfg));
        for (k, v) in a.into_iter().enumerate() {
            out.insert(ResponseId { node: x, k }, v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{Joint, Node, Response};

    /// A one-agent, one-turn buffer: one node per group of rewards, K = group size.
    fn buffer(groups: &[&[f64]]) -> Rollout {
        let resp = || Response { tokens: vec![1], text: "a".into(), logprobs: vec![0.0], stopped: true, seed: 0 };
        let nodes = groups
            .iter()
            .enumerate()
            .map(|(e, g)| Node {
                episode: e,
                item: e,
                turn: 0,
                observations: vec!["o".into()],
                histories: vec![vec![0]],
                chunk_texts: vec!["o".into()],
                chunk_lens: vec![1],
                responses: vec![g.iter().map(|_| resp()).collect()],
                joints: g
                    .iter()
                    .enumerate()
                    .map(|(k, &r)| Joint { choice: vec![k], reward: r, child: None, metrics: Default::default() })
                    .collect(),
                past: vec![],
            })
            .collect();
        Rollout { nodes, roots: (0..groups.len()).collect(), num_agents: 1, generated_tokens: 0, gen_s: 0.0 }
    }

    fn adv(algo: &str, norm: Option<&str>, groups: &[&[f64]]) -> Vec<Vec<f64>> {
        let mut o = vec![format!("algo=\"{algo}\"")];
        if let Some(n) = norm {
            o.push(format!("advantage_norm=\"{n}\""));
        }
        let cfg = Config::from_toml("", "t", &o).unwrap();
        let r = buffer(groups);
        let mut a = advantages(&r, &joint_returns(&r, cfg.gamma), 0, &cfg, &|_| 0.0);
        normalize_advantages(&mut a, &r, cfg.advantage_norm());
        groups.iter().enumerate().map(|(x, g)| (0..g.len()).map(|k| a[&ResponseId { node: x, k }]).collect()).collect()
    }

    fn close(a: &[Vec<f64>], b: &[Vec<f64>]) {
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!((x - y).abs() < 1e-9, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn monte_carlo_advantages_are_comlrls() {
        let groups: &[&[f64]] = &[&[0.0, 0.0, 0.0, 0.0], &[1.0, 0.0, 0.0, 0.0]];
        // As written (advantage_norm = "none"): the estimators differ.
        close(&adv("remax", Some("none"), groups), &[vec![0.0; 4], vec![0.0, -1.0, -1.0, -1.0]]);
        close(&adv("magrpo", Some("none"), groups), &[vec![0.0; 4], vec![0.75, -0.25, -0.25, -0.25]]);
        // RLOO: R − mean(others) = K/(K−1) · (R − mean).
        close(&adv("rloo", Some("none"), groups), &[vec![0.0; 4], vec![1.0, -1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0]]);
        close(&adv("reinforce", Some("none"), groups), &[vec![0.0; 4], vec![1.0, 0.0, 0.0, 0.0]]);
        // CoMLRL's default: z-normalized within each node's group, not across the buffer. A group
        // where every sample scored the same learns nothing, in every mode.
        let s = 3f64.sqrt() / 4.0; // the population std of (1, 0, 0, 0)
        let z = vec![0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s];
        for algo in ["magrpo", "rloo", "remax", "reinforce"] {
            close(&adv(algo, None, groups), &[vec![0.0; 4], z.clone()]);
        }
        // Before, per-turn normalization over the buffer gave ReMax's four failures of the first
        // group a positive advantage (they are above the buffer's mean).
        let per_turn = adv("remax", Some("turn"), groups);
        assert!(per_turn[0].iter().all(|&a| a > 0.0), "{per_turn:?}");
    }

    #[test]
    fn the_reference_kl_penalty_comes_off_each_samples_own_return() {
        let cfg = Config::from_toml("algo = \"magrpo\"\nadvantage_norm = \"none\"", "t", &[]).unwrap();
        let r = buffer(&[&[1.0, 1.0]]);
        // Sample 0 strayed from the reference (penalty 0.5): R = (0.5, 1), mean 0.75.
        let pen = |id: ResponseId| if id.k == 0 { 0.5 } else { 0.0 };
        let a = advantages(&r, &joint_returns(&r, cfg.gamma), 0, &cfg, &pen);
        assert_eq!((a[&ResponseId { node: 0, k: 0 }], a[&ResponseId { node: 0, k: 1 }]), (-0.25, 0.25));
    }
}
