//! The fast path changes no result: a rollout that samples every response of the buffer in one
//! batch per agent, with the agents running concurrently and histories held as KV caches, gives
//! the same responses, log-probs and rewards as sampling each response alone from its re-encoded
//! history; and an update over padded batches gives the same losses, values and advantages as one
//! sequence at a time.

use candle_core::{Tensor, Var};
use collm_envs::Split;
use collm_model::generate::{decode, prefill};
use collm_rl::config::{AgentInput, HistoryCache, JointMode};
use collm_rl::rollout::{rollout, RolloutSpec};
use collm_rl::team::Team;
use collm_rl::{Config, Trainer};
use rand::{rngs::StdRng, SeedableRng};
use serde_json::Value;
use std::path::PathBuf;

const BASE: &str = r#"
seed = 3
steps = 10
buffer = 4
gamma = 0.9
[task]
name = "synthetic"
turns = 3
density = "sparse"
symbols = 4
agents = 2
[agents]
model = "tiny"
format = "raw"
lr = 3e-3
[sampling]
max_new_tokens = 3
temperature = 1.0
top_p = 0.9
[critic]
lr = 3e-3
"#;

fn trainer(algo: &str, k: usize, micro_batch: usize, name: &str) -> Trainer {
    trainer_with(algo, k, micro_batch, name, &[])
}

