//! `collm bench model`: decode speed and train-step time of one model on this machine; `collm
//! bench train`: a training workload's epoch; `collm bench env`: the external-task protocol's cost;
//! `collm bench peak`: the machine's GEMM rate and memory bandwidth.

use anyhow::{Context, Result};
use clap::Subcommand;
use collm_model::{loader, score, AdamW, AdamWConfig, Grads, LoraConfig, SamplingParams};
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Decode tokens/s (batch 1 and 8) and teacher-forced train-step time (full and LoRA).
    Model {
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Sequences × tokens of the train step.
        #[arg(long, default_value_t = 4)]
        train_batch: usize,
        #[arg(long, default_value_t = 256)]
        train_tokens: usize,
        /// Timed repetitions of each train step (after one warm-up).
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        #[arg(long)]
        json: bool,
        /// A Python with torch and transformers: also run bench/hf_model_bench.py on the same work
        /// (same machine, same run) and print collm's figures as ratios to it.
        #[arg(long)]
        reference_python: Option<String>,
    },
    /// The external-task protocol's cost per joint action (a trivial reward through a Python worker
    /// pool) at each worker count, against the OS's pipe round trip and the built-in reward.
    Env {
        /// The task program (default: bench/trivial_task.py, a length-ratio reward).
        #[arg(long, num_args = 1.., value_delimiter = ' ')]
        command: Option<Vec<String>>,
        /// Worker counts to time (one client thread per worker, as many requests in flight).
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        workers: Vec<usize>,
        /// Joint actions scored per worker count (after a warm-up).
        #[arg(long, default_value_t = 2000)]
        joint_actions: usize,
        /// Characters of each response and of the dataset row's text.
        #[arg(long, default_value_t = 400)]
        chars: usize,
        #[arg(long)]
        json: bool,
    },
    /// This machine's f32 GEMM rate through collm's kernel (a large square and the shapes of
    /// SmolLM2's projections and output head) and through candle's matmul, and its memory
    /// bandwidth (a stream copy): the yardsticks the other benches' figures are fractions of.
    Peak {
        /// The square GEMM's size (n × n · n × n).
        #[arg(long, default_value_t = 2048)]
        size: usize,
        /// The stream copy's buffer, MiB.
        #[arg(long, default_value_t = 512)]
        copy_mib: usize,
        /// A Python with numpy, whose BLAS sgemm is timed on the same square beside collm's
        /// (default: target/pyenv's Python where scripts/pyenv.sh made it, else python3; none
        /// that imports numpy leaves the figure out).
        #[arg(long)]
        python: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// `collm serve`'s requests/s and tokens/s at each number of concurrent clients, against
    /// `generate` at the same batch sizes in the same run (greedy: the same tokens either way).
    Serve {
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        clients: Vec<usize>,
        /// Requests each client sends, one after another.
        #[arg(long, default_value_t = 2)]
        requests: usize,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        #[arg(long)]
        json: bool,
    },
    /// A GPU's check (what scripts/gpu-check.sh runs): every op on the device against the fused
    /// CPU kernels, log-probs against the CPU, decode tokens/s, a bf16 train step with its MFU,
    /// and peak device memory, on random-init models of real shapes.
    Gpu {
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// The device's dense bf16 peak, TFLOP/s (H100/H200 SXM: 989), for the MFU.
        #[arg(long, default_value_t = 989.0)]
        peak_tflops: f64,
        /// The train step's model shape (smollm2-135m, qwen3-1.7b, qwen3-4b).
        #[arg(long, default_value = "qwen3-1.7b")]
        train_shape: String,
        #[arg(long, default_value_t = 4)]
        train_batch: usize,
        #[arg(long, default_value_t = 1024)]
        train_tokens: usize,
        /// The model shapes whose decode speed is timed.
        #[arg(long, value_delimiter = ',', default_value = "smollm2-135m,qwen3-1.7b")]
        decode_shapes: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// One epoch of a fixed training workload through the real trainer (the `collm train` path).
    Train {
        /// The workload JSON (e.g. ../shared/bench/tldr_like.json).
        #[arg(long)]
        workload: std::path::PathBuf,
        #[arg(long, value_parser = ["cc", "dc", "magrpo"])]
        algo: String,
        #[arg(long, default_value_t = 1)]
        turns: usize,
        /// The model every agent and critic copies; `random:smollm2-135m` is a random-init model
        /// of SmolLM2-135M's shape with a byte vocabulary (where no weights can be brought).
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        /// Where every agent and critic lives (cpu, cuda, cuda:N).
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, value_parser = ["f32", "bf16"], default_value = "f32")]
        dtype: String,
        #[arg(long)]
        json: bool,
    },
}

/// Peak resident memory of this process, MB (VmHWM).
pub fn peak_rss_mb() -> f64 {
    match collm_model::devcheck::peak_rss_bytes() {
        0 => f64::NAN,
        b => b as f64 / (1u64 << 20) as f64,
    }
}

/// This process's page faults so far that needed no I/O (a new page is one), and its resident
/// memory now (bytes); 0 where the OS does not say.
fn faults_and_rss() -> (u64, u64) {
    // SAFETY: getrusage fills the struct it is given.
    let faults = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut ru) == 0 {
            ru.ru_minflt as u64
        } else {
            0
        }
    };
    (faults, collm_model::devcheck::rss_bytes())
}

/// Deterministic pseudo-text token ids (skipping the first 100 ids, where special tokens live).
pub fn tokens(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (100 + (x >> 33) as usize % (vocab.min(20000) - 100)) as u32
        })
        .collect()
}

/// The mean time of a teacher-forced train step (score, backward, clip, AdamW) over `repeats`
/// after one warm-up, seconds, and its FLOPs (collm_model::flops).
fn train_step_s(model: &collm_model::Transformer, b: usize, t: usize, repeats: usize, pad: u32) -> Result<(f64, u64)> {
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = (0..b)
        .map(|i| {
            let s = tokens(t, 1000 + i as u64, model.cfg.vocab_size);
            (s[..1].to_vec(), s[1..].to_vec())
        })
        .collect();
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-6, ..Default::default() });
    let mut times = vec![];
    let mut flops = 0;
    for r in 0..=repeats {
        let (t0, f0) = (Instant::now(), model.flops.total());
        // On a pool thread, as the trainer's update runs.
        collm_model::on_pool(|| -> Result<()> {
            let s = score(model, &pairs, pad, true)?;
            let loss = s.token_logprobs.mean_all()?.neg()?;
            let mut grads = Grads::new();
            grads.backward(&loss, model.trainable())?;
            grads.clip_norm(1.0)?;
            opt.step(model.trainable(), &grads)
        })?;
        if r > 0 {
            times.push(t0.elapsed().as_secs_f64());
            flops = model.flops.total() - f0;
        }
    }
    Ok((times.iter().sum::<f64>() / times.len() as f64, flops))
}

