//! The trainer on the synthetic tasks with tiny models from random init: every algorithm learns,
//! KV-cache histories give the same numbers as re-encoded text, resume reproduces the
//! uninterrupted run, and failures are clear and leave the last checkpoint intact.

use collm_envs::{Env, Outcome, Split};
use collm_model::score_spans;
use collm_rl::algos::cc::joint_sequence;
use collm_rl::config::{AgentInput, CriticKind, HistoryCache, Schedule};
use collm_rl::rollout::{rollout, AgentSeq, RolloutSpec};
use collm_rl::trainer::{latest_checkpoint, load_checkpoint, save_checkpoint};
use collm_rl::{Config, Trainer};
use serde_json::Value;
use std::path::{Path, PathBuf};

// Tiny models from random init learn at a far higher rate than CoMLRL's 5e-6, and need the
// gradient clipping that CoMLRL (and collm by default) does not do.
const BASE: &str = r#"
seed = 0
steps = 120
buffer = 16
gamma = 0.9
k = 4
max_grad_norm = 1.0
[task]
name = "synthetic"
turns = 2
density = "dense"
symbols = 4
agents = 2
[agents]
model = "tiny"
format = "raw"
lr = 1.5e-3
[sampling]
max_new_tokens = 1
temperature = 1.0
top_p = 1.0
[critic]
lr = 1e-3
"#;

