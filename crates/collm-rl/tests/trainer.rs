//! The trainer on the synthetic tasks with tiny models from random init: every algorithm learns,
//! KV-cache histories give the same numbers as re-encoded text, resume reproduces the
//! uninterrupted run, and failures are clear and leave the last checkpoint intact.

use collm_envs::{Env, Outcome, Split};
use collm_model::score_spans;
use collm_rl::algos::cc::joint_sequence;
use collm_rl::config::{CriticKind, HistoryMode};
use collm_rl::rollout::{rollout, RolloutSpec};
use collm_rl::trainer::{latest_checkpoint, load_checkpoint, save_checkpoint};
use collm_rl::{Config, Trainer};
use serde_json::Value;
use std::path::{Path, PathBuf};

const BASE: &str = r#"
seed = 0
steps = 120
buffer = 16
gamma = 0.9
k = 4
[task]
name = "synthetic"
turns = 2
density = "dense"
symbols = 4
agents = 2
[agents]
model = "tiny"
format = "raw"
lr = 3e-3
[sampling]
max_new_tokens = 1
temperature = 1.0
top_p = 1.0
[critic]
lr = 3e-3
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
    // policy that ignores its observations (one constant symbol) scores 1/4 = 0.25. The last
    // number of each row is the floor its final reward must clear: above that constant policy
    // wherever the method learns the task in this budget (measured: 0.95 to 1.0), at the constant
    // policy's level for ReMax and for DC with value heads on the actors (measured 0.25 and 0.51).
    for (name, extra, floor) in [
        ("cc", vec![], 0.6),
        ("cc", vec!["critic.kind=\"q\""], 0.6),
        ("dc", vec![], 0.6),
        ("dc", vec!["critic.dc=\"head\""], 0.2),
        ("magrpo", vec![], 0.6),
        ("rloo", vec![], 0.6),
        ("remax", vec![], 0.2),
        ("reinforce", vec![], 0.6),
    ] {
        let mut o = vec![format!("algo=\"{name}\"")];
        o.extend(extra.iter().map(|s| s.to_string()));
        let o: Vec<&str> = o.iter().map(|s| s.as_str()).collect();
        let mut t = Trainer::new(cfg(&o), &tmp(&format!("learn-{name}-{}", extra.len()))).unwrap();
        let r = rewards(&t.run(false).unwrap());
        let (first, last) = (mean(&r[..10]), mean(&r[r.len() - 20..]));
        assert!(first < 0.08, "{name} {extra:?}: starts at {first}");
        assert!(last > floor && last > 3.0 * first, "{name} {extra:?}: reward went from {first} to {last}");
    }
}

