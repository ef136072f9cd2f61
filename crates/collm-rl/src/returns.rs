//! Returns, TD targets, advantages and normalization: the arithmetic every algorithm shares,
//! kept apart from tensors so it can be checked against hand-computed values.

/// TD targets along one executed episode: y_t = r_t + γ·V(h_{t+1}) for t < T−1, and
/// y_{T−1} = r_{T−1} at the last executed turn (the episode ended there: done or truncated).
/// `values[t]` is V_old(h_t) for every executed turn t.
pub fn td_targets(rewards: &[f64], values: &[f64], gamma: f64) -> Vec<f64> {
    assert_eq!(rewards.len(), values.len(), "one value per executed turn");
    let n = rewards.len();
    (0..n).map(|t| if t + 1 < n { rewards[t] + gamma * values[t + 1] } else { rewards[t] }).collect()
}

/// Discounted returns G_t = r_t + γ·G_{t+1} along one episode.
pub fn discounted_returns(rewards: &[f64], gamma: f64) -> Vec<f64> {
    let mut out = vec![0.0; rewards.len()];
    let mut g = 0.0;
    for t in (0..rewards.len()).rev() {
        g = rewards[t] + gamma * g;
        out[t] = g;
    }
    out
}

/// A tree node's return: its reward plus γ times the mean return of its children (none: r).
pub fn tree_return(reward: f64, gamma: f64, child_returns: &[f64]) -> f64 {
    if child_returns.is_empty() {
        reward
    } else {
        reward + gamma * child_returns.iter().sum::<f64>() / child_returns.len() as f64
    }
}

/// How a group of K sampled returns becomes advantages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdvantageMode {
    /// R_k − mean(R) (GRPO / MAGRPO).
    Mean,
    /// R_k − mean of the other K−1 returns (RLOO).
    Rloo,
    /// R_k − max(R) (ReMax-style baseline).
    Max,
    /// R_k (REINFORCE, no baseline).
    Raw,
}

pub fn group_advantages(returns: &[f64], mode: AdvantageMode) -> Vec<f64> {
    let k = returns.len();
    if k == 0 {
        return vec![];
    }
    let sum: f64 = returns.iter().sum();
    let mean = sum / k as f64;
    let max = returns.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    returns
        .iter()
        .map(|&r| match mode {
            AdvantageMode::Mean => r - mean,
            AdvantageMode::Rloo if k > 1 => r - (sum - r) / (k - 1) as f64,
            AdvantageMode::Rloo => 0.0,
            AdvantageMode::Max => r - max,
            AdvantageMode::Raw => r,
        })
        .collect()
}

/// z-normalizes in place as CoMLRL does: (x − mean) / max(std, 1e-6), with the population std.
/// With fewer than two values nothing changes; equal values become 0.
pub fn normalize(x: &mut [f64]) {
    let n = x.len();
    if n < 2 {
        return;
    }
    let mean = x.iter().sum::<f64>() / n as f64;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
    let std = var.sqrt().max(1e-6);
    for v in x.iter_mut() {
        *v = (*v - mean) / std;
    }
}

/// Normalizes `values` within each group that `key` assigns (e.g. per agent and turn).
pub fn normalize_by<K: Ord + Copy>(values: &mut [f64], keys: &[K]) {
    let mut groups: std::collections::BTreeMap<K, Vec<usize>> = Default::default();
    for (i, k) in keys.iter().enumerate() {
        groups.entry(*k).or_default().push(i);
    }
    for idx in groups.values() {
        let mut g: Vec<f64> = idx.iter().map(|&i| values[i]).collect();
        normalize(&mut g);
        for (&i, v) in idx.iter().zip(g) {
            values[i] = v;
        }
    }
}

/// The clipped value loss of one prediction: max((y − V)², (y − V_clip)²) with
/// V_clip = V_old + clip(V − V_old, −ε, ε).
pub fn clipped_value_loss(v: f64, v_old: f64, y: f64, eps: f64) -> f64 {
    let v_clip = v_old + (v - v_old).clamp(-eps, eps);
    (y - v).powi(2).max((y - v_clip).powi(2))
}