fn cfg(overrides: &[&str]) -> Config {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::from_toml(BASE, "test config", &o).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("collm-rl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn rewards(lines: &[Value]) -> Vec<f64> {
    lines.iter().filter_map(|l| l["reward_mean"].as_f64()).collect()
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

#[test]
fn every_algorithm_raises_the_reward_on_a_short_dense_task() {
    // A uniformly random policy over the ~46-token vocabulary scores about 0.02 here, and the best
    // policy that ignores its observations (one constant symbol) scores 1/4 = 0.25. Every method
    // must end well above that constant policy (measured on seed 0 with CoMLRL's turn schedule:
    // 0.85 to 0.99; the Q critic and the value heads learn more slowly and get 200 steps).
    // Under CoMLRL's default group normalization ReMax, RLOO and REINFORCE equal MAGRPO (see
    // `rloo_differs_from_magrpo_only_without_group_normalization`).
    for (name, extra) in [
        ("cc", vec![]),
        ("cc", vec!["critic.kind=\"q\"", "steps=200"]),
        ("dc", vec![]),
        ("dc", vec!["critic.dc=\"head\"", "steps=200"]),
        ("magrpo", vec![]),
        ("rloo", vec!["advantage_norm=\"none\""]),
        ("reinforce", vec!["advantage_norm=\"none\""]),
        ("remax", vec![]),
    ] {
        let mut o = vec![format!("algo=\"{name}\"")];
        o.extend(extra.iter().map(|s| s.to_string()));
        let o: Vec<&str> = o.iter().map(|s| s.as_str()).collect();
        let mut t = Trainer::new(cfg(&o), &tmp(&format!("learn-{name}-{}", extra.len()))).unwrap();
        let r = rewards(&t.run(false).unwrap());
        let (first, last) = (mean(&r[..10]), mean(&r[r.len() - 20..]));
        assert!(first < 0.08, "{name} {extra:?}: starts at {first}");
        assert!(last > 0.6, "{name} {extra:?}: reward went from {first} to {last}");
    }
}

/// Agent 0's weights after one update of a fresh team with these overrides.
fn after_one_update(name: &str, o: &[&str]) -> (Vec<Vec<f32>>, Value) {
    let mut t = Trainer::new(cfg(o), &tmp(name)).unwrap();
    let line = t.train_step().unwrap();
    (weights(&t.team.agents[0].model), line)
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// `agents.frozen_dtype = "bf16"` holds a LoRA team's frozen base in bf16 and the team trains:
/// over two updates the adapters move and the base stays as it was loaded.
#[test]
fn a_lora_team_holds_its_frozen_base_in_bf16_and_trains() {
    let o = ["algo=\"cc\"", "agents.lora_rank=4", "agents.frozen_dtype=\"bf16\"", "steps=2"];
    let mut t = Trainer::new(cfg(&o), &tmp("bf16-base")).unwrap();
    let snapshot = |t: &Trainer| -> Vec<(String, bool, Vec<f32>)> {
        let m = &t.team.agents[0].model;
        m.tensors()
            .unwrap()
            .into_iter()
            .map(|(n, w)| (n.clone(), m.params[&n].trainable, w.flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    };
    for a in &t.team.agents {
        assert_eq!(a.model.frozen_dtype(), Some(candle_core::DType::BF16));
        assert_eq!(a.model.dtype(), candle_core::DType::F32);
    }
    let before = snapshot(&t);
    let mut want: Vec<Value> = vec![];
    for _ in 0..2 {
        let line = t.train_step().unwrap();
        assert!(line["reward_mean"].as_f64().unwrap().is_finite(), "{line}");
        want.push(strip_timing(&line));
    }
    let after = snapshot(&t);
    let mut moved = 0;
    for ((name, trains, w0), (_, _, w1)) in before.iter().zip(&after) {
        if *trains {
            moved += (w0 != w1) as usize;
        } else {
            assert_eq!(w0, w1, "the frozen {name} changed");
        }
    }
    assert!(moved > 0, "no adapter moved");
    // A checkpoint of such a run resumes into a bf16 base and goes on as the uninterrupted run
    // above (whose step lines are what `run` returns).
    let dir = tmp("bf16-base-resumed");
    let mut k = Trainer::new(cfg(&o), &dir).unwrap();
    k.train_step().unwrap();
    save_checkpoint(&k.team, &k.cfg, 1, &dir).unwrap();
    drop(k);
    let mut r = Trainer::resume(&dir).unwrap();
    assert!(r.team.agents.iter().all(|a| a.model.frozen_dtype() == Some(candle_core::DType::BF16)));
    let got: Vec<Value> = r.run(false).unwrap().iter().map(strip_timing).collect();
    assert_eq!(got, want[1..].to_vec());
}

#[test]
fn rloo_differs_from_magrpo_only_without_group_normalization() {
    // As written, RLOO's advantage is K/(K−1) times MAGRPO's: a different first update.
    let (m, _) = after_one_update("rloo-vs-magrpo-m", &["algo=\"magrpo\"", "advantage_norm=\"none\""]);
    let (r, _) = after_one_update("rloo-vs-magrpo-r", &["algo=\"rloo\"", "advantage_norm=\"none\""]);
    assert!(max_diff(&m, &r) > 1e-6, "RLOO's first update equals MAGRPO's");
    // CoMLRL's default z-normalizes each node's group, which removes that factor: the same update.
    let (m, _) = after_one_update("rloo-vs-magrpo-mg", &["algo=\"magrpo\""]);
    let (r, _) = after_one_update("rloo-vs-magrpo-rg", &["algo=\"rloo\""]);
    assert!(max_diff(&m, &r) < 1e-6);
}

#[test]
fn dc_value_heads_clip_against_the_rollout_time_values() {
    // With CoMLRL's turn schedule the backbone moves at turn 0's step, so at turn 1's step V has
    // left V_old (recorded at rollout time) and the clip range matters. Before, V_old was the
    // detached V of the same pass: V − V_old = 0, and any ε gave the same update.
    let base = ["algo=\"dc\"", "critic.dc=\"head\"", "agents.lr=1e-2"];
    let run = |eps: &str, name: &str| {
        let mut o = base.to_vec();
        let e = format!("critic.value_clip={eps}");
        o.push(&e);
        let mut t = Trainer::new(cfg(&o), &tmp(name)).unwrap();
        t.train_step().unwrap();
        let h = t.team.agents[0].head.as_ref().unwrap();
        (
            weights(&t.team.agents[0].model),
            h.tensors().values().map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect::<Vec<_>>(),
        )
    };
    let (tight_w, tight_h) = run("1e-6", "clip-tight");
    let (loose_w, loose_h) = run("1e6", "clip-loose");
    assert!(max_diff(&tight_w, &loose_w) > 1e-7 || max_diff(&tight_h, &loose_h) > 1e-7, "the clip range changed nothing");
}

#[test]
fn the_schedule_steps_per_turn_group_and_mini_batch() {
    // 2 agents, 2 turns, 16 episodes. CoMLRL's schedule: each agent steps once per turn group;
    // the shared critic steps after each agent's step.
    let (_, l) = after_one_update("sched-turn", &["algo=\"cc\""]);
    assert_eq!((l["agent_steps"].as_u64(), l["critic_steps"].as_u64()), (Some(4), Some(4)), "{l}");
    // Mini-batches of 4 nodes: 4 per turn group.
    let (_, l) = after_one_update("sched-mb", &["algo=\"cc\"", "mini_batch=4"]);
    assert_eq!((l["agent_steps"].as_u64(), l["critic_steps"].as_u64()), (Some(16), Some(16)), "{l}");
    // One step per buffer: the critic once, each agent once; epochs repeat the pass.
    let (_, l) = after_one_update("sched-buf", &["algo=\"cc\"", "schedule=\"buffer\"", "epochs=2"]);
    assert_eq!((l["agent_steps"].as_u64(), l["critic_steps"].as_u64()), (Some(4), Some(2)), "{l}");
    // MAGRPO: per agent and turn group, over all K samples of the group's nodes.
    let (_, l) = after_one_update("sched-magrpo", &["algo=\"magrpo\"", "k=2", "buffer=4"]);
    assert_eq!(l["agent_steps"].as_u64(), Some(4), "{l}");
    // With one turn the two schedules agree for DC (each agent's step reads only rollout-time values).
    let one = ["algo=\"dc\"", "task.turns=1"];
    let (a, _) = after_one_update("sched-dc-turn", &one);
    let (b, _) = after_one_update("sched-dc-buf", &[one[0], one[1], "schedule=\"buffer\""]);
    assert!(max_diff(&a, &b) < 1e-6);
    // With two they differ: turn 1's step starts from the weights turn 0's step left.
    let (a, _) = after_one_update("sched-dc-turn2", &["algo=\"dc\""]);
    let (b, _) = after_one_update("sched-dc-buf2", &["algo=\"dc\"", "schedule=\"buffer\""]);
    assert!(max_diff(&a, &b) > 1e-6);
}

/// The synthetic task, but turn 0's reward is 1 for even items (so `early_termination = 0.5`
/// ends those episodes there) and 0 for odd ones. With `one_item`, every item shows item 0's
/// observations, so that two episodes differ only by their random streams.
struct EvenItemsPay {
    inner: collm_envs::synthetic::Synthetic,
    one_item: bool,
}

impl EvenItemsPay {
    fn new(turns: usize, one_item: bool) -> Self {
        Self { inner: collm_envs::synthetic::Synthetic::new(4, 2, turns, collm_envs::synthetic::Density::Dense).unwrap(), one_item }
    }
    fn shown(&self, item: usize) -> usize {
        if self.one_item {
            0
        } else {
            item
        }
    }
}

impl Env for EvenItemsPay {
    fn name(&self) -> &str {
        "even-items-pay"
    }
    fn num_agents(&self) -> usize {
        2
    }
    fn len(&self, s: Split) -> usize {
        self.inner.len(s)
    }
    fn reset(&self, s: Split, item: usize) -> anyhow::Result<Vec<String>> {
        self.inner.reset(s, self.shown(item))
    }
    fn step(&self, s: Split, item: usize, turn: usize, j: &[Vec<String>]) -> anyhow::Result<Outcome> {
        let mut o = self.inner.step(s, self.shown(item), turn, j)?;
        if turn == 0 {
            o.reward = if item % 2 == 0 { 1.0 } else { 0.0 };
        }
        Ok(o)
    }
}

#[test]
fn early_termination_ends_episodes_inside_a_rollout_and_every_method_updates() {
    for algo in ["cc", "dc", "magrpo"] {
        let mut t =
            Trainer::new(cfg(&[&format!("algo=\"{algo}\""), "early_termination=0.5", "k=2", "buffer=8"]), &tmp(&format!("early-{algo}")))
                .unwrap();
        t.env = Box::new(EvenItemsPay::new(2, false));
        let r = t.rollout_for_step(0).unwrap();
        for nd in &r.nodes {
            let ends = nd.item % 2 == 0;
            if nd.turn == 0 {
                assert_eq!(nd.joints.iter().all(|j| j.child.is_none()), ends, "{algo}: item {}", nd.item);
            } else {
                assert!(!ends, "{algo}: item {} went on past turn 0", nd.item);
            }
        }
        assert!(r.nodes.iter().any(|n| n.turn == 1) && r.roots.iter().any(|&x| r.nodes[x].item % 2 == 0));
        let stats = t.update(&r).unwrap();
        assert!(stats.policy_loss.iter().all(|l| l.is_finite()), "{algo}: {stats:?}");
        if algo == "cc" {
            // An ended episode's target is its reward, 1, with no bootstrap: the mean target is
            // pulled up by the even items' turn-0 nodes.
            assert!(stats.target_mean.unwrap() > 0.2, "{stats:?}");
        }
    }
}

/// One teacher-forced pass over agent i's sequences `seqs` of rollout `r` gives the log-probs its
/// sampling pass recorded for every response they cover (within 1e-4).
fn assert_scoring_reproduces_sampling(p: &collm_rl::team::Agent, r: &collm_rl::rollout::Rollout, i: usize, seqs: &[AgentSeq]) {
    let (toks, spans) = AgentSeq::batch(seqs);
    let s = score_spans(&p.model, &toks, &spans, &vec![vec![]; toks.len()], p.tokenizer.pad_id(), false).unwrap();
    let got = s.token_logprobs.to_vec1::<f32>().unwrap();
    let want: Vec<f32> =
        seqs.iter().flat_map(|s| s.ids.iter().flat_map(|id| r.nodes[id.node].responses[i][id.k].logprobs.clone())).collect();
    assert_eq!(got.len(), want.len());
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst <= 1e-4, "teacher-forced vs sampling log-probs: {worst}");
}

fn spec<'a>(items: &'a [usize], history_cache: HistoryCache, k: usize) -> RolloutSpec<'a> {
    RolloutSpec {
        split: Split::Train,
        items,
        turns: 3,
        k,
        joint_mode: collm_rl::config::JointMode::Aligned,
        history_cache,
        agent_input: AgentInput::History,
        sampling: collm_model::SamplingParams { max_new_tokens: 3, temperature: 1.0, top_p: 1.0, top_k: 0, greedy: false },
        early_termination: None,
        seed: 11,
    }
}

#[test]
fn kv_and_text_histories_give_the_same_log_probs_and_values() {
    for k in [1, 2] {
        let algo = if k == 1 { "cc" } else { "magrpo" };
        let c = cfg(&[&format!("algo=\"{algo}\""), "task.turns=3", &format!("k={}", k.max(2))]);
        let t = Trainer::new(c, &tmp(&format!("kv-{k}"))).unwrap();
        let items = [0usize, 5, 9, 14];
        let kv = rollout(&t.team, t.env.as_ref(), &spec(&items, HistoryCache::Kv, k)).unwrap();
        let text = rollout(&t.team, t.env.as_ref(), &spec(&items, HistoryCache::Text, k)).unwrap();
        assert_eq!(kv.nodes.len(), text.nodes.len());
        let mut compared = 0;
        for (a, b) in kv.nodes.iter().zip(&text.nodes) {
            assert_eq!(a.histories, b.histories, "same seeds, same histories");
            for (ra, rb) in a.responses.iter().zip(&b.responses) {
                for (x, y) in ra.iter().zip(rb) {
                    assert_eq!(x.tokens, y.tokens);
                    for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
                        assert!((p - q).abs() <= 1e-4, "sampling log-probs differ: {p} vs {q}");
                        compared += 1;
                    }
                }
            }
        }
        assert!(compared > 20);
        // The teacher-forced pass over whole histories reproduces the sampling pass's log-probs.
        for i in 0..2 {
            let seqs = kv.agent_sequences(i);
            assert_scoring_reproduces_sampling(&t.team.agents[i], &kv, i, &seqs);
            // Every response of the tree is scored exactly once.
            let n_resp: usize = kv.nodes.iter().map(|n| n.responses[i].len()).sum();
            assert_eq!(seqs.iter().map(|s| s.ids.len()).sum::<usize>(), n_resp);
        }
        if k == 1 {
            // The centralized critic's values at every turn: one pass over the whole joint
            // history equals a pass over each prefix h_t on its own.
            let c = Trainer::new(cfg(&["algo=\"cc\"", "task.turns=3"]), &tmp("kv-critic")).unwrap();
            let critic = &c.team.critics[0];
            for chain in kv.chains() {
                let js = joint_sequence(&critic.tokenizer, &kv, &chain, CriticKind::V).unwrap();
                let (toks, pos) = (js.tokens, js.positions);
                let pad = critic.tokenizer.pad_id();
                let whole = score_spans(&critic.model, &[toks.clone()], &[vec![]], &[pos.clone()], pad, false).unwrap();
                let v_whole = critic.head.forward(&whole.hidden.unwrap(), false).unwrap().to_vec1::<f32>().unwrap();
                for (j, &p) in pos.iter().enumerate() {
                    let prefix = score_spans(&critic.model, &[toks[..=p].to_vec()], &[vec![]], &[vec![p]], pad, false).unwrap();
                    let v = critic.head.forward(&prefix.hidden.unwrap(), false).unwrap().to_vec1::<f32>().unwrap()[0];
                    assert!((v - v_whole[j]).abs() <= 1e-4, "V(h_{j}): {v} vs {}", v_whole[j]);
                }
            }
        }
    }
}

#[test]
fn an_agent_that_reads_the_observation_alone_is_scored_and_valued_on_that_turn_alone() {
    let c = cfg(&["algo=\"cc\"", "task.turns=3", "agent_input=\"observation\""]);
    let t = Trainer::new(c.clone(), &tmp("obs-input")).unwrap();
    let items = [0usize, 5, 9, 14];
    let mut sp = spec(&items, HistoryCache::Kv, 1);
    sp.agent_input = AgentInput::Observation;
    let r = rollout(&t.team, t.env.as_ref(), &sp).unwrap();
    assert!(r.nodes.iter().any(|n| n.turn == 2), "the episodes reach a third turn");
    for i in 0..2 {
        let p = &t.team.agents[i];
        // Every response is its own sequence: its turn's input, then the response.
        let seqs = r.agent_sequences(i);
        assert_eq!(seqs.len(), r.nodes.len());
        for s in &seqs {
            let nd = &r.nodes[s.ids[0].node];
            assert_eq!(s.ids.len(), 1);
            assert_eq!(s.tokens[..s.spans[0].0], nd.histories[i][..]);
        }
        // The teacher-forced pass over those inputs reproduces the sampling pass's log-probs.
        assert_scoring_reproduces_sampling(p, &r, i, &seqs);
    }
    // The centralized critic reads each turn's joint observation alone, under either schedule.
    let critic = &t.team.critics[0];
    let seqs: Vec<_> =
        collm_rl::algos::critic_units(&r, &c).iter().map(|u| joint_sequence(&critic.tokenizer, &r, u, CriticKind::V).unwrap()).collect();
    let all: Vec<usize> = (0..r.nodes.len()).collect();
    let by_turn = collm_rl::algos::critic_batch(&r, &all, Schedule::Turn, &seqs);
    assert_eq!(by_turn.len(), r.nodes.len());
    for (x, s) in all.iter().zip(&by_turn) {
        assert_eq!(s.nodes, vec![*x]);
        let own = joint_sequence(&critic.tokenizer, &r, &[*x], CriticKind::V).unwrap();
        assert_eq!(s.tokens, own.tokens[..=own.positions[0]], "node {x}: the turn's joint observation alone");
    }
    let episodes: Vec<usize> = (0..items.len()).collect();
    let by_episode = collm_rl::algos::critic_batch(&r, &episodes, Schedule::Buffer, &seqs);
    let mut covered: Vec<usize> = by_episode.iter().flat_map(|s| s.nodes.clone()).collect();
    covered.sort();
    assert_eq!(covered, all, "every node's sequence, once");
    // Under the default the critic reads the chain so far: a later turn's input is longer.
    let mut hist = c.clone();
    hist.agent_input = AgentInput::History;
    let chains: Vec<_> =
        collm_rl::algos::critic_units(&r, &hist).iter().map(|u| joint_sequence(&critic.tokenizer, &r, u, CriticKind::V).unwrap()).collect();
    assert_eq!(chains.len(), items.len());
    let whole = collm_rl::algos::critic_batch(&r, &all, Schedule::Turn, &chains);
    for (x, (a, b)) in all.iter().zip(whole.iter().zip(&by_turn)) {
        if r.nodes[*x].turn > 0 {
            assert!(a.tokens.len() > b.tokens.len() && a.tokens.ends_with(&b.tokens[b.tokens.len() - 3..]), "node {x}");
        }
    }
    // Each algorithm trains on such rollouts.
    for algo in ["cc", "dc", "magrpo"] {
        let c = cfg(&[&format!("algo=\"{algo}\""), "steps=2", "buffer=4", "agent_input=\"observation\""]);
        let lines = Trainer::new(c, &tmp(&format!("obs-{algo}"))).unwrap().run(false).unwrap();
        assert_eq!(lines.len(), 2, "{algo}");
        for l in &lines {
            assert!(l["reward_mean"].as_f64().is_some_and(f64::is_finite), "{algo}: {l}");
            for a in l["policy_loss"].as_array().unwrap() {
                assert!(a.as_f64().is_some_and(f64::is_finite), "{algo}: {l}");
            }
        }
    }
}

fn strip_timing(v: &Value) -> Value {
    let mut v = v.clone();
    for k in ["gen_s", "update_s", "step_s", "tokens_per_s"] {
        v.as_object_mut().unwrap().remove(k);
    }
    v
}

#[test]
fn resume_after_a_kill_reproduces_the_uninterrupted_run() {
    // bf16: the optimizer's f32 master weights travel in the checkpoint, so bf16 resumes exactly too.
    for (algo, dtype) in [("cc", "f32"), ("magrpo", "f32"), ("cc", "bf16")] {
        let c = cfg(&[&format!("algo=\"{algo}\""), "steps=6", "checkpoint_every=3", "buffer=4", &format!("agents.dtype=\"{dtype}\"")]);
        let algo = format!("{algo}-{dtype}");
        let mut full = Trainer::new(c.clone(), &tmp(&format!("full-{algo}"))).unwrap();
        let want_dtype = if dtype == "bf16" { candle_core::DType::BF16 } else { candle_core::DType::F32 };
        assert!(full
            .team
            .agents
            .iter()
            .map(|a| &a.model)
            .chain(full.team.critics.iter().map(|c| &c.model))
            .all(|m| m.dtype() == want_dtype));
        let want: Vec<Value> = full.run(false).unwrap().iter().map(strip_timing).collect();

        let dir = tmp(&format!("killed-{algo}"));
        let mut t = Trainer::new(c, &dir).unwrap();
        for _ in 0..4 {
            t.train_step().unwrap();
            if t.step == 3 {
                save_checkpoint(&t.team, &t.cfg, 3, &dir).unwrap();
            }
        }
        drop(t); // killed after step 4, before its checkpoint
        let mut r = Trainer::resume(&dir).unwrap();
        assert_eq!(r.step, 3);
        let got: Vec<Value> = r.run(false).unwrap().iter().map(strip_timing).collect();
        assert_eq!(got, want[3..].to_vec(), "{algo}: steps 4-6 after resuming");
    }
}

/// A task whose reward turns NaN at a chosen call, to test failure handling.
struct Poisoned {
    inner: collm_envs::synthetic::Synthetic,
    calls: std::sync::atomic::AtomicUsize,
    poison_at: usize,
}

impl Env for Poisoned {
    fn name(&self) -> &str {
        "poisoned"
    }
    fn num_agents(&self) -> usize {
        2
    }
    fn len(&self, s: Split) -> usize {
        self.inner.len(s)
    }
    fn reset(&self, s: Split, item: usize) -> anyhow::Result<Vec<String>> {
        self.inner.reset(s, item)
    }
    fn step(&self, s: Split, item: usize, turn: usize, j: &[Vec<String>]) -> anyhow::Result<Outcome> {
        let mut o = self.inner.step(s, item, turn, j)?;
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= self.poison_at {
            o.reward = f64::NAN;
        }
        Ok(o)
    }
}

#[test]
fn a_nan_reward_is_a_clear_error_and_the_last_checkpoint_survives() {
    let dir = tmp("nan");
    let mut t = Trainer::new(cfg(&["steps=5", "checkpoint_every=2", "buffer=2"]), &dir).unwrap();
    let synthetic = collm_envs::synthetic::Synthetic::new(4, 2, 2, collm_envs::synthetic::Density::Dense).unwrap();
    // 2 episodes × 2 turns = 4 env steps per training step: poison the 4th training step.
    t.env = Box::new(Poisoned { inner: synthetic, calls: 0.into(), poison_at: 12 });
    let err = format!("{:#}", t.run(false).unwrap_err());
    assert!(err.contains("NaN"), "{err}");
    let ckpt = latest_checkpoint(&dir).unwrap().unwrap();
    assert!(ckpt.ends_with("step-000002"), "{}", ckpt.display());
    let mut fresh = collm_rl::team::Team::load(&t.cfg, 2).unwrap();
    assert_eq!(load_checkpoint(&mut fresh, &ckpt).unwrap(), 2);
}

#[test]
fn bad_configs_name_the_key() {
    for (text, key) in [
        ("steps = 0", "steps"),
        ("[agents]\nlr = -1.0", "agents.lr"),
        ("[task]\nname = \"synthetic\"\nsymbols = 1", "symbols"),
        ("algo = \"magrpo\"\nk = 1", "'k'"),
        ("[sampling]\ntop_p = 0.0", "top_p"),
        ("[critic]\nvalue_coeff = 0.5", "value_coeff"),
        ("init = \"/nonexistent/step-000001\"", "'init'"),
        ("advantage_norm = \"episode\"", "advantage_norm"),
        ("buffer = 4000000000", "'buffer' = 4000000000: at most 65536"),
        ("[task]\nturns = 1000", "'task.turns' = 1000: at most 64"),
        ("[agents]\ndevice = \"gpu\"", "'agents.device': unknown device \"gpu\" (use \"cpu\", \"cuda\" or \"cuda:N\")"),
        ("[[agent]]\ndevice = \"cuda:x\"", "'agent[0].device'"),
        ("[critic]\ndevice = \"tpu:0\"", "'critic.device'"),
        ("[agents]\ndtype = \"f16\"", "dtype"),
        ("[critic]\ndtype = \"int8\"", "dtype"),
        ("[agents]\ndevice = []", "'agents.device' is an empty list"),
        ("[critic]\ndevice = [\"cpu\", \"gpu:1\"]", "'critic.device': unknown device \"gpu:1\""),
        (
            "[agents]\nfrozen_dtype = \"bf16\"",
            "'agents.frozen_dtype' = \"bf16\" holds a LoRA model's frozen base, but 'agents.lora_rank' is 0",
        ),
        ("[[agent]]\nlora_rank = 4\ndtype = \"bf16\"\nfrozen_dtype = \"bf16\"", "'agent[0].frozen_dtype' = \"bf16\" is for an f32 model"),
        ("[agents]\nfrozen_dtype = \"f16\"", "frozen_dtype"),
        // critic.dtype applies on top of a critic model of its own, whose bf16 base it rules out.
        (
            "[critic]\ndtype = \"bf16\"\n[critic.model]\nlora_rank = 4\nfrozen_dtype = \"bf16\"",
            "'critic.model.frozen_dtype' = \"bf16\" is for an f32 model",
        ),
    ] {
        let r = Config::from_toml(text, "bad.toml", &[]).map(|c| collm_rl::trainer::make_env(&c).map(|_| ()));
        let err = match r {
            Err(e) => format!("{e:#}"),
            Ok(Err(e)) => format!("{e:#}"),
            Ok(Ok(())) => panic!("{text:?} was accepted"),
        };
        assert!(err.contains(key), "{text:?}: {err}");
    }
    if !cfg!(feature = "cuda") {
        let err = format!("{:#}", Config::from_toml("[critic]\ndevice = \"cuda:1\"", "gpu.toml", &[]).err().unwrap());
        assert!(err.contains("'critic.device'") && err.contains("built without CUDA") && err.contains("scripts/build-cuda.sh"), "{err}");
    }
    let dir = tmp("exists");
    Trainer::new(cfg(&["steps=1"]), &dir).unwrap().run(false).unwrap();
    let err = format!("{:#}", Trainer::new(cfg(&["steps=1"]), &dir).err().unwrap());
    assert!(err.contains("already holds a run") && err.contains("no checkpoint"), "{err}");
    // A run that failed before its first step does not block its directory (before, a new run
    // there was told to resume, and --resume found no checkpoint).
    let dir = tmp("failed-start");
    assert!(Trainer::new(cfg(&["task.symbols=1"]), &dir).is_err());
    assert!(!dir.join("metrics.jsonl").exists(), "a bad config leaves no run behind");
    let mut t = Trainer::new(cfg(&["steps=1"]), &dir).unwrap();
    drop(t.tensorboard.take()); // killed before its first step
    let mut again = Trainer::new(cfg(&["steps=1"]), &dir).unwrap();
    again.run(false).unwrap();
    let tb = std::fs::read_dir(&dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("events.out")).count();
    assert_eq!(tb, 1, "one TensorBoard file");
}

#[test]
fn heterogeneous_teams_train_and_write_their_run_files() {
    // Two agents of different sizes and a critic of a third size.
    let dir = tmp("hetero");
    let mut c = cfg(&["steps=3", "checkpoint_every=3", "eval_every=3", "log_kl=true"]);
    let mut a0 = c.agents.clone();
    a0.tiny = collm_rl::config::TinyModel { hidden: 48, layers: 1, heads: 4, kv_heads: 4, intermediate: 96, ..Default::default() };
    let mut a1 = c.agents.clone();
    a1.tiny = collm_rl::config::TinyModel { hidden: 16, layers: 3, heads: 2, kv_heads: 1, intermediate: 32, ..Default::default() };
    let mut cr = c.agents.clone();
    cr.tiny = collm_rl::config::TinyModel { hidden: 24, layers: 2, heads: 2, kv_heads: 1, intermediate: 48, ..Default::default() };
    c.agent = vec![a0, a1];
    c.critic.model = Some(cr);
    c.validate().unwrap();
    let mut t = Trainer::new(c, &dir).unwrap();
    assert_eq!(t.team.agents[0].model.cfg.hidden_size, 48);
    assert_eq!(t.team.agents[1].model.cfg.num_layers, 3);
    assert_eq!(t.team.critics[0].model.cfg.hidden_size, 24);
    let lines = t.run(false).unwrap();
    assert_eq!(lines.len(), 3);
    // KL to the initial policy: 0 before the first update, then positive.
    let kl: Vec<Vec<f64>> = lines.iter().map(|l| l["kl"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()).collect();
    assert!(kl[0].iter().all(|k| k.abs() < 1e-4), "{kl:?}");
    assert!(kl[2].iter().all(|k| *k > 1e-4), "{kl:?}");
    for f in ["config.toml", "metrics.jsonl", "curves.png", "checkpoints/step-000003/trainer.json"] {
        assert!(dir.join(f).exists(), "{f}");
    }
    let tb = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("events.out.tfevents"));
    assert!(tb.is_some_and(|e| e.metadata().unwrap().len() > 100), "a TensorBoard event file with scalars");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("eval_reward_mean")).count(), 2, "eval at step 0 and 3");
}

