//! The `collm` binary end to end: rewards, training on a tiny synthetic team, and clear errors.

use std::path::PathBuf;
use std::process::Command;

fn collm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_collm"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("collm-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

#[test]
fn reward_scores_a_joint_action_like_training() {
    let d = tmp("reward");
    let (r1, r2) = (d.join("r1.txt"), d.join("r2.txt"));
    std::fs::write(&r1, "a0 a1 a2 a3 a4 a5 a6 a7 a8 a9").unwrap();
    std::fs::write(&r2, "b0 b1 b2").unwrap();
    let lex = shared().join("data/writing/lexicons.json");
    let out =
        collm().args(["reward", "--task", "tldr", "--json", "--lexicons"]).arg(&lex).arg("--responses").arg(&r1).arg(&r2).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Agent 2 has 3 tokens: the length level fails, the reward is 0.
    assert_eq!(v["reward"], 0.0);
    assert_eq!(v["stopped_at"], "length");
    let out = collm().args(["reward", "--task", "tldr", "--responses"]).arg(&r1).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 agents"));
}

#[test]
fn reward_and_sandbox_for_coding_and_minecraft() {
    let d = tmp("reward-tasks");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(shared().join("data/coding/coop_humaneval.json")).unwrap()).unwrap();
    let item = d.join("item.json");
    std::fs::write(&item, rows[0].to_string()).unwrap();
    let (r1, r2) = (d.join("aux.py"), d.join("main.py"));
    std::fs::write(&r1, "def aux(n):\n    return n > 1 and all(n % k for k in range(2, n))\n").unwrap();
    std::fs::write(&r2, "```python\ndef x_or_y(n, x, y):\n    if aux(n):\n        return x\n    return y\n```").unwrap();
    let out = collm()
        .args(["reward", "--task", "coophumaneval", "--json", "--item"])
        .arg(&item)
        .arg("--responses")
        .arg(&r1)
        .arg(&r2)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 0.4 + 0.6 + 0.5 + 1 (5/5 tests) + 1 (aux called) + 1 (not a thin wrapper) - 4.
    assert!((v["reward"].as_f64().unwrap() - 0.5).abs() < 1e-9, "{v}");
    assert_eq!(v["metrics"]["pass_rate"], 1.0);
    assert!(v["next_observations"][1].as_str().unwrap().contains("Tests: 5/5 passed"));
    // StrBuild: one correct block of "I" from each agent, one malformed line.
    let s = d.join("s.json");
    std::fs::write(&s, r#"{"string": "I", "difficulty": 1}"#).unwrap();
    std::fs::write(&r1, "/setblock 2 0 0 stone\nplace a block please\n").unwrap();
    std::fs::write(&r2, "/setblock 2 1 0 obsidian\n").unwrap();
    let out =
        collm().args(["reward", "--task", "str_build", "--json", "--item"]).arg(&s).arg("--responses").arg(&r1).arg(&r2).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["metrics"]["malformed"], 1.0);
    assert!(v["metrics"]["coverage"].as_f64().unwrap() > 0.0, "{v}");
    // The sandbox on its own: a timeout, as JSON.
    let f = d.join("loop.py");
    std::fs::write(&f, "print('start', flush=True)\nwhile True:\n    pass\n").unwrap();
    let out = collm().args(["sandbox", "--timeout", "0.5", "--json"]).arg(&f).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["status"].as_str(), v["stdout"].as_str()), (Some("timeout"), Some("start\n")));
    assert!(v["wall_s"].as_f64().unwrap() < 3.0);
}

