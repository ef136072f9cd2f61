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
                // The paper configs name CUDA devices, which a CPU-only build refuses (see
                // trainer.rs::the_paper_configs_place_bf16_models_one_per_gpu_and_run_on_the_cpu_when_told).
                let cpu: Vec<String> = if p.to_string_lossy().ends_with("-paper.toml") && !cfg!(feature = "cuda") {
                    vec!["agents.device=\"cpu\"".into(), "critic.device=\"cpu\"".into()]
                } else {
                    vec![]
                };
                Config::load(&p, &cpu).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
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

/// A task program that keeps failing stops training with an error naming it, the item and the
/// turn, after its restarts; the last checkpoint is intact and the run resumes from it once the
/// program works again.
#[test]
fn a_failing_task_program_stops_training_with_the_last_checkpoint_intact() {
    let dir = std::env::temp_dir().join(format!("collm-task-failing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (program, data, counter, broken) = (dir.join("flaky.py"), dir.join("rows.jsonl"), dir.join("count"), dir.join("broken"));
    std::fs::write(&data, (0..6).map(|i| format!("{{\"n\": {i}}}\n")).collect::<String>()).unwrap();
    // After 4 step requests (2 train steps of buffer 2) it exits on every request while `broken` exists.
    std::fs::write(
        &program,
        format!(
            "import json, os, sys\nCOUNT, BROKEN = {:?}, {:?}\nfor line in sys.stdin:\n    msg = json.loads(line)\n    op = msg['op']\n    if op == 'hello':\n        reply = {{'protocol': 1, 'agents': 2, 'name': 'flaky'}}\n    elif op == 'observe':\n        reply = {{'observations': ['n=%d:' % msg['item']['n']] * 2}}\n    else:\n        n = int(open(COUNT).read()) if os.path.exists(COUNT) else 0\n        open(COUNT, 'w').write(str(n + 1))\n        if n >= 4 and os.path.exists(BROKEN):\n            sys.stderr.write('flaky: giving up on request %d\\n' % n)\n            sys.exit(1)\n        reply = {{'reward': float(len(msg['joint_actions'][0][1]) % 3), 'observations': ['', '']}}\n    print(json.dumps(reply), flush=True)\n",
            counter.display().to_string(),
            broken.display().to_string()
        ),
    )
    .unwrap();
    std::fs::write(&broken, "").unwrap();
    let toml = format!(
        "seed = 0\nalgo = \"cc\"\nsteps = 4\nbuffer = 2\neval_every = 0\ncheckpoint_every = 1\n[task]\nname = \"external\"\ncommand = [\"python3\", {:?}]\ndata = {:?}\nrestarts = 1\ntimeout = 10\n[agents]\nmodel = \"tiny\"\nformat = \"raw\"\n[agents.tiny]\nvocab = \"bytes\"\nhidden = 16\nlayers = 1\nheads = 2\nkv_heads = 1\nintermediate = 32\n[sampling]\nmax_new_tokens = 4\n",
        program.display().to_string(),
        data.display().to_string()
    );
    let cfg = Config::from_toml(&toml, "test config", &[]).unwrap();
    let out = dir.join("run");
    let err = format!("{:#}", Trainer::new(cfg, &out).unwrap().run(false).unwrap_err());
    assert!(err.contains("flaky.py") && err.contains("item") && err.contains("turn 0") && err.contains("giving up on request"), "{err}");
    assert!(err.contains("task.restarts = 1"), "{err}");
    let latest = collm_rl::trainer::latest_checkpoint(&out).unwrap().expect("a checkpoint");
    assert!(latest.ends_with("step-000002"), "{}", latest.display());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    // Fixed, the run resumes from step 2 and finishes.
    std::fs::remove_file(&broken).unwrap();
    let lines = Trainer::resume(&out).unwrap().run(false).unwrap();
    assert_eq!(lines.last().and_then(|l| l["step"].as_u64()), Some(4), "{lines:?}");
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 4);
    let _ = std::fs::remove_dir_all(&dir);
}