#[test]
fn a_study_writes_its_summary_table_and_plot() {
    let dir = tmp("study");
    let path = dir.join("study.toml");
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = String::from("algos = [\"cc\", \"magrpo\"]\nseeds = [0]\n[algo_set]\nmagrpo = [\"k=2\"]\n[[setting]]\nname = \"tiny-dense\"\nturns = 2\ndensity = \"dense\"\nenv_steps = 100\n[[setting]]\nname = \"tiny-sparse\"\nturns = 3\ndensity = \"sparse\"\nenv_steps = 100\n[base]\n");
    text.push_str(
        // Every table of the serialized config moves under [base].
        &toml::to_string(&cfg(&[])).unwrap().replace("\n[", "\n[base."),
    );
    std::fs::write(&path, text).unwrap();
    let study = collm_rl::study::StudyConfig::load(&path, &["seed=5".into()]).unwrap();
    assert_eq!(study.seeds, vec![5]);
    let out = dir.join("out");
    collm_rl::study::run(&study, &out, false).unwrap();
    let s: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let settings = s["settings"].as_array().unwrap();
    assert_eq!(settings.len(), 2);
    assert_eq!(settings[1]["density"], "sparse");
    assert_eq!(settings[1]["turns"], 3);
    for algo in ["cc", "magrpo"] {
        let r = &settings[0]["results"][algo];
        assert_eq!(r["seeds"], 1);
        let m = r["final_reward_mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&m), "{algo}: {m}");
    }
    assert!(std::fs::read_to_string(out.join("table.md")).unwrap().contains("tiny-sparse"));
    assert!(out.join("curves.png").exists());
}

fn weights(m: &collm_model::Transformer) -> Vec<Vec<f32>> {
    m.tensors().unwrap().values().map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

#[test]
fn init_starts_from_a_trained_team_and_the_critic_warm_up_freezes_the_actors() {
    // A trained team (CoLLM-DC: its checkpoint has agents and per-agent critics).
    let src = tmp("init-src");
    let mut t = Trainer::new(cfg(&["algo=\"dc\"", "steps=3", "checkpoint_every=3"]), &src).unwrap();
    t.run(false).unwrap();
    let ckpt = latest_checkpoint(&src).unwrap().unwrap();
    let trained: Vec<_> = t.team.agents.iter().map(|p| weights(&p.model)).collect();
    let fresh = Trainer::new(cfg(&["algo=\"cc\""]), &tmp("init-fresh")).unwrap();
    assert_ne!(weights(&fresh.team.agents[0].model), trained[0]);

    // init: every agent takes its trained weights; the centralized critic's backbone agent 0's.
    let init = format!("init=\"{}\"", ckpt.display());
    let mut w = Trainer::new(cfg(&["algo=\"cc\"", &init, "critic.warmup=2"]), &tmp("init-dst")).unwrap();
    for (p, tw) in w.team.agents.iter().zip(&trained) {
        assert_eq!(&weights(&p.model), tw);
    }
    assert_eq!(weights(&w.team.critics[0].model), trained[0]);

    // Warm-up: two updates move the critic and leave the actors; the third moves the actors.
    let critic0 = weights(&w.team.critics[0].model);
    // The metrics line's model arithmetic (GFLOP) against the models' own counters: the critic
    // runs only in the update; during the warm-up the actors run only in generation.
    let counts = |w: &Trainer| {
        (w.team.critics[0].model.flops.total() as f64 / 1e9, w.team.agents.iter().map(|a| a.model.flops.total() as f64 / 1e9).sum::<f64>())
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1e-9);
    // Generation's weight reads (GB) are the agents' own count: the critic reads weights only in
    // the update.
    let reads = |w: &Trainer| w.team.agents.iter().map(|a| a.model.weight_reads.total() as f64 / 1e9).sum::<f64>();
    for _ in 0..2 {
        let ((c0, a0), r0) = (counts(&w), reads(&w));
        let line = w.train_step().unwrap();
        assert!(line["value_loss"].as_f64().is_some());
        let ((c1, a1), r1) = (counts(&w), reads(&w));
        let (gen, update) = (line["gen_gflop"].as_f64().unwrap(), line["update_gflop"].as_f64().unwrap());
        assert!(gen > 0.0 && close(update, c1 - c0) && close(gen, a1 - a0), "{line}: critic {}, agents {}", c1 - c0, a1 - a0);
        let gen_reads = line["gen_weight_gb"].as_f64().unwrap();
        assert!(gen_reads > 0.0 && close(gen_reads, r1 - r0), "{line}: the agents read {} GB", r1 - r0);
        // Decoding's small passes are part of generation, never all of it (prefill is not small).
        let (small_gflop, small_gb) = (line["gen_small_pass_gflop"].as_f64().unwrap(), line["gen_small_pass_weight_gb"].as_f64().unwrap());
        assert!(small_gflop > 0.0 && small_gflop < gen && small_gb > 0.0 && small_gb < gen_reads, "{line}");
    }
    for (p, tw) in w.team.agents.iter().zip(&trained) {
        assert_eq!(&weights(&p.model), tw, "an actor moved during the critic warm-up");
    }
    assert_ne!(weights(&w.team.critics[0].model), critic0, "the critic did not learn during its warm-up");
    let (c0, a0) = counts(&w);
    let line = w.train_step().unwrap();
    assert_ne!(weights(&w.team.agents[0].model), trained[0], "the actors did not learn after the warm-up");
    // The actors' training passes join the critic's in the update.
    let (c1, a1) = counts(&w);
    let (gen, update) = (line["gen_gflop"].as_f64().unwrap(), line["update_gflop"].as_f64().unwrap());
    assert!(close(update + gen, c1 - c0 + a1 - a0) && update > c1 - c0 && a1 - a0 > gen, "{line}");

    // A checkpoint of another model shape is refused, naming the file.
    let bad = Trainer::new(cfg(&["algo=\"cc\"", &init, "agents.tiny.hidden=48"]), &tmp("init-bad")).err().unwrap();
    let err = format!("{bad:#}");
    assert!(err.contains("'init'") && err.contains("collm_model.json"), "{err}");
}

#[test]
fn on_an_8_turn_sparse_task_the_centralized_critic_beats_dc_and_magrpo() {
    // The shipped study's 8-turn sparse echo setting, seed 0, the same env-step budget for each.
    // Measured in the full study (seeds 0-2; greedy eval, and in brackets the sampled policy's
    // reward over the last tenth of the steps): CC 0.875 ± 0.102 (0.43 ± 0.02), DC 0.312 ± 0.065
    // (0.26 ± 0.01), MAGRPO 1.000 ± 0.000 (0.07 ± 0.01). MAGRPO's K = 2 tree costs 510 joint
    // actions per 8-turn episode, so the budget buys it 24 updates against CC's 375: its greedy
    // policy is right, but its sampled one has barely moved.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/study-synthetic.toml");
    let study = collm_rl::study::StudyConfig::load(&path, &[]).unwrap();
    let st = study.setting.iter().find(|s| s.name == "echo-8-turns-sparse").unwrap();
    assert_eq!((st.turns, st.density), (8, collm_envs::synthetic::Density::Sparse));
    let run = |algo: &str| {
        let (curve, greedy) =
            collm_rl::study::run_one(study.run_config(st, algo, 0).unwrap(), st.env_steps, &tmp(&format!("claim-{algo}"))).unwrap();
        assert!(curve.last().unwrap().0 >= st.env_steps);
        (greedy, collm_rl::study::sampled_reward(&curve))
    };
    let ((cc, cc_s), (dc, dc_s), (mg, mg_s)) = (run("cc"), run("dc"), run("magrpo"));
    // Constant-symbol policies score 0.25 greedy; CC must be far above that and above DC.
    assert!(cc >= 0.7, "CoLLM-CC reached only {cc:.3}");
    assert!(cc >= dc + 0.25, "CoLLM-CC {cc:.3} is not well above CoLLM-DC {dc:.3}");
    // The sampled policies: CC well above both.
    assert!(cc_s >= mg_s + 0.2, "CoLLM-CC's sampled reward {cc_s:.3} is not well above MAGRPO's {mg_s:.3} (greedy {mg:.3})");
    assert!(cc_s >= dc_s + 0.1, "CoLLM-CC's sampled reward {cc_s:.3} is not above CoLLM-DC's {dc_s:.3}");
}

#[test]
fn cross_joint_actions_expand_every_node_over_two_turns() {
    let o = ["algo=\"magrpo\"", "joint_mode=\"cross\"", "k=2", "buffer=2", "task.turns=2", "sampling.max_new_tokens=2"];
    let mut t = Trainer::new(cfg(&o), &tmp("cross-kv")).unwrap();
    let kv = t.rollout_for_step(0).unwrap();
    let mut text_cfg = cfg(&o);
    text_cfg.history_cache = HistoryCache::Text;
    let text = Trainer::new(text_cfg, &tmp("cross-text")).unwrap().rollout_for_step(0).unwrap();
    assert_eq!(kv.nodes.len(), 2 * (1 + 4), "2 roots with K^n = 4 children each");
    for &root in &kv.roots {
        let nd = &kv.nodes[root];
        assert_eq!(nd.joints.len(), 4);
        for j in &nd.joints {
            let c = &kv.nodes[j.child.expect("every joint action of turn 0 goes on")];
            assert_eq!((c.turn, c.joints.len()), (1, 4));
            // The child continues each agent's own chosen response.
            for i in 0..2 {
                let mut want = nd.histories[i].clone();
                want.extend_from_slice(&nd.responses[i][j.choice[i]].tokens);
                assert_eq!(&c.histories[i][..want.len()], &want[..], "agent {i} under {:?}", j.choice);
            }
            // Sum over the joint actions each sample takes part in (CoMLRL's cross returns).
            let ret = collm_rl::algos::magrpo::joint_returns(&kv, 0.9);
            let s = collm_rl::algos::magrpo::sample_returns(&kv, &ret, root, 1, collm_rl::config::JointMode::Cross);
            for (k, v) in s.iter().enumerate() {
                let want: f64 = nd.joints.iter().zip(&ret[root]).filter(|(j, _)| j.choice[1] == k).map(|(_, r)| r).sum();
                assert!((v - want).abs() < 1e-12);
            }
        }
    }
    // KV caches carried across turns (each agent its own row) give what re-encoding gives.
    for (a, b) in kv.nodes.iter().zip(&text.nodes) {
        assert_eq!(a.histories, b.histories);
        for (ra, rb) in a.responses.iter().flatten().zip(b.responses.iter().flatten()) {
            assert_eq!(ra.tokens, rb.tokens);
            for (p, q) in ra.logprobs.iter().zip(&rb.logprobs) {
                assert!((p - q).abs() <= 1e-4);
            }
        }
    }
    // Every response of the tree is in exactly one of an agent's sequences (before, a response
    // followed only its first child, and the other K^(n−1) − 1 subtrees were never trained).
    for i in 0..2 {
        let mut ids: Vec<_> = kv.agent_sequences(i).iter().flat_map(|s| s.ids.clone()).collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!((n, ids.len()), (kv.nodes.iter().map(|nd| nd.responses[i].len()).sum(), n), "agent {i}");
    }
    let stats = t.update(&kv).unwrap();
    assert!(stats.policy_loss.iter().all(|l| l.is_finite()) && stats.agent_steps == 4, "{stats:?}");
    t.cfg.schedule = collm_rl::config::Schedule::Buffer;
    let stats = t.update(&kv).unwrap();
    assert!(stats.policy_loss.iter().all(|l| l.is_finite()) && stats.agent_steps == 2, "{stats:?}");
}

#[test]
fn eval_weighs_every_joint_action_the_same_and_samples_each_chunk_afresh() {
    // buffer = 1: eval chunks of 4 episodes. Over 5 items, turn 0 scores 1 on items 0, 2, 4:
    // 3/5 = 0.6 per joint action. Averaging the chunks' means, as before, gave (0.5 + 1) / 2.
    let mut t = Trainer::new(cfg(&["buffer=1", "task.turns=1"]), &tmp("eval-weights")).unwrap();
    t.env = Box::new(EvenItemsPay::new(1, true));
    let e = t.evaluate(Split::Train, 5, true).unwrap();
    assert!((e.reward_per_turn[0] - 0.6).abs() < 1e-12, "{:?}", e.reward_per_turn);
    assert!((e.reward_mean - 0.6).abs() < 1e-12);
    // Sampled eval: the same observation at the same place of two chunks samples differently
    // (before, every chunk reused the first chunk's random streams).
    let mut c = cfg(&["buffer=1", "task.turns=1", "sampling.max_new_tokens=4"]);
    c.eval_greedy = false;
    let mut t = Trainer::new(c, &tmp("eval-streams")).unwrap();
    t.env = Box::new(EvenItemsPay::new(1, true));
    let rs = t.eval_rollouts(Split::Train, 8, false).unwrap();
    assert_eq!(rs.len(), 2);
    let tokens = |r: &collm_rl::rollout::Rollout| -> Vec<Vec<u32>> { r.nodes.iter().map(|n| n.responses[0][0].tokens.clone()).collect() };
    assert_ne!(tokens(&rs[0].1), tokens(&rs[1].1), "two chunks sampled the same responses");
}

#[test]
fn a_resumed_run_measures_kl_against_the_team_it_started_from() {
    // A trained team to start from.
    let pre = tmp("kl-init-pre");
    Trainer::new(cfg(&["steps=2", "checkpoint_every=2", "buffer=4"]), &pre).unwrap().run(false).unwrap();
    let ckpt = latest_checkpoint(&pre).unwrap().unwrap();
    let init = format!("init=\"{}\"", ckpt.display());
    let c = cfg(&["steps=3", "buffer=4", "log_kl=true", &init]);
    let mut full = Trainer::new(c.clone(), &tmp("kl-init-full")).unwrap();
    let want: Vec<Value> = full.run(false).unwrap().iter().map(strip_timing).collect();
    // Step 1 of a run that starts from `init`: KL 0 before any update.
    assert!(want[0]["kl"].as_array().unwrap().iter().all(|k| k.as_f64().unwrap().abs() < 1e-4), "{}", want[0]["kl"]);
    let dir = tmp("kl-init-killed");
    let mut t = Trainer::new(c, &dir).unwrap();
    t.train_step().unwrap();
    save_checkpoint(&t.team, &t.cfg, 1, &dir).unwrap();
    drop(t);
    let mut r = Trainer::resume(&dir).unwrap();
    let got: Vec<Value> = r.run(false).unwrap().iter().map(strip_timing).collect();
    // Before, the resumed run's references were the untrained team, not `init`'s.
    assert_eq!(got, want[1..].to_vec());
}

#[test]
fn the_kl_estimate_uses_the_sampling_temperature() {
    // One-token responses at T = 2 after a few updates: the estimate on the rollout's samples
    // must match the exact KL(π_T || π_ref,T) computed over the whole vocabulary.
    let mut t = Trainer::new(
        cfg(&["steps=6", "buffer=64", "task.turns=1", "log_kl=true", "sampling.temperature=2.0", "agents.lr=1e-2"]),
        &tmp("kl-temp"),
    )
    .unwrap();
    t.run(false).unwrap();
    t.cfg.buffer = 1024; // many samples, so the estimate's sampling error is small
    let r = t.rollout_for_step(4).unwrap();
    let est = collm_rl::trainer::kl_to_reference(&t.team, &t.references, &r, 2.0, 0).unwrap();
    for i in 0..2 {
        let p = &t.team.agents[i];
        let vocab = p.model.cfg.vocab_size as u32;
        let mut exact = 0.0;
        for &x in &r.roots {
            let h = &r.nodes[x].histories[i];
            let seqs: Vec<Vec<u32>> = (0..vocab).map(|v| h.iter().copied().chain([v]).collect()).collect();
            let spans = vec![vec![(h.len(), h.len() + 1)]; seqs.len()];
            let none = vec![vec![]; seqs.len()];
            let lp =
                |m| collm_model::score::score_spans_at(m, &seqs, &spans, &none, 0, 2.0).unwrap().token_logprobs.to_vec1::<f32>().unwrap();
            let (a, b) = (lp(&p.model), lp(&t.references[i]));
            exact += a.iter().zip(&b).map(|(&a, &b)| (a as f64).exp() * (a - b) as f64).sum::<f64>();
        }
        exact /= r.roots.len() as f64;
        assert!(exact > 0.01, "agent {i}: the policy barely moved ({exact})");
        assert!((est[i] - exact).abs() < 0.2 * exact + 0.005, "agent {i}: estimate {} vs exact {exact}", est[i]);
        // The old estimate, untempered log-probs on these tempered samples, misses by far more.
        let seqs = r.agent_sequences(i);
        let (toks, spans) = collm_rl::rollout::AgentSeq::batch(&seqs);
        let refs = score_spans(&t.references[i], &toks, &spans, &vec![vec![]; toks.len()], 0, false)
            .unwrap()
            .token_logprobs
            .to_vec1::<f32>()
            .unwrap();
        let cur: Vec<f32> =
            seqs.iter().flat_map(|s| s.ids.iter().flat_map(|id| r.nodes[id.node].responses[i][id.k].logprobs.clone())).collect();
        let old = cur.iter().zip(&refs).map(|(a, b)| (a - b) as f64).sum::<f64>() / cur.len() as f64;
        assert!((old - exact).abs() > 0.2 * exact + 0.005, "agent {i}: the old estimate {old} vs exact {exact}");
    }
}

#[test]
fn the_reference_kl_penalty_shapes_the_reward_once_the_policy_moves() {
    for algo in ["cc", "magrpo"] {
        let run = |coef: &str, name: &str| {
            let mut t =
                Trainer::new(cfg(&[&format!("algo=\"{algo}\""), "buffer=8", "agents.lr=1e-2", &format!("kl_coef={coef}")]), &tmp(name))
                    .unwrap();
            let lines: Vec<Value> = (0..3).map(|_| t.train_step().unwrap()).collect();
            (lines, weights(&t.team.agents[0].model))
        };
        let (off, w_off) = run("0.0", &format!("kl-off-{algo}"));
        let (on, w_on) = run("1.0", &format!("kl-on-{algo}"));
        // Step 1: the policy is its own reference, the penalty (k3 ≥ 0) is 0 and changes nothing.
        let p1 = on[0]["kl_penalty"].as_f64().unwrap();
        assert!((0.0..1e-6).contains(&p1), "{algo}: {p1}");
        // (Nearly: MAGRPO's group normalization scales a penalty of ~1e-9 by up to 1/1e-6.)
        for (a, b) in on[0]["policy_loss"].as_array().unwrap().iter().zip(off[0]["policy_loss"].as_array().unwrap()) {
            assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-4, "{algo}: {a} vs {b}");
        }
        // Later steps: the moved policy pays, and learns otherwise.
        assert!(on[2]["kl_penalty"].as_f64().unwrap() > 1e-4, "{algo}: {}", on[2]);
        assert!(off[2]["kl_penalty"].is_null());
        assert!(max_diff(&w_off, &w_on) > 1e-6, "{algo}");
    }
}

fn events_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().contains("events.out.tfevents")).collect()
}