#[test]
fn train_eval_and_resume_a_tiny_team_from_the_command_line() {
    let d = tmp("train");
    let cfg = d.join("c.toml");
    std::fs::write(
        &cfg,
        "steps = 4\nbuffer = 4\ncheckpoint_every = 2\n[task]\nname = \"synthetic\"\nturns = 2\n[agents]\nmodel = \"tiny\"\nformat = \"raw\"\nlr = 1e-3\n[sampling]\nmax_new_tokens = 1\ntemperature = 1.0\ntop_p = 1.0\n[critic]\nlr = 1e-3\n",
    )
    .unwrap();
    let run = d.join("run");
    let out = collm().args(["train", "--quiet", "--config"]).arg(&cfg).arg("--out").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["steps"], 4);
    let out = collm().args(["eval", "--checkpoint"]).arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((e["step"].as_u64(), e["episodes"].as_u64()), (Some(4), Some(16)));
    // A second train into the same directory is refused; resume at the end has nothing to do.
    let out = collm().args(["train", "--quiet", "--config"]).arg(&cfg).arg("--out").arg(&run).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a run"));
    let out = collm().args(["train", "--quiet", "--resume"]).arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn bad_inputs_are_clear_errors() {
    let d = tmp("bad");
    let cfg = d.join("bad.toml");
    std::fs::write(&cfg, "steps = 4\n[task]\nname = \"synthetic\"\nturnz = 2\n").unwrap();
    let out = collm().args(["train", "--config"]).arg(&cfg).arg("--out").arg(d.join("run")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.toml") && err.contains("turnz"), "{err}");
    let out = collm().args(["train", "--config"]).arg(d.join("missing.toml")).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
    let out = collm().args(["generate", "--model"]).arg(d.join("nope.gguf")).args(["--prompt", "x"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("nope.gguf") && err.contains("not found"), "{err}");
    // Numbers that used to panic (exit 101) or abort (134) are clear errors (exit 1).
    let py = d.join("ok.py");
    std::fs::write(&py, "print(1)\n").unwrap();
    let out = collm().arg("sandbox").arg(&py).args(["--timeout", "1e300"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--timeout"), "{err}");
    let out = collm().arg("sandbox").arg(&py).args(["--memory-mb", "0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--memory-mb"), "{err}");
    let r = d.join("r.txt");
    std::fs::write(&r, "a").unwrap();
    let out = collm().args(["reward", "--task", "summary", "--reward-shift", "nan", "--responses"]).arg(&r).arg(&r).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--reward-shift"), "{err}");
    for (flag, v) in [("--temperature", "nan"), ("--temperature", "-1"), ("--top-p", "1.5"), ("--top-p", "0")] {
        let out = collm().args(["generate", "--model", "nope.gguf", "--prompt", "x", &format!("{flag}={v}")]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(flag), "{flag} {v}: {err}");
    }
    for turn in ["18446744073709551615", "300000000"] {
        let out = collm().args(["reward", "--task", "summary", "--turn", turn, "--responses"]).arg(&r).arg(&r).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "--turn {turn}: {err}");
        assert!(err.contains("--turn"), "{err}");
    }
    // A response that cannot fit the context used to generate for ever.
    let out = collm()
        .args(["generate", "--model", "smollm2-135m", "--greedy", "--prompt", "Hi", "--max-new-tokens", "1000000000"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--max-new-tokens 1000000000") && err.contains("context of 8192 tokens"), "{err}");
    let synthetic = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/synthetic-dense.toml");
    for set in ["agents.tiny.heads=0", "agents.tiny.hidden=0", "k=100000", "sampling.max_new_tokens=1000000000", "agents.tiny.hidden=65536"]
    {
        let out = collm()
            .args(["train", "--config"])
            .arg(&synthetic)
            .args(["--set", "steps=1", "--set", set, "--out"])
            .arg(d.join(set))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{set}: {err}");
        let key = set.split('=').next().unwrap().rsplit('.').next().unwrap();
        assert!(err.contains(key) || err.contains("memory is available"), "{set}: {err}");
    }
}

#[test]
fn reward_scores_through_an_external_task_program() {
    let d = tmp("external-reward");
    let item = d.join("item.json");
    std::fs::write(&item, r#"{"question": "Ben has 4 cards and gets 3 more. How many cards does Ben have now?", "answer": 7}"#).unwrap();
    let (r0, r1) = (d.join("r0.txt"), d.join("r1.txt"));
    std::fs::write(&r0, "4 plus 3").unwrap();
    std::fs::write(&r1, "7").unwrap();
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/tasks/arithmetic/config.toml");
    let out = collm()
        .args(["reward", "--task", "external", "--json", "--config"])
        .arg(&config)
        .arg("--item")
        .arg(&item)
        .arg("--responses")
        .arg(&r0)
        .arg(&r1)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((v["reward"].as_f64().unwrap() - 1.4).abs() < 1e-12, "{v}");
    assert_eq!(v["metrics"]["exact"], 1.0);
    let out = collm().args(["reward", "--task", "external", "--responses"]).arg(&r0).arg(&r1).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("give --config"));
}

/// `collm bench env` times the protocol at each worker count and reports the machine, the pipe
/// floor and the built-in reward beside it (figures are not checked: timings are benchmarks).
#[test]
fn bench_env_reports_the_protocol_cost_per_worker_count() {
    let out = collm().args(["bench", "env", "--workers", "1,2", "--joint-actions", "50", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ext = v["external"].as_array().unwrap();
    assert_eq!(ext.iter().map(|r| r["workers"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2]);
    for r in ext {
        assert!(r["ms_per_joint_action"].as_f64().is_some_and(|x| x > 0.0 && x.is_finite()), "{v}");
    }
    assert!(v["pipe_round_trip_ms"].as_f64().is_some_and(|x| x > 0.0) && v["cpu"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
    let out = collm().args(["bench", "env", "--workers", "0"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--workers"));
}

/// `collm run` executes a trained team decentralized: the same episodes (rewards, per-turn
/// rewards, metrics) as `collm eval` on the same items and seeds, with the critic's files never
/// read (they are destroyed first, and `collm eval`, which loads the critic, then fails).
#[test]
fn run_executes_the_team_without_its_critic_and_matches_eval() {
    let d = tmp("run");
    let config = d.join("team.toml");
    std::fs::write(
        &config,
        "seed = 3\nalgo = \"cc\"\nsteps = 2\nbuffer = 2\neval_every = 0\ncheckpoint_every = 2\n[task]\nname = \"summary\"\nturns = 2\n\
         [agents]\nmodel = \"tiny\"\nformat = \"raw\"\nlr = 1e-3\n[agents.tiny]\nvocab = \"bytes\"\nhidden = 16\nlayers = 1\nheads = 2\nkv_heads = 1\nintermediate = 32\n\
         [sampling]\nmax_new_tokens = 12\ntemperature = 1.0\ntop_p = 1.0\n[critic]\nlr = 1e-3\n",
    )
    .unwrap();
    let run = d.join("out");
    let out = collm().args(["train", "--config"]).arg(&config).arg("--out").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json = |out: std::process::Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let eval = json(collm().args(["eval", "--sampled", "--checkpoint"]).arg(&run).output().unwrap());
    // Destroy the critic: unreadable garbage in place of every file it saved.
    let critic = run.join("checkpoints/step-000002/critic_0");
    let files: Vec<PathBuf> = std::fs::read_dir(&critic).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(!files.is_empty());
    for f in &files {
        std::fs::write(f, b"not a critic").unwrap();
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    }
    let transcripts = d.join("episodes.jsonl");
    let ran = json(collm().args(["run", "--sampled", "--checkpoint"]).arg(&run).arg("--out").arg(&transcripts).output().unwrap());
    for k in ["episodes", "reward_mean", "reward_per_turn", "metrics", "step"] {
        assert_eq!(ran[k], eval[k], "{k}: run {ran} vs eval {eval}");
    }
    assert_eq!(ran["episodes"], 2);
    assert!(ran["peak_rss_mb"].as_f64().is_some_and(|m| m > 0.0), "{ran}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&transcripts).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    let mean_return = lines.iter().map(|l| l["return"].as_f64().unwrap()).sum::<f64>() / 2.0;
    assert!((mean_return - eval["reward_mean"].as_f64().unwrap()).abs() < 1e-9, "{mean_return} vs {eval}");
    for l in &lines {
        let turns = l["turns"].as_array().unwrap();
        assert_eq!(turns.len(), 2, "{l}");
        assert!(turns.iter().all(|t| t["responses"].as_array().unwrap().len() == 2 && t["observations"].as_array().unwrap().len() == 2));
    }
    // Proof that the critic's files were needed by eval and left alone by run.
    let out = collm().args(["eval", "--sampled", "--checkpoint"]).arg(&run).output().unwrap();
    assert!(!out.status.success(), "eval loaded a destroyed critic");
    // Greedy runs too, and another task with the same number of agents.
    let other = json(collm().args(["run", "--task", "tldr", "--items", "1", "--checkpoint"]).arg(&run).output().unwrap());
    assert_eq!((other["task"].as_str(), other["episodes"].as_u64()), (Some("tldr"), Some(1)), "{other}");
}

/// `collm bench peak` measures the GEMM rate at each shape and the copy bandwidth (figures are not
/// checked against any speed: timings are benchmarks), and refuses an absurd size.
#[test]
fn bench_peak_reports_gemm_rates_and_bandwidth() {
    let out = collm().args(["bench", "peak", "--size", "128", "--copy-mib", "8", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let rows = v["collm_gemm"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "{text}");
    assert_eq!(rows[0]["m"], 128);
    // A linear layer's three GEMMs: the forward and both gradients' layouts.
    let ops: std::collections::BTreeSet<&str> = rows.iter().map(|r| r["operands"].as_str().unwrap()).collect();
    assert_eq!(ops, ["Nn", "Nt", "Tn"].into_iter().collect(), "{text}");
    for r in rows {
        assert!(r["gflops"].as_f64().unwrap() > 0.0 && r["gemm_crate_gflops"].as_f64().unwrap() > 0.0, "{text}");
    }
    // Both kernels are timed where the CPU has AVX-512, and collm's own only runs there.
    let avx512 = v["avx512f"].as_bool().unwrap();
    assert!(rows.iter().all(|r| r["avx512_gflops"].as_f64().is_some() == avx512), "{text}");
    assert!(v["kernel"] == "GemmCrate" || (v["kernel"] == "Avx512" && avx512), "{text}");
    let best = v["best_gemm_gflops"].as_f64().unwrap();
    assert!(rows.iter().all(|r| r["gflops"].as_f64().unwrap() <= best), "{text}");
    // scripts/test.sh makes target/pyenv, whose numpy gives the BLAS figure.
    let blas = v["blas_square_gflops"].as_f64();
    assert!(blas.is_some_and(|b| b > 0.0 && b <= best) && v["blas"].as_str().unwrap().starts_with("numpy"), "{text}");
    let out =
        collm().args(["bench", "peak", "--size", "64", "--copy-mib", "1", "--python", "/nonexistent/python", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success() && v["blas_square_gflops"].is_null(), "{v}");
    assert!(
        v["copy_gb_s"].as_f64().unwrap() > 0.0 && v["read_gb_s"].as_f64().unwrap() > 0.0 && v["threads"].as_u64().unwrap() >= 1,
        "{text}"
    );
    let out = collm().args(["bench", "peak", "--size", "100000"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size 100000"));
}

/// `collm bench serve` times the server against generate() at each client count (figures are
/// not checked: timings are benchmarks; the greedy token counts must agree).
#[test]
fn bench_serve_compares_the_server_with_generate() {
    let out = collm().args(["bench", "serve", "--clients", "1,2", "--requests", "1", "--max-tokens", "4", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert_eq!(r["tokens"]["serve"], r["tokens"]["generate"], "{r}");
        assert!(r["serve_tokens_per_s"].as_f64().is_some_and(|x| x > 0.0), "{r}");
    }
}

/// On a terminal `collm train` draws a progress bar with its rate and ETA; into a pipe it
/// prints one plain line per step.
#[test]
fn train_shows_a_bar_on_a_terminal_and_lines_otherwise() {
    let d = tmp("progress");
    let config = d.join("c.toml");
    std::fs::write(
        &config,
        "seed = 1\nalgo = \"cc\"\nsteps = 3\nbuffer = 2\neval_every = 0\ncheckpoint_every = 0\n[task]\nname = \"synthetic\"\n[agents]\nmodel = \"tiny\"\nformat = \"raw\"\n[sampling]\nmax_new_tokens = 3\n",
    )
    .unwrap();
    let plain = collm().args(["train", "--config"]).arg(&config).arg("--out").arg(d.join("a")).output().unwrap();
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(err.contains("step    3/3 reward") && !err.contains("\x1b["), "{err}");
    // `script` gives the command a terminal.
    let cmd = format!("{} train --config {} --out {}", env!("CARGO_BIN_EXE_collm"), config.display(), d.join("b").display());
    let tty = Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().unwrap();
    assert!(tty.status.success(), "{}", String::from_utf8_lossy(&tty.stdout));
    let out = String::from_utf8_lossy(&tty.stdout);
    assert!(out.contains("3/3 steps") && out.contains("ETA") && out.contains("/s") && !out.contains("step    3/3 reward"), "{out}");
}

/// `collm export` of a tiny trained team: an agent as a Hugging Face directory that collm loads
/// back, the critic with its value head, and clear errors for what a run cannot give.
#[test]
fn export_writes_agents_and_the_critic_and_refuses_what_it_cannot() {
    let d = tmp("export");
    let config = d.join("c.toml");
    std::fs::write(
        &config,
        "seed = 2\nalgo = \"cc\"\nsteps = 1\nbuffer = 2\neval_every = 0\ncheckpoint_every = 1\n[task]\nname = \"summary\"\n\
         [agents]\nmodel = \"tiny\"\nformat = \"raw\"\n[agents.tiny]\nvocab = \"bytes\"\nhidden = 16\nlayers = 1\nheads = 2\nkv_heads = 1\nintermediate = 32\n\
         [sampling]\nmax_new_tokens = 4\n",
    )
    .unwrap();
    let run = d.join("run");
    let out = collm().args(["train", "--config"]).arg(&config).arg("--out").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let export = |args: &[&str]| collm().arg("export").arg("--checkpoint").arg(&run).args(args).output().unwrap();
    let agent = d.join("agent1");
    let out = export(&["--agent", "1", "--format", "hf", "--out", agent.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = collm_model::loader::load(agent.to_str().unwrap()).unwrap();
    assert_eq!(m.model.cfg.hidden_size, 16);
    let critic = d.join("critic");
    let out = export(&["--critic", "0", "--format", "hf", "--out", critic.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["config.json", "model.safetensors", "tokenizer.json", "value_head.safetensors", "value_head.json"] {
        assert!(critic.join(f).exists(), "no {f}");
    }
    assert!(!collm_model::loader::read_safetensors(&critic.join("value_head.safetensors")).unwrap().is_empty());
    let err = |out: std::process::Output| {
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(err(export(&["--critic", "3", "--format", "hf", "--out", "x"])).contains("has 1 critic"));
    assert!(err(export(&["--agent", "5", "--format", "hf", "--out", "x"])).contains("has 2 agent"));
    assert!(err(export(&["--format", "peft", "--out", "x"])).contains("needs a LoRA model"));
    assert!(err(export(&["--format", "gguf", "--out", "x"])).contains("tiny"));
}

/// `collm bench gpu` (what scripts/gpu-check.sh runs on a GPU) runs end to end with the CPU as
/// the device: every op on the generic path agrees with the fused kernels, the f32 log-probs
/// agree with the CPU's and bf16's are near them, and the train step reports its FLOP rate.
#[test]
fn bench_gpu_runs_its_sections_on_the_cpu() {
    let args = ["bench", "gpu", "--device", "cpu", "--decode-shapes", "", "--train-shape", "smollm2-135m", "--train-batch", "1"];
    let out = collm().args(args).args(["--train-tokens", "16", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let sections = summary["summary"].as_array().unwrap();
    let get = |name: &str| &sections.iter().find(|s| s["section"] == name).unwrap_or_else(|| panic!("no {name}: {text}"))["result"];
    assert_eq!(get("ops")["all_within_1e-4"], true, "{text}");
    assert_eq!(get("ops")["checks"].as_array().unwrap().len(), 8);
    // No CUDA kernel runs on the CPU: every kernel check says so, none passes, and the train step
    // runs once (with the generic path).
    let k = get("kernels");
    assert_eq!(k["passed"].as_array().unwrap().len(), 0, "{k}");
    assert_eq!(k["checks"].as_array().unwrap().len(), 13, "{k}");
    assert!(k["checks"].as_array().unwrap().iter().all(|c| c["ran"] == false), "{k}");
    assert_eq!(sections.iter().filter(|s| s["section"].as_str().unwrap().starts_with("train_step")).count(), 1);
    let lp = get("logprobs_vs_cpu");
    assert!(lp["f32"]["max_abs_diff"].as_f64().unwrap() < 1e-3, "{lp}");
    let bf16 = lp["bf16"]["mean_abs_diff"].as_f64().unwrap();
    assert!(bf16 > 0.0 && bf16 < 0.1, "{lp}");
    let step = get("train_step");
    assert!(step["step_s"].as_f64().unwrap() > 0.0 && step["tflops"].as_f64().unwrap() > 0.0, "{step}");
    assert_eq!(step["params"], 134_515_008u64);
    let out = collm().args(["bench", "gpu", "--device", "cuda:0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if !cfg!(feature = "cuda") {
        assert!(!out.status.success() && err.contains("built without CUDA"), "{err}");
    }
}

#[test]
fn a_typo_in_the_cuda_kernel_switch_stops_collm_before_it_starts() {
    let d = tmp("kernel-switch");
    let r1 = d.join("r1.txt");
    std::fs::write(&r1, "a b c").unwrap();
    let out = collm()
        .env("COLLM_CUDA_KERNELS", "attention,flash")
        .args(["reward", "--task", "tldr", "--responses"])
        .arg(&r1)
        .arg(&r1)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("COLLM_CUDA_KERNELS") && err.contains("\"flash\"") && err.contains("attention, rms_norm"), "{err}");
    // Switched on or off, a CPU run is the same (no kernel serves a CPU tensor): the same scores.
    let outs: Vec<String> = ["all", "off"]
        .iter()
        .map(|v| {
            let out = collm()
                .env("COLLM_CUDA_KERNELS", v)
                .args(["score", "--prompt", "The capital of France is", "--json", "--response-file"])
                .arg(&r1)
                .output()
                .unwrap();
            assert!(out.status.success(), "{v}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).to_string()
        })
        .collect();
    assert!(outs[0].contains("logprob"), "{}", outs[0]);
    assert_eq!(outs[0], outs[1]);
}
