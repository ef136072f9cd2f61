//! Every paper task runs end to end through the real trainer (rollout with feedback turns,
//! reward, update, eval, checkpoint) with tiny byte-level models, and reports its metrics.

use collm_envs::Split;
use collm_rl::{Config, Trainer};
use serde_json::Value;

fn config(task: &str, algo: &str, turns: usize) -> Config {
    let toml = format!(
        r#"
seed = 0
algo = "{algo}"
steps = 1
buffer = 2
k = 2
gamma = 0.9
eval_every = 1
eval_items = 2
checkpoint_every = 1
[task]
name = "{task}"
turns = {turns}
[agents]
model = "tiny"
format = "raw"
lr = 1e-3
[agents.tiny]
vocab = "bytes"
hidden = 16
layers = 1
heads = 2
kv_heads = 1
intermediate = 32
[sampling]
max_new_tokens = 12
temperature = 1.0
top_p = 1.0
[critic]
lr = 1e-3
"#
    );
    Config::from_toml(&toml, "test config", &[]).unwrap()
}

fn run(task: &str, algo: &str, turns: usize, metrics: &[&str]) -> Vec<Value> {
    let dir = std::env::temp_dir().join(format!("collm-task-{task}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut t = Trainer::new(config(task, algo, turns), &dir).unwrap();
    let lines = t.run(false).unwrap();
    let train = lines.iter().find(|l| l.get("reward_mean").is_some()).expect("a train line");
    assert!(train["reward_mean"].as_f64().unwrap().is_finite());
    for m in metrics {
        assert!(
            train["metrics"].get(m).is_some_and(|v| v.as_f64().is_some_and(f64::is_finite)),
            "{task}: no metric {m} in {}",
            train["metrics"]
        );
    }
    let e = t.evaluate(Split::Eval, 2, true).unwrap();
    for m in metrics {
        assert!(e.metrics.contains_key(*m), "{task}: eval has no {m}: {:?}", e.metrics);
    }
    assert!(dir.join("checkpoints/step-000001/trainer.json").exists());
    // The first episode of each step, turn by turn, in samples.jsonl.
    let sample: Value = serde_json::from_str(std::fs::read_to_string(dir.join("samples.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(sample["turns"][0]["responses"].as_array().unwrap().len(), t.env.num_agents());
    assert!(sample["turns"][0]["observations"][0].as_str().unwrap().len() > 20);
    std::fs::remove_dir_all(&dir).unwrap();
    lines
}

#[test]
fn coding_tasks_train_through_the_sandbox() {
    let lines = run("coding", "cc", 2, &["pass_rate", "format_ok", "syntax_ok"]);
    // Random bytes never pass the format gate: the shifted reward is -4 at both turns.
    let per_turn = lines[0]["reward_per_turn"].as_array().unwrap();
    assert_eq!(per_turn.len(), 2);
    assert!(per_turn.iter().all(|r| (r.as_f64().unwrap() + 4.0).abs() < 1e-9), "{per_turn:?}");
    run("coophumaneval", "magrpo", 1, &["pass_rate"]);
}

#[test]
fn minecraft_tasks_train_on_the_grid() {
    run("str_build", "magrpo", 2, &["iou", "coverage", "malformed"]);
    run("house_build", "dc", 1, &["iou", "match_fraction", "damage"]);
}

#[test]
fn writing_tasks_train() {
    run("tldr", "cc", 1, &[]);
    run("arxiv", "magrpo", 1, &[]);
}

#[test]
fn every_shipped_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let text = std::fs::read_to_string(&p).unwrap();
            // Study configs hold settings on top of a base config; the rest are train configs.
            if text.contains("[[setting]]") {
                collm_rl::study::StudyConfig::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            } else {
                Config::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            }
            n += 1;
        }
    }
    assert!(n >= 15, "{n} configs");
}

/// The external arithmetic example (a Python task over the task protocol, two workers) trains
/// end to end from its shipped config, and its greedy eval reward rises: the tiny agents learn to
/// answer with numbers (0.4 a turn) from nothing.
#[test]
fn the_external_arithmetic_task_trains_and_its_reward_rises() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tasks/arithmetic/config.toml");
    let cfg = Config::load(&path, &["steps=20".into()]).unwrap();
    assert!(cfg.task.command[1].ends_with("examples/tasks/arithmetic/task.py"), "{:?}", cfg.task.command);
    let dir = std::env::temp_dir().join(format!("collm-task-external-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut t = Trainer::new(cfg, &dir).unwrap();
    t.run(false).unwrap();
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let evals: Vec<f64> = text.lines().filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["eval_reward_mean"].as_f64()).collect();
    assert!(evals.len() >= 3, "{evals:?}");
    assert!(evals[evals.len() - 1] >= evals[0] + 0.3, "the eval reward did not rise: {evals:?}");
}

/// The TLDR task written in Python (examples/tasks/tldr) trains exactly like the built-in `tldr`
/// on SmolLM2-135M for the same seed: the same responses, rewards, levels, losses and gradient
/// norms step by step (MAGRPO with K = 2 and LoRA agents, to keep it short).
#[test]
fn the_python_tldr_task_trains_like_the_builtin_one() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let posts = repo.join("examples/tasks/tldr/posts.jsonl");
    let sets = |extra: &[String]| -> Vec<String> {
        let mut s: Vec<String> = [
            "algo=magrpo",
            "k=2",
            "steps=2",
            "buffer=2",
            "sampling.max_new_tokens=24",
            "eval_every=0",
            "checkpoint_every=0",
            "agents.lora_rank=4",
            "agents.lr=1e-3",
        ]
        .map(String::from)
        .to_vec();
        s.extend_from_slice(extra);
        s
    };
    let runs: Vec<(Vec<Value>, Vec<Value>)> = [
        (repo.join("configs/tldr-smollm2.toml"), sets(&[format!("task.data={}", posts.display())])),
        (repo.join("examples/tasks/tldr/config.toml"), sets(&[])),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (path, sets))| {
        let cfg = Config::load(&path, &sets).unwrap();
        let dir = std::env::temp_dir().join(format!("collm-tldr-{i}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Trainer::new(cfg, &dir).unwrap().run(false).unwrap();
        let read = |f: &str| -> Vec<Value> {
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
        };
        // Timings differ from run to run; everything else must not.
        let mut metrics = read("metrics.jsonl");
        for m in &mut metrics {
            m.as_object_mut().unwrap().retain(|k, _| !k.ends_with("_s") && k != "tokens_per_s");
        }
        let samples = read("samples.jsonl");
        let _ = std::fs::remove_dir_all(&dir);
        (metrics, samples)
    })
    .collect();
    let (builtin, python) = (&runs[0], &runs[1]);
    assert_eq!(builtin.0.len(), 2);
    let rewards: Vec<f64> = builtin.0.iter().map(|m| m["reward_mean"].as_f64().unwrap()).collect();
    assert!(rewards.iter().any(|&r| r > 0.0), "no reward to compare: {rewards:?}");
    for (step, (b, p)) in builtin.0.iter().zip(&python.0).enumerate() {
        assert_eq!(b, p, "step {}", step + 1);
    }
    assert_eq!(builtin.1, python.1, "the samples differ");
}

/// The pair-programming example (model code scored in collm's sandbox over the protocol) trains
/// end to end from its own config, with a tiny model in place of SmolLM2.
#[test]
fn the_pair_coding_example_trains_end_to_end() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tasks/pair_coding/config.toml");
    let sets = ["steps=2", "eval_every=2", "checkpoint_every=0", "agents.model=tiny", "agents.format=raw", "agents.tiny.vocab=bytes"]
        .into_iter()
        .chain(["sampling.max_new_tokens=8", "agents.lr=1e-3", "critic.lr=1e-3"])
        .map(String::from)
        .collect::<Vec<_>>();
    let cfg = Config::load(&path, &sets).unwrap();
    let dir = std::env::temp_dir().join(format!("collm-task-pair-coding-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let lines = Trainer::new(cfg, &dir).unwrap().run(false).unwrap();
    let train: Vec<&Value> = lines.iter().filter(|l| l.get("reward_mean").is_some()).collect();
    assert_eq!(train.len(), 2);
    for l in &train {
        for m in ["pass_rate", "helper_defined", "main_defined", "uses_helper", "timeout"] {
            assert!(l["metrics"][m].as_f64().is_some_and(f64::is_finite), "no metric {m}: {l}");
        }
    }
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(text.lines().any(|l| serde_json::from_str::<Value>(l).unwrap()["eval_reward_mean"].is_f64()), "no eval line:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