fn trainer_with(algo: &str, k: usize, micro_batch: usize, name: &str, extra: &[&str]) -> Trainer {
    let mut o: Vec<String> = vec![format!("algo=\"{algo}\""), format!("k={}", k.max(2)), format!("micro_batch={micro_batch}")];
    o.extend(extra.iter().map(|s| s.to_string()));
    let c = Config::from_toml(BASE, "test config", &o).unwrap();
    let d: PathBuf = std::env::temp_dir().join(format!("collm-rl-batched-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    Trainer::new(c, &d).unwrap()
}

#[test]
fn batched_concurrent_sampling_equals_sampling_one_response_at_a_time() {
    // MAGRPO with K = 4 samples 16 rows per agent at the first turn (the broadcast kernel's
    // range on a CPU with AVX-512F) and 64 after.
    for (algo, k, input) in [
        ("cc", 1, AgentInput::History),
        ("magrpo", 2, AgentInput::History),
        ("magrpo", 4, AgentInput::History),
        ("cc", 1, AgentInput::Observation),
    ] {
        let t = trainer(algo, k, 0, &format!("sample-{algo}-{input:?}"));
        let items = [0usize, 5, 9, 14];
        let spec = RolloutSpec {
            split: Split::Train,
            items: &items,
            turns: 3,
            k,
            joint_mode: JointMode::Aligned,
            history_cache: HistoryCache::Kv,
            agent_input: input,
            sampling: collm_model::SamplingParams { max_new_tokens: 3, temperature: 1.0, top_p: 0.9, top_k: 0, greedy: false },
            early_termination: None,
            seed: 17,
        };
        let r = rollout(&t.team, t.env.as_ref(), &spec).unwrap();
        let (mut responses, mut joints) = (0, 0);
        let mut rows_per_turn = vec![0usize; 3];
        for node in &r.nodes {
            rows_per_turn[node.turn] += 1;
            for (i, p) in t.team.agents.iter().enumerate() {
                let pad = p.tokenizer.pad_id();
                if input == AgentInput::Observation {
                    // The input is the turn's observation alone, formatted as a first message.
                    let own = p.encode_first(&p.first_text(&node.observations[i]).unwrap()).unwrap();
                    assert_eq!(node.histories[i], own, "{algo}: agent {i}, turn {}: not the observation alone", node.turn);
                }
                for resp in &node.responses[i] {
                    // The straightforward path: this response alone, its whole history re-encoded.
                    let (mut cache, logits) = prefill(&p.model, std::slice::from_ref(&node.histories[i]), pad).unwrap();
                    let mut rng = [StdRng::seed_from_u64(resp.seed)];
                    let g = decode(&p.model, &mut cache, logits, &spec.sampling, &p.tokenizer.stop_ids, &mut rng, pad).unwrap();
                    assert_eq!(g[0].tokens, resp.tokens, "{algo}: agent {i}, turn {}: a different response", node.turn);
                    for (a, b) in g[0].logprobs.iter().zip(&resp.logprobs) {
                        assert!((a - b).abs() <= 1e-4, "{algo}: agent {i}, turn {}: log-prob {a} alone vs {b} batched", node.turn);
                    }
                    responses += 1;
                }
            }
            // The same rewards: each joint action scored on its own.
            for j in &node.joints {
                let mut path = node.past.clone();
                path.push((0..2).map(|i| node.responses[i][j.choice[i]].text.clone()).collect());
                let o = t.env.step(Split::Train, node.item, node.turn, &path).unwrap();
                assert_eq!(o.reward, j.reward, "{algo}: item {}, turn {}", node.item, node.turn);
                joints += 1;
            }
        }
        // Batches really were batches: several rows per agent at every turn (K per node for MAGRPO).
        assert!(rows_per_turn.iter().all(|&n| n >= items.len()), "{algo}: nodes per turn {rows_per_turn:?}");
        assert!(responses >= 2 * 3 * items.len() * k, "{algo}: only {responses} responses compared");
        assert!(joints >= 3 * items.len(), "{algo}: only {joints} joint actions compared");
    }
}

/// Every trainable tensor of a team's agents and critics, in order.
fn weights(team: &Team) -> Vec<&Var> {
    let mut v: Vec<&Var> = team.agents.iter().flat_map(|a| a.trainable()).map(|(_, v)| v).collect();
    v.extend(team.critics.iter().flat_map(|c| c.trainable()).map(|(_, v)| v));
    v
}

fn copies(team: &Team) -> Vec<Tensor> {
    weights(team).iter().map(|v| v.as_tensor().copy().unwrap()).collect()
}

/// Sets `to`'s weights to `from`'s; returns how far apart they were, as a fraction of the update
/// `from` made since `before` (both in L2 over all weights). Adam moves an element whose gradient
/// is near zero by a step of the learning rate's order on a rounding-level difference, so the
/// largest element difference says little; the whole update's direction does.
fn take_weights(from: &Team, to: &Team, before: &[Tensor]) -> f64 {
    let (a, b) = (weights(from), weights(to));
    assert_eq!((a.len(), a.len()), (b.len(), before.len()));
    let sq = |x: &Tensor, y: &Tensor| (x - y).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let (mut apart, mut update) = (0.0, 0.0);
    for ((va, vb), w0) in a.iter().zip(&b).zip(before) {
        apart += sq(va.as_tensor(), vb.as_tensor());
        update += sq(va.as_tensor(), w0);
        vb.set(va.as_tensor()).unwrap();
    }
    assert!(update > 0.0, "the first update changed no weight");
    (apart / update).sqrt()
}

fn close(a: &Value, b: &Value, what: &str) {
    match (a, b) {
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{what}");
            x.iter().zip(y).for_each(|(p, q)| close(p, q, what));
        }
        (Value::Number(_), Value::Number(_)) => {
            let (p, q) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((p - q).abs() <= 1e-4 * (1.0 + p.abs()), "{what}: {p} batched vs {q} one at a time");
        }
        _ => assert_eq!(a, b, "{what}"),
    }
}

#[test]
fn padded_batch_updates_equal_one_sequence_at_a_time() {
    let cases: [(&str, usize, &[&str]); 6] = [
        ("cc", 1, &[]),
        ("dc", 1, &[]),
        ("dc", 1, &["critic.dc=\"head\""]),
        ("magrpo", 2, &[]),
        ("cc", 1, &["schedule=\"buffer\""]),
        ("magrpo", 2, &["schedule=\"buffer\"", "mini_batch=2"]),
    ];
    for (n, (algo, k, extra)) in cases.into_iter().enumerate() {
        let mut batched = trainer_with(algo, k, 0, &format!("upd-b-{algo}-{n}"), extra);
        let mut single = trainer_with(algo, k, 1, &format!("upd-s-{algo}-{n}"), extra);
        let algo = &format!("{algo} {extra:?}");
        // Two steps: the second compares after one update. The updates agree to rounding; the
        // single trainer then takes the batched one's weights, so that a rounding-level difference
        // cannot flip a near-tied sample and make the second step's rollouts differ.
        let before = copies(&batched.team);
        for step in 0..2 {
            if step == 1 {
                let d = take_weights(&batched.team, &single.team, &before);
                assert!(d <= 1e-3, "{algo}: after one update the weights differ by {d} of the update");
            }
            let a = batched.train_step().unwrap();
            let b = single.train_step().unwrap();
            assert_eq!(a["reward_mean"], b["reward_mean"], "{algo}, step {step}: the same rewards");
            let mut keys = vec!["policy_loss", "advantage_mean", "return_mean"];
            if !algo.starts_with("magrpo") {
                keys.extend(["value_loss", "value_mean", "target_mean"]);
            }
            for key in keys {
                assert!(a.get(key).is_some_and(|v| !v.is_null()), "{algo}: no {key} in {a}");
                close(&a[key], &b[key], &format!("{algo}, step {step}, {key}"));
            }
        }
    }
}
