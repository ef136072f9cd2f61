//! Faults during training, injected into the real binary: `kill -9` at random moments (many
//! landing mid-checkpoint), SIGINT and SIGTERM, and a disk that fills up. Nothing may be lost:
//! a run that is resumed after every fault ends with the same metrics as one never interrupted,
//! and a full disk is a clear error with the previous checkpoint intact.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn collm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_collm"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("collm-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny two-agent run that takes a few tens of milliseconds per step and checkpoints after
/// every step, so that kills often land while a checkpoint is being written.
const CONFIG: &str = r#"
seed = 3
algo = "cc"
steps = 14
buffer = 4
gamma = 0.9
checkpoint_every = 1
eval_every = 5
eval_items = 2
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
lr = 1e-3
[sampling]
max_new_tokens = 1
temperature = 1.0
top_p = 1.0
[critic]
lr = 1e-3
"#;

/// The config with `steps` changed.
fn write_config(dir: &Path, steps: usize) -> PathBuf {
    let p = dir.join("config.toml");
    std::fs::write(&p, CONFIG.replace("steps = 14", &format!("steps = {steps}"))).unwrap();
    p
}

/// metrics.jsonl without the wall-clock fields.
fn metrics(run: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            for k in ["gen_s", "update_s", "step_s", "tokens_per_s"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        })
        .collect()
}

fn train_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map(|t| t.lines().filter(|l| l.contains("\"reward_mean\"")).count()).unwrap_or(0)
}

fn start(config: &Path, run: &Path) -> Child {
    let mut c = collm();
    if run.join("checkpoints").exists()
        && std::fs::read_dir(run.join("checkpoints")).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with("step-"))
    {
        c.args(["train", "--quiet", "--resume"]).arg(run);
    } else {
        // Killed before its first checkpoint: collm says to remove the run and start again.
        let _ = std::fs::remove_dir_all(run);
        c.args(["train", "--quiet", "--config"]).arg(config).arg("--out").arg(run);
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

/// A checkpoint's temporary directory exists: one is being written (or a kill left it).
fn writing_checkpoint(run: &Path) -> bool {
    std::fs::read_dir(run.join("checkpoints"))
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(".tmp-")))
        .unwrap_or(false)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, sig) };
}

#[test]
fn kill_9_at_random_moments_loses_nothing() {
    let dir = tmp("kill9");
    const STEPS: u64 = 100;
    let config = write_config(&dir, STEPS as usize);
    let reference = dir.join("reference");
    let out = collm().args(["train", "--quiet", "--config"]).arg(&config).arg("--out").arg(&reference).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = metrics(&reference);

    let run = dir.join("killed");
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let (mut kills, mut mid_checkpoint, mut before_first) = (0, 0, 0);
    loop {
        let mut child = start(&config, &run);
        // A seeded delay of 20-250 ms, then kill -9 (unless the run finished first).
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(20 + rng % 230);
        // Every third life is killed the moment a checkpoint is being written instead.
        let at_checkpoint = kills % 3 == 2;
        let t0 = Instant::now();
        let mut finished = None;
        while t0.elapsed() < if at_checkpoint { Duration::from_secs(5) } else { delay } {
            if let Some(s) = child.try_wait().unwrap() {
                finished = Some(s);
                break;
            }
            if at_checkpoint && writing_checkpoint(&run) {
                break;
            }
            std::thread::sleep(Duration::from_micros(if at_checkpoint { 200 } else { 2000 }));
        }
        if let Some(s) = finished {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(s.success(), "a run after {kills} kills failed: {err}");
            break;
        }
        signal(&child, libc::SIGKILL);
        child.wait().unwrap();
        kills += 1;
        if writing_checkpoint(&run) {
            mid_checkpoint += 1;
        }
        if !run.join("checkpoints").exists() {
            before_first += 1;
        }
        assert!(kills < 5 * STEPS, "the run never finished");
    }
    eprintln!("kill -9: {kills} kills, {mid_checkpoint} of them while a checkpoint was being written, {before_first} before the first");
    assert!(kills >= 10, "only {kills} kills: the run is too short to test this");
    assert!(mid_checkpoint >= 3, "only {mid_checkpoint} of {kills} kills landed mid-checkpoint");
    assert_eq!(metrics(&run), want, "after {kills} kills the run's metrics differ from the uninterrupted run's");
    let samples = std::fs::read_to_string(run.join("samples.jsonl")).unwrap();
    let steps: Vec<u64> = samples.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<u64>>(), "samples.jsonl holds each step once");
}