fn logged_steps(path: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["step"].as_u64().unwrap()).collect()
}

/// Before: `--resume D --set steps=N` ignored the --set, an edited config.toml (cc → magrpo)
/// continued silently, an optimizer file cut to ≤ 16 bytes restarted AdamW silently, and every
/// resume left duplicated steps in samples.jsonl and a TensorBoard file whose steps overlapped.
#[test]
fn resume_trusts_nothing_it_cannot_check() {
    let dir = tmp("resume-checks");
    let c = cfg(&["algo=\"cc\"", "steps=4", "checkpoint_every=2", "buffer=2"]);
    Trainer::new(c, &dir).unwrap().run(false).unwrap();
    // Killed after step 4's logs, before its checkpoint.
    std::fs::remove_dir_all(dir.join("checkpoints/step-000004")).unwrap();

    // Only the run's length and its eval/checkpoint cadence may change.
    let err = format!("{:#}", Trainer::resume_with(&dir, &["agents.lr=1.0".into()]).err().unwrap());
    assert!(err.contains("'agents.lr' cannot change"), "{err}");
    // An edited config.toml is refused, naming the key.
    let path = dir.join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("algo = \"cc\"", "algo = \"magrpo\"")).unwrap();
    let err = format!("{:#}", Trainer::resume(&dir).err().unwrap());
    assert!(err.contains("'algo'") && err.contains("magrpo"), "{err}");
    std::fs::write(&path, text.replace("gamma = 0.9", "gamma = 0.5")).unwrap();
    let err = format!("{:#}", Trainer::resume(&dir).err().unwrap());
    assert!(err.contains("'gamma' = 0.5 (checkpoint: 0.9)"), "{err}");
    std::fs::write(&path, &text).unwrap();
    // A damaged optimizer file is an error naming it, not a fresh AdamW.
    let opt = dir.join("checkpoints/step-000002/agent_0/optimizer.safetensors");
    let good = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &good[..10]).unwrap();
    let err = format!("{:#}", Trainer::resume(&dir).err().unwrap());
    assert!(err.contains("agent_0/optimizer.safetensors"), "{err}");
    collm_model::loader::write_safetensors(&Default::default(), &opt).unwrap();
    let err = format!("{:#}", Trainer::resume(&dir).err().unwrap());
    assert!(err.contains("no optimizer moments"), "{err}");
    std::fs::write(&opt, &good).unwrap();

    // A checkpoint written before a key existed still resumes: the key takes its default.
    let saved = dir.join("checkpoints/step-000002/config.toml");
    let text = std::fs::read_to_string(&saved).unwrap();
    assert!(text.contains("context = 65536"));
    std::fs::write(&saved, text.replace("context = 65536\n", "")).unwrap();
    // --set steps takes effect and is written to the run's config.
    let mut r = Trainer::resume_with(&dir, &["steps=5".into()]).unwrap();
    assert_eq!((r.step, r.cfg.steps), (2, 5));
    assert!(std::fs::read_to_string(&path).unwrap().contains("steps = 5"));
    assert_eq!(logged_steps(&dir.join("samples.jsonl")), vec![1, 2], "samples after the checkpoint are dropped");
    r.run(false).unwrap();
    assert_eq!(logged_steps(&dir.join("samples.jsonl")), vec![1, 2, 3, 4, 5]);
    assert_eq!(logged_steps(&dir.join("metrics.jsonl")), vec![1, 2, 3, 4, 5]);
    let tb = events_files(&dir);
    assert_eq!(tb.len(), 1, "one TensorBoard file after a resume");
    assert_eq!(collm_rl::tensorboard::scalar_steps(&tb[0]).unwrap(), vec![1, 2, 3, 4, 5]);
}