fn spec<'a>(items: &'a [usize], history: HistoryMode, k: usize) -> RolloutSpec<'a> {
    RolloutSpec {
        split: Split::Train,
        items,
        turns: 3,
        k,
        joint_mode: collm_rl::config::JointMode::Aligned,
        history,
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
        let kv = rollout(&t.team, t.env.as_ref(), &spec(&items, HistoryMode::Kv, k)).unwrap();
        let text = rollout(&t.team, t.env.as_ref(), &spec(&items, HistoryMode::Text, k)).unwrap();
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
            let p = &t.team.agents[i];
            let seqs = kv.agent_sequences(i);
            let toks: Vec<Vec<u32>> = seqs.iter().map(|s| s.0.clone()).collect();
            let spans: Vec<Vec<(usize, usize)>> = seqs.iter().map(|s| s.1.clone()).collect();
            let s = score_spans(&p.model, &toks, &spans, &vec![vec![]; toks.len()], p.tokenizer.pad_id(), false).unwrap();
            let got = s.token_logprobs.to_vec1::<f32>().unwrap();
            let want: Vec<f32> =
                seqs.iter().flat_map(|s| s.2.iter().flat_map(|&(x, kk)| kv.nodes[x].responses[i][kk].logprobs.clone())).collect();
            assert_eq!(got.len(), want.len());
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(worst <= 1e-4, "teacher-forced vs sampling log-probs: {worst}");
            // Every response of the tree is scored exactly once.
            let n_resp: usize = kv.nodes.iter().map(|n| n.responses[i].len()).sum();
            assert_eq!(seqs.iter().map(|s| s.2.len()).sum::<usize>(), n_resp);
        }
        if k == 1 {
            // The centralized critic's values at every turn: one pass over the whole joint
            // history equals a pass over each prefix h_t on its own.
            let c = Trainer::new(cfg(&["algo=\"cc\"", "task.turns=3"]), &tmp("kv-critic")).unwrap();
            let critic = &c.team.critics[0];
            for chain in kv.chains() {
                let (toks, pos) = joint_sequence(&critic.tokenizer, &kv, &chain, CriticKind::V).unwrap();
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

fn strip_timing(v: &Value) -> Value {
    let mut v = v.clone();
    for k in ["gen_s", "update_s", "step_s", "tokens_per_s"] {
        v.as_object_mut().unwrap().remove(k);
    }
    v
}

#[test]
fn resume_after_a_kill_reproduces_the_uninterrupted_run() {
    for algo in ["cc", "magrpo"] {
        let c = cfg(&[&format!("algo=\"{algo}\""), "steps=6", "checkpoint_every=3", "buffer=4"]);
        let mut full = Trainer::new(c.clone(), &tmp(&format!("full-{algo}"))).unwrap();
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
    ] {
        let r = Config::from_toml(text, "bad.toml", &[]).map(|c| collm_rl::trainer::make_env(&c).map(|_| ()));
        let err = match r {
            Err(e) => format!("{e:#}"),
            Ok(Err(e)) => format!("{e:#}"),
            Ok(Ok(())) => panic!("{text:?} was accepted"),
        };
        assert!(err.contains(key), "{text:?}: {err}");
    }
    let dir = tmp("exists");
    Trainer::new(cfg(&["steps=1"]), &dir).unwrap().run(false).unwrap();
    let err = format!("{:#}", Trainer::new(cfg(&["steps=1"]), &dir).err().unwrap());
    assert!(err.contains("already holds a run"), "{err}");
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
    m.tensors().values().map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
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
    for _ in 0..2 {
        let line = w.train_step().unwrap();
        assert!(line["value_loss"].as_f64().is_some());
    }
    for (p, tw) in w.team.agents.iter().zip(&trained) {
        assert_eq!(&weights(&p.model), tw, "an actor moved during the critic warm-up");
    }
    assert_ne!(weights(&w.team.critics[0].model), critic0, "the critic did not learn during its warm-up");
    w.train_step().unwrap();
    assert_ne!(weights(&w.team.agents[0].model), trained[0], "the actors did not learn after the warm-up");

    // A checkpoint of another model shape is refused, naming the file.
    let bad = Trainer::new(cfg(&["algo=\"cc\"", &init, "agents.tiny.hidden=48"]), &tmp("init-bad")).err().unwrap();
    let err = format!("{bad:#}");
    assert!(err.contains("'init'") && err.contains("collm_model.json"), "{err}");
}

#[test]
fn on_a_long_sparse_task_the_centralized_critic_beats_the_decentralized_ones() {
    // The shipped study's 4-turn sparse echo setting, seed 0, the same env-step budget for both.
    // Measured in the full study (seeds 0-2): CC 0.913 ± 0.049, DC 0.452 ± 0.019 (and MAGRPO
    // 1.000: that half of the paper's claim is not reproduced, see the README).
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/study-synthetic.toml");
    let study = collm_rl::study::StudyConfig::load(&path, &[]).unwrap();
    let st = study.setting.iter().find(|s| s.name == "echo-long-sparse").unwrap();
    assert_eq!((st.turns, st.density), (4, collm_envs::synthetic::Density::Sparse));
    let run = |algo: &str| {
        let (curve, fin) =
            collm_rl::study::run_one(study.run_config(st, algo, 0).unwrap(), st.env_steps, &tmp(&format!("claim-{algo}"))).unwrap();
        assert!(curve.last().unwrap().0 >= st.env_steps);
        fin
    };
    let (cc, dc) = (run("cc"), run("dc"));
    // Constant-symbol policies score 0.25; CC must be far above that and above DC by a margin.
    assert!(cc >= 0.7, "CoLLM-CC reached only {cc:.3}");
    assert!(cc >= dc + 0.25, "CoLLM-CC {cc:.3} is not well above CoLLM-DC {dc:.3}");
}