#[test]
fn sigint_and_sigterm_write_a_checkpoint_and_exit_130_and_143() {
    for (sig, code, name) in [(libc::SIGINT, 130, "SIGINT"), (libc::SIGTERM, 143, "SIGTERM")] {
        let dir = tmp(&format!("sig{sig}"));
        // No checkpoints on its own: the one there is must come from the signal.
        let config = write_config(&dir, 14);
        let run = dir.join("run");
        let child = collm()
            .args(["train", "--quiet", "--set", "steps=100000", "--set", "checkpoint_every=0", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&run)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while train_lines(&run) < 3 {
            assert!(t0.elapsed() < Duration::from_secs(120), "the run made no progress");
            std::thread::sleep(Duration::from_millis(10));
        }
        signal(&child, sig);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{name}: {err}");
        assert!(err.contains(&format!("stopped by {name}")) && err.contains("collm train --resume"), "{name}: {err}");
        let steps = train_lines(&run);
        let ckpt = collm_checkpoint(&run).unwrap_or_else(|| panic!("{name}: no checkpoint"));
        assert!(ckpt.ends_with(format!("step-{steps:06}")), "{name}: checkpoint {} for {steps} logged steps", ckpt.display());
        // It resumes from there and goes on.
        let out = collm().args(["train", "--quiet", "--set", &format!("steps={}", steps + 2), "--resume"]).arg(&run).output().unwrap();
        assert!(out.status.success(), "{name}: resume failed: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(train_lines(&run), steps + 2);
    }
}

fn collm_checkpoint(run: &Path) -> Option<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints")).ok()?.flatten().map(|e| e.path()).collect();
    all.retain(|p| p.file_name().unwrap().to_string_lossy().starts_with("step-"));
    all.sort();
    all.pop()
}

/// Mounts a small tmpfs (as root); None where mounting is not allowed.
fn small_disk(dir: &Path, kib: usize) -> Option<PathBuf> {
    let m = dir.join("disk");
    std::fs::create_dir_all(&m).unwrap();
    let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"]).arg(&m).status().map(|s| s.success());
    ok.unwrap_or(false).then_some(m)
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_the_last_checkpoint_survives() {
    let dir = tmp("disk");
    let config = write_config(&dir, 14);
    // About three of the tiny team's checkpoints (790 KiB each) fit.
    let disk = small_disk(&dir, 2600).expect("this test mounts a small tmpfs, which needs root (as on the CI machine)");
    let _unmount = Unmount(disk.clone());
    let run = disk.join("run");
    let out = collm().args(["train", "--quiet", "--config"]).arg(&config).arg("--out").arg(&run).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains(&run.display().to_string()), "the error names the file: {err}");
    let ckpt = collm_checkpoint(&run).expect("an earlier checkpoint");
    let leftovers: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "a half-written checkpoint was left behind");
    // Moved to a disk with room, the run resumes from it and finishes.
    let moved = dir.join("moved");
    assert!(Command::new("cp").arg("-r").arg(&run).arg(&moved).status().unwrap().success());
    let out = collm().args(["train", "--quiet", "--resume"]).arg(&moved).output().unwrap();
    assert!(out.status.success(), "resume after the full disk: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(train_lines(&moved), 14);
    eprintln!("full disk: {:?}; resumed from {}", err.lines().last(), ckpt.display());
}