#[test]
fn device_lists_place_each_model_and_precisions_mix_within_a_team() {
    // One device per agent from a list, a bf16 critic beside f32 agents: the team trains.
    let dir = tmp("placement");
    let c = cfg(&["algo=\"cc\"", "steps=2", "buffer=2", "agents.device=[\"cpu\", \"cpu\"]", "critic.dtype=\"bf16\""]);
    let mut t = Trainer::new(c, &dir).unwrap();
    assert!(t.team.agents.iter().all(|a| a.model.dtype() == candle_core::DType::F32));
    assert_eq!(t.team.critics[0].model.dtype(), candle_core::DType::BF16);
    let lines = t.run(false).unwrap();
    assert!(lines.iter().all(|l| l["value_loss"].as_f64().is_some_and(f64::is_finite)), "{lines:?}");
    // A list too short for the team names the key and the model left without a device.
    let err = format!("{:#}", Trainer::new(cfg(&["steps=1", "agents.device=[\"cpu\"]"]), &tmp("placement-short")).err().unwrap());
    assert!(err.contains("'agents.device' lists 1 device(s), but model 1"), "{err}");
    // DC's separate critics take the critic list in order.
    let err =
        format!("{:#}", Trainer::new(cfg(&["algo=\"dc\"", "steps=1", "critic.device=[\"cpu\"]"]), &tmp("placement-dc")).err().unwrap());
    assert!(err.contains("critic 1") && err.contains("'critic.device' lists 1 device(s)"), "{err}");
}

#[test]
fn the_paper_configs_place_bf16_models_one_per_gpu_and_run_on_the_cpu_when_told() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = e.path();
        if !path.to_string_lossy().ends_with("-paper.toml") {
            continue;
        }
        n += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(table["agents"]["dtype"].as_str(), Some("bf16"), "{}", path.display());
        let devices: Vec<&str> = table["agents"]["device"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
        assert_eq!(devices, ["cuda:0", "cuda:1"], "{}", path.display());
        assert_eq!(table["critic"]["device"].as_str(), Some("cuda:2"), "{}", path.display());
        let name = path.display().to_string();
        // What the configs' header says to run on one device works (here: the CPU).
        let c = Config::from_toml(&text, &name, &["agents.device=\"cpu\"".into(), "critic.device=\"cpu\"".into()]).unwrap();
        assert_eq!(c.critic_spec().dtype, collm_model::Precision::Bf16, "the critic takes the agents' bf16");
        if !cfg!(feature = "cuda") {
            let err = format!("{:#}", Config::from_toml(&text, &name, &[]).err().unwrap());
            assert!(err.contains("'agents.device'") && err.contains("built without CUDA"), "{err}");
        }
    }
    assert_eq!(n, 6);
}