/// Runs bench/hf_model_bench.py (transformers + PyTorch, float32) on the same work.
fn hf_reference(py: &str, model: &str, prompt: usize, new: usize, b: usize, t: usize, repeats: usize) -> Result<serde_json::Value> {
    let gguf = loader::resolve(model)?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/hf_model_bench.py");
    eprintln!("collm: running the transformers reference ({py} {})", script.display());
    let out = std::process::Command::new(py)
        .arg(&script)
        .args(["--gguf", &gguf.display().to_string()])
        .args(["--prompt-tokens", &prompt.to_string(), "--new-tokens", &new.to_string()])
        .args(["--train-batch", &b.to_string(), "--train-tokens", &t.to_string(), "--repeats", &repeats.to_string()])
        .args(["--threads", &rayon::current_num_threads().to_string()])
        .stderr(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {py}"))?;
    if !out.status.success() {
        anyhow::bail!("the transformers reference failed ({}); it needs torch and transformers in {py}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).context("the transformers reference printed no JSON")
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Train { workload, algo, turns, model, device, dtype, json } => {
            bench_train(&workload, &algo, turns, &model, &device, &dtype, json)
        }
        BenchCmd::Gpu { device, peak_tflops, train_shape, train_batch, train_tokens, decode_shapes, json } => {
            crate::bench_gpu::run(crate::bench_gpu::GpuBench {
                device,
                peak_tflops,
                train_shape,
                train_batch,
                train_tokens,
                decode_shapes,
                json,
            })
        }
        m @ BenchCmd::Model { .. } => bench_model(m),
        BenchCmd::Env { command, workers, joint_actions, chars, json } => bench_env(command, &workers, joint_actions, chars, json),
        BenchCmd::Serve { model, clients, requests, max_tokens, json } => bench_serve(&model, &clients, requests, max_tokens, json),
        BenchCmd::Peak { size, copy_mib, python, json } => bench_peak(size, copy_mib, python, json),
    }
}

/// The best of `n` timings of `f`, seconds.
fn best_of(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..n {
        let t0 = Instant::now();
        f()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// The f32 GEMM rate of numpy's BLAS on an n³ square with `threads` threads, and the library's
/// name; None where `py` does not run or has no numpy.
fn numpy_gemm(py: &str, n: usize, threads: usize) -> Option<(f64, String)> {
    const SCRIPT: &str = r#"
import json, sys, time
import numpy as np
n = int(sys.argv[1])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
a @ b
best = min((lambda t0: (a @ b, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(3))
try:
    lib = ", ".join(sorted({i.get("internal_api", "?") for i in np.show_config(mode="dicts")["Build Dependencies"]["blas"].values() if isinstance(i, dict)} | {np.show_config(mode="dicts")["Build Dependencies"]["blas"].get("name", "?")}))
except Exception:
    lib = "?"
print(json.dumps({"gflops": 2 * n**3 / best / 1e9, "lib": f"numpy {np.__version__} ({lib})"}))
"#;
    let threads = threads.to_string();
    let out = std::process::Command::new(py)
        .args(["-c", SCRIPT, &n.to_string()])
        .envs(["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"].map(|k| (k, threads.as_str())))
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((v["gflops"].as_f64()?, v["lib"].as_str()?.to_string()))
}

/// This machine's yardsticks, as `collm bench peak` reports them: f32 GEMM rates (collm's
/// kernels, candle, numpy's BLAS) and the copy bandwidth. `best_gemm_gflops` and `copy_gb_s` are
/// what the other benches give their figures as fractions of.
pub fn measure_peak(size: usize, copy_mib: usize, python: Option<String>) -> Result<serde_json::Value> {
    if size == 0 || size > 16384 {
        anyhow::bail!("--size {size}: give a GEMM size from 1 to 16384");
    }
    if copy_mib == 0 || copy_mib > 16384 {
        anyhow::bail!("--copy-mib {copy_mib}: give a buffer from 1 to 16384 MiB");
    }
    let data = |n: usize, seed: u64| -> Vec<f32> { (0..n as u64).map(|i| ((i * 7919 + seed) % 1000) as f32 / 1000.0 - 0.5).collect() };
    use collm_model::sgemm::{best_kernel, matmul_with, Kernel, Operands};
    // (name, operands, m, k, n): C[m, n] of A and B laid out as a linear layer's GEMMs lie:
    // forward x·Wᵀ (Nt), the input's gradient dy·W (Nn), the weight's gradient dyᵀ·x (Tn).
    let shapes = [
        ("square", Operands::Nt, size, size, size),
        ("q_or_up_proj_512x576x1536", Operands::Nt, 512, 576, 1536),
        ("down_proj_512x1536x576", Operands::Nt, 512, 1536, 576),
        ("up_proj_input_grad_512x1536x576", Operands::Nn, 512, 1536, 576),
        ("up_proj_weight_grad_1536x512x576", Operands::Tn, 1536, 512, 576),
        ("lm_head_256x576x49152", Operands::Nt, 256, 576, 49152),
    ];
    let kernel = best_kernel();
    let mut rows = vec![];
    for (name, ops, m, k, n) in shapes {
        let (a, b) = (data(m * k, 1), data(n * k, 2));
        let rate = |kernel: Kernel| -> Result<f64> {
            let s = best_of(3, || {
                std::hint::black_box(matmul_with(kernel, ops, &a, m, k, &b, n));
                Ok(())
            })?;
            Ok(2.0 * (m * k * n) as f64 / s / 1e9)
        };
        // Both kernels where the CPU has AVX-512; "gflops" is the one collm runs.
        let crate_gflops = rate(Kernel::GemmCrate)?;
        let avx512_gflops = if collm_model::sgemm::has_avx512() { Some(rate(Kernel::Avx512)?) } else { None };
        // AMX tiles in bf16 (a lower precision, so never the f32 peak's figure).
        let amx_gflops = if collm_model::amx::available() { Some(rate(Kernel::AmxBf16)?) } else { None };
        let gflops = match kernel {
            Kernel::Avx512 => avx512_gflops.unwrap_or(crate_gflops),
            Kernel::AmxBf16 => amx_gflops.unwrap_or(crate_gflops),
            Kernel::GemmCrate => crate_gflops,
        };
        rows.push(serde_json::json!({"shape": name, "operands": format!("{ops:?}"), "m": m, "k": k, "n": n, "gflops": gflops, "gemm_crate_gflops": crate_gflops, "avx512_gflops": avx512_gflops, "amx_bf16_gflops": amx_gflops}));
    }
    let a = candle_core::Tensor::from_vec(data(size * size, 1), (size, size), &candle_core::Device::Cpu)?;
    let b = candle_core::Tensor::from_vec(data(size * size, 2), (size, size), &candle_core::Device::Cpu)?;
    let s = best_of(3, || {
        std::hint::black_box(a.matmul(&b)?);
        Ok(())
    })?;
    let candle_gflops = 2.0 * (size as f64).powi(3) / s / 1e9;
    // On huge pages where the kernel allows, as the models' weights are: the bound a decode
    // step meets reading them (collm_model::hugepages).
    use collm_model::hugepages::{back_with_huge_pages, span};
    let src = vec![1u8; copy_mib << 20];
    let mut dst = vec![2u8; copy_mib << 20];
    back_with_huge_pages([span(&src), span(&dst)]);
    let s = best_of(5, || {
        dst.copy_from_slice(std::hint::black_box(&src));
        Ok(())
    })?;
    // A copy reads and writes every byte.
    let copy_gb_s = 2.0 * (copy_mib << 20) as f64 / s / 1e9;
    // A read on every thread (a sum, in 16 lanes so it vectorizes): what decoding does to weights.
    let floats = vec![1f32; copy_mib << 18];
    back_with_huge_pages([span(&floats)]);
    let s = best_of(5, || {
        use rayon::prelude::*;
        let sum: f32 = floats
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for x in c.chunks_exact(16) {
                    for (a, v) in acc.iter_mut().zip(x) {
                        *a += v;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(sum);
        Ok(())
    })?;
    let read_gb_s = (copy_mib << 20) as f64 / s / 1e9;
    let python = python.unwrap_or_else(|| {
        let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/pyenv/bin/python");
        if venv.exists() {
            venv.display().to_string()
        } else {
            "python3".into()
        }
    });
    let blas = numpy_gemm(&python, size, rayon::current_num_threads());
    let best = rows
        .iter()
        .flat_map(|r| [r["gemm_crate_gflops"].as_f64().unwrap_or(0.0), r["avx512_gflops"].as_f64().unwrap_or(0.0)])
        .chain(blas.as_ref().map(|b| b.0))
        .fold(candle_gflops, f64::max);
    let avx512 = collm_model::sgemm::has_avx512();
    let out = serde_json::json!({
        "cpu": cpu_name(),
        "threads": rayon::current_num_threads(),
        "avx512f": avx512,
        "kernel": format!("{kernel:?}"),
        "collm_gemm": rows,
        "candle_matmul_square_gflops": candle_gflops,
        "blas_square_gflops": blas.as_ref().map(|b| b.0),
        "blas": blas.as_ref().map(|b| b.1.clone()),
        "best_gemm_gflops": best,
        "copy_gb_s": copy_gb_s,
        "read_gb_s": read_gb_s,
        "bandwidth_gb_s": copy_gb_s.max(read_gb_s),
        "copy_mib": copy_mib,
        "python": python,
    });
    Ok(out)
}

fn bench_peak(size: usize, copy_mib: usize, python: Option<String>, json: bool) -> Result<()> {
    let out = measure_peak(size, copy_mib, python)?;
    if json {
        println!("{out}");
    } else {
        let (kernel, avx512, rows) = (
            out["kernel"].as_str().unwrap_or("?"),
            out["avx512f"].as_bool().unwrap_or(false),
            out["collm_gemm"].as_array().cloned().unwrap_or_default(),
        );
        let f = |k: &str| out[k].as_f64().unwrap_or(f64::NAN);
        let (candle_gflops, best, copy_gb_s) = (f("candle_matmul_square_gflops"), f("best_gemm_gflops"), f("copy_gb_s"));
        let (size, copy_mib) = (rows[0]["m"].as_u64().unwrap_or(0), out["copy_mib"].as_u64().unwrap_or(0));
        println!("{} ({} threads, AVX-512F {avx512}, collm GEMM kernel {kernel})", out["cpu"].as_str().unwrap_or(""), out["threads"]);
        for r in &rows {
            let g = r["gflops"].as_f64().unwrap_or(0.0);
            let mut both = match (r["gemm_crate_gflops"].as_f64(), r["avx512_gflops"].as_f64()) {
                (Some(c), Some(a)) => format!(" (gemm crate {c:.1}, collm AVX-512 {a:.1})"),
                _ => String::new(),
            };
            if let Some(x) = r["amx_bf16_gflops"].as_f64() {
                both += &format!(" [AMX tiles in bf16: {x:.1}]");
            }
            println!("  collm GEMM {:<33} {g:8.1} GFLOPS{both}", r["shape"].as_str().unwrap_or(""));
        }
        println!("  candle matmul {size}³{:>25} {candle_gflops:8.1} GFLOPS", "");
        match (out["blas_square_gflops"].as_f64(), out["blas"].as_str()) {
            (Some(g), Some(lib)) => println!("  BLAS {size}³{:>34} {g:8.1} GFLOPS ({lib})", ""),
            _ => println!("  BLAS: no figure ({} has no numpy; give --python)", out["python"].as_str().unwrap_or("?")),
        }
        println!("  best GEMM{:>35} {best:8.1} GFLOPS", "");
        println!("  stream copy ({copy_mib} MiB){:>24} {copy_gb_s:8.1} GB/s (read + write, one thread)", "");
        println!("  stream read ({copy_mib} MiB){:>24} {:8.1} GB/s (all threads)", "", f("read_gb_s"));
    }
    Ok(())
}

/// The CPU's model name (from /proc/cpuinfo), to name the machine beside its figures.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Seconds per round trip of one `bytes`-long line through a `cat` child: the pipes' floor.
fn pipe_round_trip_s(bytes: usize, n: usize) -> Result<f64> {
    use std::io::{BufRead, BufReader, Write};
    let mut child = std::process::Command::new("cat")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cat for the pipe round trip")?;
    let mut stdin = child.stdin.take().context("cat's stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().context("cat's stdout")?);
    let line = format!("{}\n", "x".repeat(bytes));
    let mut back = String::new();
    let mut once = |back: &mut String| -> Result<()> {
        stdin.write_all(line.as_bytes())?;
        stdin.flush()?;
        back.clear();
        stdout.read_line(back)?;
        Ok(())
    };
    for _ in 0..100 {
        once(&mut back)?;
    }
    let t0 = Instant::now();
    for _ in 0..n {
        once(&mut back)?;
    }
    let s = t0.elapsed().as_secs_f64() / n as f64;
    drop(stdin);
    let _ = child.wait();
    Ok(s)
}

/// Times joint actions scored through an external task's worker pool.
fn bench_env(command: Option<Vec<String>>, workers: &[usize], n: usize, chars: usize, json: bool) -> Result<()> {
    use collm_envs::external::{External, Spec};
    use collm_envs::{Env, Split};
    if n == 0 || workers.is_empty() || workers.contains(&0) {
        anyhow::bail!("--joint-actions and every --workers count must be at least 1");
    }
    let command = command.unwrap_or_else(|| {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/trivial_task.py");
        vec!["python3".into(), script.display().to_string()]
    });
    let text: String = "The quick brown fox jumps over the lazy dog. ".chars().cycle().take(chars).collect();
    let rows: Vec<collm_envs::dataset::Row> =
        (0..16).map(|i| serde_json::json!({"id": i, "text": text}).as_object().cloned().unwrap_or_default()).collect();
    // Joint actions that differ (so no layer can cache a reply): two responses of `chars` characters.
    let joint = |j: usize| vec![vec![format!("{j} {}", &text[..chars / 2]), format!("{j} {text}")]];
    let bytes = serde_json::json!({"op": "step", "item": rows[0], "turn": 0, "joint_actions": joint(0)}).to_string().len();
    let pipe_s = pipe_round_trip_s(bytes, 2000)?;
    // The built-in summary task's reward on the same joint actions, in process.
    let builtin =
        collm_envs::summary::Summary::new(collm_envs::Texts { train: rows.iter().map(|_| text.clone()).collect(), eval: vec![] }, 1)?;
    let t0 = Instant::now();
    for j in 0..n {
        std::hint::black_box(builtin.step(Split::Train, j % rows.len(), 0, &joint(j))?);
    }
    let builtin_s = t0.elapsed().as_secs_f64() / n as f64;
    let mut results = vec![];
    for &w in workers {
        let spec = Spec {
            command: command.clone(),
            options: Default::default(),
            workers: w,
            timeout: std::time::Duration::from_secs(30),
            restarts: 0,
        };
        let env = External::start(spec, rows.clone(), vec![])?;
        let next = std::sync::atomic::AtomicUsize::new(0);
        let score = |count: usize| -> Result<()> {
            let next = &next;
            next.store(0, std::sync::atomic::Ordering::SeqCst);
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..w)
                    .map(|_| {
                        s.spawn(|| -> Result<()> {
                            loop {
                                let j = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                if j >= count {
                                    return Ok(());
                                }
                                std::hint::black_box(env.step(Split::Train, j % rows.len(), 0, &joint(j))?);
                            }
                        })
                    })
                    .collect();
                handles.into_iter().try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))?)
            })
        };
        score(200.min(n))?;
        let t0 = Instant::now();
        score(n)?;
        let per = t0.elapsed().as_secs_f64() / n as f64;
        results.push(serde_json::json!({"workers": w, "ms_per_joint_action": per * 1e3, "joint_actions_per_s": 1.0 / per,
            "over_pipe_floor": per / pipe_s}));
    }
    let out = serde_json::json!({
        "cpu": cpu_name(), "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "command": command.join(" "), "joint_actions": n, "request_bytes": bytes,
        "pipe_round_trip_ms": pipe_s * 1e3, "builtin_summary_ms": builtin_s * 1e3, "external": results,
    });
    if json {
        println!("{out}");
    } else {
        println!(
            "collm bench env on {} ({} threads): {n} joint actions of {bytes}-byte requests",
            out["cpu"].as_str().unwrap_or(""),
            out["threads"]
        );
        println!("  pipe round trip through cat      {:>8.4} ms (the floor)", pipe_s * 1e3);
        println!("  built-in summary reward           {:>8.4} ms (in process)", builtin_s * 1e3);
        for r in &results {
            println!(
                "  external, {:>2} worker(s)           {:>8.4} ms per joint action ({:.0}/s, {:.1}x the pipe floor)",
                r["workers"],
                r["ms_per_joint_action"].as_f64().unwrap_or(f64::NAN),
                r["joint_actions_per_s"].as_f64().unwrap_or(f64::NAN),
                r["over_pipe_floor"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    Ok(())
}

/// Runs a workload file's epoch through the trainer and reports seconds per prompt, the
/// generation / update split, tokens/s, peak RSS and the mean reward.
fn bench_train(path: &std::path::Path, algo: &str, turns: usize, model: &str, device: &str, dtype: &str, json: bool) -> Result<()> {
    use collm_rl::config::{Algo, PromptFormat};
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let w: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let st = &w["settings"];
    let num = |k: &str| st[k].as_f64().with_context(|| format!("{}: settings.{k} is missing or not a number", path.display()));
    let rows = w["rows"].as_array().with_context(|| format!("{}: no 'rows' list", path.display()))?;
    let paragraphs: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            r["paragraph"].as_str().map(String::from).with_context(|| format!("{}: row {i} has no string 'paragraph'", path.display()))
        })
        .collect::<Result<_>>()?;
    let mut cfg = collm_rl::Config::default();
    cfg.algo = match algo {
        "cc" => Algo::Cc,
        "dc" => Algo::Dc,
        _ => Algo::Magrpo,
    };
    cfg.task.name = "summary".into();
    cfg.task.turns = turns;
    // The workload's later turns are a fresh user message (its `turn_2_prompt`: the instruction,
    // the paragraph and the previous answer), as CoMLRL's transition writes them: the agents and
    // the critic read that turn's input alone, not the episode so far.
    cfg.agent_input = collm_rl::config::AgentInput::Observation;
    cfg.buffer = num("rollout_buffer_size")? as usize;
    cfg.steps = paragraphs.len().div_ceil(cfg.buffer) * num("epochs").unwrap_or(1.0) as usize;
    cfg.gamma = num("discount")?;
    cfg.k = 4;
    cfg.sampling.max_new_tokens = num("max_new_tokens")? as usize;
    cfg.sampling.temperature = num("temperature")?;
    cfg.sampling.top_p = num("top_p")?;
    cfg.sampling.top_k = st["top_k"].as_u64().unwrap_or(0) as usize;
    match model.strip_prefix("random:") {
        Some(shape) => {
            let c = collm_model::ModelConfig::shape_of(shape)?;
            cfg.agents.model = "tiny".into();
            cfg.agents.format = PromptFormat::Raw;
            cfg.agents.tiny = collm_rl::config::TinyModel {
                hidden: c.hidden_size,
                layers: c.num_layers,
                heads: c.num_heads,
                kv_heads: c.num_kv_heads,
                intermediate: c.intermediate_size,
                context: c.max_position_embeddings,
                vocab: collm_rl::config::TinyVocab::Bytes,
            };
        }
        None => {
            cfg.agents.model = model.to_string();
            cfg.agents.format = PromptFormat::Chat;
        }
    }
    cfg.agents.device = device.into();
    cfg.agents.dtype = if dtype == "bf16" { collm_model::Precision::Bf16 } else { collm_model::Precision::F32 };
    cfg.agents.lr = num("learning_rate")?;
    cfg.critic.lr = num("critic_learning_rate")?;
    cfg.critic.value_coef = num("value_loss_coef")?;
    // Gradients accumulate over passes of a few sequences: the same update, less memory.
    cfg.micro_batch = 4;
    cfg.validate()?;
    let out = std::env::temp_dir().join(format!("collm-bench-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    // The machine's GEMM peak, measured in this run, which the update's FLOP rate is a fraction
    // of (on the CPU; a GPU's peak is bench gpu's business).
    // Small copy buffers, freed before the model loads, keep it out of the peak RSS.
    let peak = if device == "cpu" { Some(measure_peak(2048, 128, None)?) } else { None };
    let best_gflops = peak.as_ref().and_then(|p| p["best_gemm_gflops"].as_f64()).unwrap_or(f64::NAN);
    let bandwidth_gb_s = peak.as_ref().and_then(|p| p["bandwidth_gb_s"].as_f64()).unwrap_or(f64::NAN);
    let watch = collm_model::devcheck::MemoryWatch::start(&collm_model::DeviceSpec::parse(device)?.open()?)?;
    let t_load = Instant::now();
    let mut t = collm_rl::Trainer::new(cfg, &out)?;
    t.env = Box::new(collm_envs::summary::Summary::new(collm_envs::Texts { train: paragraphs.clone(), eval: vec![] }, turns)?);
    let load_s = t_load.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let (mut gen_s, mut update_s, mut tokens, mut rewards) = (0.0, 0.0, 0usize, vec![]);
    let (mut gen_gflop, mut update_gflop, mut gen_weight_gb) = (0.0, 0.0, 0.0);
    let (mut small_gflop, mut small_weight_gb) = (0.0, 0.0);
    // Each step's update alone: the first touches the heap's high-water mark (the optimizer's
    // moments, the passes' buffers) for the first time, the later ones reuse it.
    let mut update_steps = vec![];
    let bar = collm_rl::progress::Progress::new(t.cfg.steps as u64, 0, "step");
    while t.step < t.cfg.steps {
        let (faults0, rss0) = faults_and_rss();
        let line = t.train_step()?;
        let (faults1, rss1) = faults_and_rss();
        let (us, ug) = (line["update_s"].as_f64().unwrap_or(0.0), line["update_gflop"].as_f64().unwrap_or(0.0));
        gen_s += line["gen_s"].as_f64().unwrap_or(0.0);
        update_s += us;
        gen_gflop += line["gen_gflop"].as_f64().unwrap_or(0.0);
        gen_weight_gb += line["gen_weight_gb"].as_f64().unwrap_or(0.0);
        small_gflop += line["gen_small_pass_gflop"].as_f64().unwrap_or(0.0);
        small_weight_gb += line["gen_small_pass_weight_gb"].as_f64().unwrap_or(0.0);
        update_gflop += ug;
        // The step's page faults and the memory it added to the process (its generation's
        // included): what the first touch of new memory cost it.
        update_steps.push(serde_json::json!({
            "s": us, "gflop": ug, "peak_fraction": ug / us.max(1e-9) / best_gflops,
            "page_faults": faults1.saturating_sub(faults0), "new_memory_mb": rss1.saturating_sub(rss0) as f64 / (1u64 << 20) as f64,
        }));
        tokens += line["generated_tokens"].as_u64().unwrap_or(0) as usize;
        rewards.push(line["reward_mean"].as_f64().unwrap_or(f64::NAN));
        if !json {
            bar.tick(
                &format!(
                    "generation {:.1} s, update {:.1} s",
                    line["gen_s"].as_f64().unwrap_or(0.0),
                    line["update_s"].as_f64().unwrap_or(0.0)
                ),
                &format!(
                    "step {}/{}: {:.1} s (generation {:.1} s, update {:.1} s)",
                    t.step, t.cfg.steps, line["step_s"], line["gen_s"], line["update_s"]
                ),
            );
        }
    }
    bar.finish();
    let wall = t0.elapsed().as_secs_f64();
    let prompts = paragraphs.len();
    // The update once the heap has its high-water mark: every step after the first.
    let later = |k: &str| update_steps.iter().skip(1).map(|u| u[k].as_f64().unwrap_or(0.0)).sum::<f64>();
    let after_first = if update_steps.len() > 1 { Some(later("gflop") / later("s").max(1e-9) / best_gflops) } else { None };
    // This machine's floor for the same work: the update's arithmetic at the best GEMM, and
    // generation's passes each at the larger of their arithmetic at the best GEMM and their
    // weight reads at the memory bandwidth, taken in two groups: the small passes (decode steps,
    // bound by the reads) and the larger ones (prefill, bound by the arithmetic). No run can go
    // below it; the first touch of new memory is left out.
    let bound = |gflop: f64, gb: f64| (gflop / best_gflops).max(gb / bandwidth_gb_s);
    let gen_floor_s = bound(gen_gflop - small_gflop, gen_weight_gb - small_weight_gb) + bound(small_gflop, small_weight_gb);
    let update_floor_s = update_gflop / best_gflops;
    let floor_s_per_prompt = (gen_floor_s + update_floor_s) / prompts as f64;
    let out_json = serde_json::json!({
        "workload": path, "algo": algo, "turns": turns, "model": model, "device": device, "dtype": dtype, "prompts": prompts, "wall_s": wall, "load_s": load_s,
        "s_per_prompt": wall / prompts as f64, "gen_s": gen_s, "update_s": update_s,
        "generated_tokens": tokens, "tokens_per_s": tokens as f64 / gen_s.max(1e-9),
        "peak_rss_mb": peak_rss_mb(), "peak_device_mib": watch.peak_mib(),
        "reward_mean": rewards.iter().sum::<f64>() / rewards.len().max(1) as f64,
        "threads": rayon::current_num_threads(),
        "cpu": cpu_name(),
        "gen_gflop": gen_gflop, "update_gflop": update_gflop,
        "update_gflops": update_gflop / update_s.max(1e-9), "gen_gflops": gen_gflop / gen_s.max(1e-9),
        "update_peak_fraction": update_gflop / update_s.max(1e-9) / best_gflops,
        "gen_peak_fraction": gen_gflop / gen_s.max(1e-9) / best_gflops,
        "update_steps": update_steps,
        "update_peak_fraction_after_first_step": after_first,
        "gen_weight_gb": gen_weight_gb,
        "gen_small_pass_gflop": small_gflop, "gen_small_pass_weight_gb": small_weight_gb,
        "gen_floor_s": gen_floor_s, "update_floor_s": update_floor_s,
        "floor_s_per_prompt": floor_s_per_prompt,
        "peak": peak,
    });
    let _ = std::fs::remove_dir_all(&out);
    if json {
        println!("{out_json}");
    } else {
        println!(
            "{algo}, {turns} turn(s), {prompts} prompts: {:.2} s per prompt (generation {gen_s:.1} s, update {update_s:.1} s), {:.1} tokens/s, peak RSS {:.0} MB, mean reward {:.3}",
            wall / prompts as f64,
            tokens as f64 / gen_s.max(1e-9),
            peak_rss_mb(),
            out_json["reward_mean"].as_f64().unwrap_or(f64::NAN)
        );
        if peak.is_some() {
            println!(
                "update {update_gflop:.0} GFLOP at {:.1} GFLOPS, {:.0}% of this machine's best GEMM ({best_gflops:.1} GFLOPS, {}); generation {:.1} GFLOPS ({:.0}%)",
                update_gflop / update_s.max(1e-9),
                100.0 * update_gflop / update_s.max(1e-9) / best_gflops,
                cpu_name(),
                gen_gflop / gen_s.max(1e-9),
                100.0 * gen_gflop / gen_s.max(1e-9) / best_gflops
            );
            let per: Vec<String> = update_steps
                .iter()
                .map(|u| {
                    let f = |k: &str| u[k].as_f64().unwrap_or(0.0);
                    format!(
                        "{:.1} s ({:.0}%; {:.0} MB new to the process, {:.2} M page faults)",
                        f("s"),
                        100.0 * f("peak_fraction"),
                        f("new_memory_mb"),
                        f("page_faults") / 1e6
                    )
                })
                .collect();
            println!("update by step: {}", per.join(", "));
            if let Some(a) = after_first {
                println!(
                    "after the first step, which brought the process its high-water mark (the optimizer's moments, the passes' buffers: pages the kernel faults in and zeroes), the update runs at {:.0}% of the best GEMM",
                    100.0 * a
                );
            }
            println!(
                "this machine's floor for this work: {floor_s_per_prompt:.2} s per prompt (generation {gen_floor_s:.1} s: its larger passes' {:.0} GFLOP at the best GEMM and its decode steps' {small_weight_gb:.0} GB of weight reads at {bandwidth_gb_s:.1} GB/s, each group at whichever bound is the larger; update {update_floor_s:.1} s at the best GEMM); this run took {:.2}x the floor",
                gen_gflop - small_gflop,
                wall / prompts as f64 / floor_s_per_prompt
            );
        }
    }
    Ok(())
}

/// The settings of one decode measurement in `bench model`.
struct DecodeRun<'a> {
    prompt_tokens: usize,
    params: &'a SamplingParams,
    pad: u32,
    /// The machine's memory bandwidth (GB/s) and best GEMM rate (GFLOPS), measured in this run.
    copy_gb_s: f64,
    best_gflops: f64,
}

impl DecodeRun<'_> {
    /// Prefill and decode of `batch` random prompts through `m`, against the bandwidth limit.
    fn measure(&self, m: &collm_model::Transformer, batch: usize, vocab: usize) -> Result<serde_json::Value> {
        let cfg = &m.cfg;
        // What one decode step must read at least: every weight a projection or the output head
        // multiplies, as held (a LoRA model's adapters included, a frozen base in bf16 at 2 bytes),
        // and the keys and values cached so far (at the mean context).
        let weight_bytes: u64 = m
            .params
            .iter()
            .filter(|(n, p)| {
                p.var.rank() == 2
                    && (n.starts_with("model.layers.")
                        || n.as_str() == "lm_head.weight"
                        || (cfg.tie_word_embeddings && n.as_str() == "model.embed_tokens.weight"))
            })
            .map(|(_, p)| (p.var.dtype().size_in_bytes() * p.var.elem_count()) as u64)
            .sum();
        let kv_bytes_per_token = (2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4) as u64;
        let prompts: Vec<Vec<u32>> = (0..batch).map(|i| tokens(self.prompt_tokens, i as u64, vocab)).collect();
        let (t0, f0) = (Instant::now(), m.flops.total());
        // On a pool thread, as the trainer samples (`on_pool`): the thread takes its share of each
        // product instead of handing every op to the pool and sleeping.
        let pad = self.pad;
        let (mut cache, logits) = collm_model::on_pool(|| collm_model::generate::prefill(m, &prompts, pad))?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let prefill_gflops = (m.flops.total() - f0) as f64 / prefill_s / 1e9;
        let mut rngs = collm_model::generate::row_rngs(7, batch);
        // No stop tokens: every row decodes exactly max_new_tokens tokens.
        let t1 = Instant::now();
        let params = self.params;
        let g = collm_model::on_pool(|| collm_model::generate::decode(m, &mut cache, logits, params, &[], &mut rngs, pad))?;
        let decode_s = t1.elapsed().as_secs_f64();
        let n: usize = g.iter().map(|g| g.tokens.len()).sum();
        // The bandwidth limit: each step reads the weights once and every row's cache.
        let steps = n.div_ceil(batch) as f64;
        let mean_ctx = self.prompt_tokens as f64 + steps / 2.0;
        let step_bytes = weight_bytes as f64 + batch as f64 * mean_ctx * kv_bytes_per_token as f64;
        let limit_tokens_per_s = batch as f64 * self.copy_gb_s * 1e9 / step_bytes;
        Ok(serde_json::json!({
            "batch": batch, "prefill_s": prefill_s, "decode_s": decode_s, "tokens": n,
            "tokens_per_s": n as f64 / decode_s,
            "bandwidth_limit_tokens_per_s": limit_tokens_per_s,
            "bandwidth_fraction": n as f64 / decode_s / limit_tokens_per_s,
            "prefill_gflops": prefill_gflops,
            "prefill_peak_fraction": prefill_gflops / self.best_gflops,
            // Prompt included, as transformers' generate() is timed.
            "generate_tokens_per_s": n as f64 / (prefill_s + decode_s),
        }))
    }
}

fn bench_model(cmd: BenchCmd) -> Result<()> {
    let BenchCmd::Model { model, prompt_tokens, new_tokens, train_batch, train_tokens, repeats, json, reference_python } = cmd else {
        unreachable!("bench_model takes BenchCmd::Model")
    };
    let peak = measure_peak(2048, 512, None)?;
    // The memory bandwidth: the faster of the copy and the all-thread read.
    let (best_gflops, copy_gb_s) =
        (peak["best_gemm_gflops"].as_f64().unwrap_or(f64::NAN), peak["bandwidth_gb_s"].as_f64().unwrap_or(f64::NAN));
    let t0 = Instant::now();
    let lm = loader::load(&model)?;
    let load_s = t0.elapsed().as_secs_f64();
    let pad = lm.tokenizer.pad_id();
    let vocab = lm.model.cfg.vocab_size;
    let params = SamplingParams { max_new_tokens: new_tokens, temperature: 0.7, top_p: 0.9, ..Default::default() };
    let run = DecodeRun { prompt_tokens, params: &params, pad, copy_gb_s, best_gflops };
    let decode = [1usize, 8].iter().map(|&batch| run.measure(&lm.model, batch, vocab)).collect::<Result<Vec<_>>>()?;
    let (full_s, full_flops) = train_step_s(&lm.model, train_batch, train_tokens, repeats, pad)?;
    let mut lora_model = lm.model.deep_clone()?;
    drop(lm.model);
    lora_model.add_lora(
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec(),
        },
        0,
    )?;
    let (lora_s, lora_flops) = train_step_s(&lora_model, train_batch, train_tokens, repeats, pad)?;
    let lora_decode = run.measure(&lora_model, 1, vocab)?;
    // The same LoRA model with its frozen base held in bf16 (`frozen_dtype = "bf16"`).
    let frozen_mb = |m: &collm_model::Transformer| {
        m.params.values().filter(|p| !p.trainable).map(|p| p.var.elem_count() * p.var.dtype().size_in_bytes()).sum::<usize>() as f64 / 1e6
    };
    let f32_base_mb = frozen_mb(&lora_model);
    lora_model.hold_frozen_in(candle_core::DType::BF16)?;
    let bf16_base_mb = frozen_mb(&lora_model);
    let (bf16_s, _) = train_step_s(&lora_model, train_batch, train_tokens, repeats, pad)?;
    let bf16_decode = run.measure(&lora_model, 1, vocab)?;
    let rate = |flops: u64, s: f64| flops as f64 / s / 1e9;
    let reference = match &reference_python {
        None => None,
        Some(py) => Some(hf_reference(py, &model, prompt_tokens, new_tokens, train_batch, train_tokens, repeats)?),
    };
    let ratios = reference.as_ref().map(|r| {
        let dec: Vec<_> = decode
            .iter()
            .zip(r["decode"].as_array().cloned().unwrap_or_default())
            .map(|(a, b)| serde_json::json!({"batch": a["batch"], "speedup": a["generate_tokens_per_s"].as_f64().unwrap_or(0.0) / b["tokens_per_s"].as_f64().unwrap_or(f64::NAN)}))
            .collect();
        serde_json::json!({"decode": dec, "train_step_time_ratio": full_s / r["train_step"]["full_s"].as_f64().unwrap_or(f64::NAN)})
    });
    let out = serde_json::json!({
        "model": model,
        "load_s": load_s,
        "prompt_tokens": prompt_tokens,
        "decode": decode,
        "train_step": {
            "batch": train_batch, "tokens": train_tokens, "full_s": full_s, "lora_r8_s": lora_s, "lora_to_full": lora_s / full_s,
            "full_gflop": full_flops as f64 / 1e9, "lora_r8_gflop": lora_flops as f64 / 1e9,
            "full_gflops": rate(full_flops, full_s), "lora_r8_gflops": rate(lora_flops, lora_s),
            "full_peak_fraction": rate(full_flops, full_s) / best_gflops, "lora_r8_peak_fraction": rate(lora_flops, lora_s) / best_gflops,
            "lora_to_full_flops": lora_flops as f64 / full_flops.max(1) as f64,
            "lora_r8_bf16_base_s": bf16_s, "lora_bf16_base_to_full": bf16_s / full_s,
        },
        "lora_base": {
            "f32_mb": f32_base_mb, "bf16_mb": bf16_base_mb,
            "decode_batch_1_f32_base": lora_decode, "decode_batch_1_bf16_base": bf16_decode,
        },
        "peak": peak,
        "peak_rss_mb": peak_rss_mb(),
        "threads": rayon::current_num_threads(),
        "reference": reference,
        "ratios": ratios,
    });
    if json {
        println!("{out}");
    } else {
        println!(
            "model {model} (loaded in {load_s:.2} s), prompt {prompt_tokens} tokens, {} threads, {}",
            rayon::current_num_threads(),
            cpu_name()
        );
        println!("this machine: best GEMM {best_gflops:.1} GFLOPS, memory bandwidth {copy_gb_s:.1} GB/s (collm bench peak)");
        for d in &decode {
            let f = |k: &str| d[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "decode batch {:>2}: {:>7.1} tokens/s, {:.0}% of the bandwidth limit ({:.1}); prefill {:.2} s at {:.1} GFLOPS ({:.0}% of the GEMM peak)",
                d["batch"],
                f("tokens_per_s"),
                100.0 * f("bandwidth_fraction"),
                f("bandwidth_limit_tokens_per_s"),
                f("prefill_s"),
                f("prefill_gflops"),
                100.0 * f("prefill_peak_fraction")
            );
        }
        println!(
            "train step {train_batch}x{train_tokens} tokens: full {full_s:.2} s ({:.1} GFLOPS, {:.0}% of the GEMM peak), LoRA r=8 {lora_s:.2} s ({:.2}x full, whose FLOPs it has {:.2}x of; {:.1} GFLOPS, {:.0}%)",
            rate(full_flops, full_s),
            100.0 * rate(full_flops, full_s) / best_gflops,
            lora_s / full_s,
            lora_flops as f64 / full_flops.max(1) as f64,
            rate(lora_flops, lora_s),
            100.0 * rate(lora_flops, lora_s) / best_gflops
        );
        let tps = |d: &serde_json::Value| d["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
        println!(
            "LoRA r=8, frozen base in bf16 ({bf16_base_mb:.0} MB against {f32_base_mb:.0} in f32): train step {bf16_s:.2} s ({:.2}x full); decode batch 1 {:.1} tokens/s against {:.1} with the f32 base ({:.0}% of its bandwidth limit)",
            bf16_s / full_s,
            tps(&bf16_decode),
            tps(&lora_decode),
            100.0 * bf16_decode["bandwidth_fraction"].as_f64().unwrap_or(f64::NAN)
        );
        println!("peak RSS {:.0} MB", peak_rss_mb());
        if let (Some(r), Some(q)) = (&reference, &ratios) {
            println!("reference: {}", r["reference"].as_str().unwrap_or("?"));
            for (d, x) in r["decode"].as_array().into_iter().flatten().zip(q["decode"].as_array().into_iter().flatten()) {
                println!(
                    "  generate batch {:>2}: {:>7.1} tokens/s (prompt included); collm is {:.2}x faster",
                    d["batch"],
                    d["tokens_per_s"].as_f64().unwrap_or(0.0),
                    x["speedup"].as_f64().unwrap_or(0.0)
                );
            }
            println!(
                "  train step full {:.2} s; collm takes {:.2}x its time",
                r["train_step"]["full_s"].as_f64().unwrap_or(0.0),
                q["train_step_time_ratio"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

/// One HTTP/1.1 POST of a JSON body; returns the JSON reply.
fn post_json(addr: &std::net::SocketAddr, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, rest) = raw.split_once("\r\n\r\n").context("a reply without headers")?;
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("the server answered {}: {rest}", head.lines().next().unwrap_or(""));
    }
    serde_json::from_str(rest).context("the server's reply is not JSON")
}

/// Prompts of about the same length, one per row or client.
fn serve_prompts(n: usize) -> Vec<String> {
    let topics = ["bees", "glaciers", "libraries", "lighthouses", "octopuses", "railways", "bread", "cities"];
    (0..n).map(|i| format!("Write a short story about {} number {i}, in plain words, for a child.", topics[i % topics.len()])).collect()
}

fn bench_serve(model: &str, clients: &[usize], requests: usize, max_tokens: usize, json: bool) -> Result<()> {
    use std::sync::Arc;
    if clients.is_empty() || clients.contains(&0) || requests == 0 || max_tokens == 0 {
        anyhow::bail!("--clients, --requests and --max-tokens must be at least 1");
    }
    let lm = loader::load(model)?;
    let pad = lm.tokenizer.pad_id();
    let stops = lm.tokenizer.stop_ids.clone();
    let model_arc = Arc::new(lm.model);
    let tokenizer = Arc::new(lm.tokenizer);
    let served = crate::serve::Served {
        name: "bench".into(),
        tokenizer: tokenizer.clone(),
        chat_template: tokenizer.chat_template.is_some(),
        context: model_arc.cfg.max_position_embeddings,
        batcher: collm_model::batcher::Batcher::start(model_arc.clone(), pad, clients.iter().copied().max().unwrap_or(1)),
    };
    let addr = crate::serve::spawn(vec![served])?;
    let params = SamplingParams { max_new_tokens: max_tokens, greedy: true, ..Default::default() };
    let mut rows = vec![];
    for &c in clients {
        let prompts = serve_prompts(c);
        // generate(): one batch of the same prompts, `requests` times.
        // The prompts as the server renders them: through the chat template where there is one.
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| match &tokenizer.chat_template {
                Some(_) => tokenizer.encode(
                    &tokenizer.apply_chat_template(&[collm_model::Message { role: "user".into(), content: p.clone() }], true)?,
                    false,
                ),
                None => tokenizer.encode(p, true),
            })
            .collect::<Result<_>>()?;
        let t0 = Instant::now();
        let mut gen_tokens = 0usize;
        for _ in 0..requests {
            // As `collm generate` runs it: on a pool thread.
            let g = collm_model::on_pool(|| collm_model::generate(&model_arc, &ids, &params, &stops, 0, pad))?;
            gen_tokens += g.iter().map(|g| g.tokens.len() - usize::from(g.stopped)).sum::<usize>();
        }
        let gen_s = t0.elapsed().as_secs_f64();
        // collm serve: c clients, each sending its prompt `requests` times.
        let t0 = Instant::now();
        let counts: Vec<Result<usize>> = std::thread::scope(|s| {
            let hs: Vec<_> = prompts
                .iter()
                .map(|p| {
                    s.spawn(move || -> Result<usize> {
                        let mut n = 0;
                        for _ in 0..requests {
                            let body = serde_json::json!({"model": "bench", "messages": [{"role": "user", "content": p}], "max_tokens": max_tokens, "temperature": 0});
                            let r = post_json(&addr, "/v1/chat/completions", &body)?;
                            n += r["usage"]["completion_tokens"].as_u64().context("no usage in the reply")? as usize;
                        }
                        Ok(n)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))).collect()
        });
        let serve_s = t0.elapsed().as_secs_f64();
        let serve_tokens: usize = counts.into_iter().sum::<Result<usize>>()?;
        let reqs = (c * requests) as f64;
        rows.push(serde_json::json!({
            "clients": c, "requests": c * requests,
            "serve_requests_per_s": reqs / serve_s, "serve_tokens_per_s": serve_tokens as f64 / serve_s,
            "generate_requests_per_s": reqs / gen_s, "generate_tokens_per_s": gen_tokens as f64 / gen_s,
            "serve_over_generate": (serve_tokens as f64 / serve_s) / (gen_tokens as f64 / gen_s),
            "tokens": {"serve": serve_tokens, "generate": gen_tokens},
        }));
    }
    let out = serde_json::json!({"cpu": cpu_name(), "model": model, "max_tokens": max_tokens, "rows": rows, "peak_rss_mb": peak_rss_mb()});
    if json {
        println!("{out}");
    } else {
        println!("collm bench serve on {} ({model}, greedy, up to {max_tokens} tokens per request)", out["cpu"].as_str().unwrap_or(""));
        println!("  clients  serve req/s  serve tok/s  generate req/s  generate tok/s  serve/generate");
        for r in &rows {
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "  {:>7}  {:>11.2}  {:>11.1}  {:>14.2}  {:>14.1}  {:>14.2}",
                r["clients"],
                f("serve_requests_per_s"),
                f("serve_tokens_per_s"),
                f("generate_requests_per_s"),
                f("generate_tokens_per_s"),
                f("serve_over_generate")
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step's page faults and new memory, as `bench train` reports them, see memory new to the
    /// process: 64 MiB mapped and written once is at least that many new pages and that much
    /// more resident memory; written again, it is neither.
    #[test]
    fn faults_and_rss_see_memory_new_to_the_process() {
        let bytes = 64usize << 20;
        // SAFETY: a private anonymous mapping, written only inside its `bytes`, unmapped once.
        unsafe {
            let p =
                libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            assert!(p != libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
            let touch = || {
                for off in (0..bytes).step_by(4096) {
                    p.cast::<u8>().add(off).write_volatile(1);
                }
            };
            let (f0, r0) = faults_and_rss();
            touch();
            let (f1, r1) = faults_and_rss();
            touch();
            let (f2, r2) = faults_and_rss();
            libc::munmap(p, bytes);
            // Huge pages would fault 2 MiB at a time: count at least one fault per 2 MiB.
            assert!(f1 - f0 >= (bytes >> 21) as u64, "{} faults for 64 MiB", f1 - f0);
            assert!(r1 >= r0 + bytes as u64 / 10 * 9, "resident {r0} -> {r1}");
            // Other tests' threads may allocate meanwhile: a margin, far below 64 MiB's pages.
            assert!(f2 - f1 < (bytes >> 12) as u64 / 4, "{} faults writing resident memory again", f2 - f1);
            assert!(r2 < r1 + bytes as u64 / 4, "resident {r1} -> {r2}");
        }
    }
}