/// Whether an episode stops after a turn whose mean reward is `mean_reward`.
pub fn terminates(mean_reward: f64, threshold: Option<f64>) -> bool {
    threshold.is_some_and(|th| mean_reward > th)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-9, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn td_targets_bootstrap_except_at_the_last_turn() {
        // r = (1, 0, 2), V = (0.5, 0.25, 1), γ = 0.9: y = (1 + 0.9·0.25, 0 + 0.9·1, 2).
        close(&td_targets(&[1.0, 0.0, 2.0], &[0.5, 0.25, 1.0], 0.9), &[1.225, 0.9, 2.0]);
        close(&td_targets(&[3.0], &[7.0], 0.9), &[3.0]);
    }

    #[test]
    fn discounted_and_tree_returns() {
        close(&discounted_returns(&[1.0, 0.0, 2.0], 0.5), &[1.5, 1.0, 2.0]);
        assert_eq!(tree_return(1.0, 0.9, &[]), 1.0);
        // 1 + 0.9 · mean(2, 0, 1) = 1.9
        assert!((tree_return(1.0, 0.9, &[2.0, 0.0, 1.0]) - 1.9).abs() < 1e-12);
    }

    #[test]
    fn advantages_in_every_mode() {
        let r = [1.0, 2.0, 6.0];
        close(&group_advantages(&r, AdvantageMode::Mean), &[-2.0, -1.0, 3.0]);
        close(&group_advantages(&r, AdvantageMode::Rloo), &[1.0 - 4.0, 2.0 - 3.5, 6.0 - 1.5]);
        close(&group_advantages(&r, AdvantageMode::Max), &[-5.0, -4.0, 0.0]);
        close(&group_advantages(&r, AdvantageMode::Raw), &[1.0, 2.0, 6.0]);
        close(&group_advantages(&[4.0], AdvantageMode::Rloo), &[0.0]);
    }

    #[test]
    fn normalization() {
        let mut x = [1.0, 3.0];
        normalize(&mut x);
        close(&x, &[-1.0, 1.0]);
        let mut one = [5.0];
        normalize(&mut one);
        close(&one, &[5.0]);
        let mut same = [2.0, 2.0, 2.0];
        normalize(&mut same);
        close(&same, &[0.0, 0.0, 0.0]);
        // Per group: (a: 1, 3) and (b: 10, 10, 40).
        let mut v = [1.0, 10.0, 3.0, 10.0, 40.0];
        normalize_by(&mut v, &['a', 'b', 'a', 'b', 'b']);
        let s = (200.0f64).sqrt(); // std of (10, 10, 40) = √200
        close(&v, &[-1.0, -10.0 / s, 1.0, -10.0 / s, 20.0 / s]);
    }

    #[test]
    fn clipped_value_loss_takes_the_larger_error() {
        // V moved from 1.0 to 2.0, ε = 0.2 → V_clip = 1.2; y = 3: max(1, 3.24) = 3.24.
        assert!((clipped_value_loss(2.0, 1.0, 3.0, 0.2) - 3.24).abs() < 1e-12);
        // y = 1.5: max(0.25, 0.09) = 0.25.
        assert!((clipped_value_loss(2.0, 1.0, 1.5, 0.2) - 0.25).abs() < 1e-12);
        // Inside the clip range both terms agree.
        assert!((clipped_value_loss(1.1, 1.0, 2.0, 0.2) - 0.81).abs() < 1e-12);
    }

    #[test]
    fn early_termination() {
        assert!(terminates(0.1, Some(-0.2)));
        assert!(!terminates(-0.3, Some(-0.2)));
        assert!(!terminates(-0.2, Some(-0.2)), "strictly above the threshold");
        assert!(!terminates(100.0, None));
    }
}
