//! `collm bench gpu`: what `scripts/gpu-check.sh` prints on a GPU, with random-init models of
//! real shapes (no weights are brought to the machine): every op on the device against the
//! fused CPU kernels, each CUDA kernel against the generic path, a model's log-probs on the
//! device against the CPU, decode tokens/s, one bf16 train step of a Qwen3-1.7B-shaped model with
//! its MFU (with the generic path, and again with the kernels that passed), and the peak device
//! memory of each.
//! On a CPU-only build it runs the same sections on the CPU (the generic path forced where a
//! section compares paths), which is how it is tested.

use crate::bench::tokens;
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use collm_model::cuda::{with_kernels, Kernel, KernelSet};
use collm_model::devcheck::{check_kernels, check_ops, random_model_on, MemoryWatch};
use collm_model::generate::{decode, prefill, row_rngs};
use collm_model::{score, AdamW, AdamWConfig, DeviceSpec, Grads, ModelConfig, SamplingParams, Transformer};
use serde_json::{json, Value};
use std::time::Instant;

pub struct GpuBench {
    pub device: String,
    /// The device's dense bf16 peak in TFLOP/s, for the MFU (H100/H200 SXM: 989).
    pub peak_tflops: f64,
    /// The train step's shape and size.
    pub train_shape: String,
    pub train_batch: usize,
    pub train_tokens: usize,
    /// Decode: the shapes to time.
    pub decode_shapes: Vec<String>,
    pub json: bool,
}

fn section(json_out: bool, name: &str, v: Value) -> Value {
    let v = json!({"section": name, "result": v});
    if json_out {
        println!("{v}");
    } else {
        println!("== {name}\n{}", serde_json::to_string_pretty(&v["result"]).unwrap_or_default());
    }
    v
}

fn sync(d: &Device) -> Result<()> {
    Ok(d.synchronize()?)
}

/// FLOPs of one forward + backward over `b` sequences of `t` tokens: 6 per matmul weight per
/// token (the tied or separate output projection counted once, the embedding lookup not) and
/// 12 · layers · heads · head_dim · t per token for attention (PaLM's MFU convention).
pub fn train_flops(cfg: &ModelConfig, b: usize, t: usize) -> f64 {
    let matmul: u64 = collm_model::model::expected_tensors(cfg)
        .iter()
        .filter(|(n, s)| s.len() == 2 && n != "model.embed_tokens.weight" && n != "lm_head.weight")
        .map(|(_, s)| (s[0] * s[1]) as u64)
        .sum::<u64>()
        + (cfg.vocab_size * cfg.hidden_size) as u64;
    let tokens = (b * t) as f64;
    tokens * (6.0 * matmul as f64 + 12.0 * (cfg.num_layers * cfg.num_heads * cfg.head_dim * t) as f64)
}

pub fn run(a: GpuBench) -> Result<()> {
    let spec = DeviceSpec::parse(&a.device)?;
    let dev = spec.open()?;
    let mut report = vec![];
    println!("collm bench gpu on {spec} ({})", if dev.is_cpu() { crate::bench::cpu_name() } else { "CUDA".to_string() });

    // 1. Every op through the generic path on the device against the fused CPU kernels.
    let watch = MemoryWatch::start(&dev)?;
    let checks = check_ops(&dev)?;
    let all = checks.iter().all(|c| c.passed());
    report.push(section(a.json, "ops", json!({"checks": checks, "all_within_1e-4": all, "peak_mib": watch.peak_mib()})));
    drop(watch);

    // 1b. Each CUDA kernel against the generic path on the device; the ones that pass serve the
    // train step's second run below.
    let watch = MemoryWatch::start(&dev)?;
    let kchecks = check_kernels(&dev)?;
    let mut passed = KernelSet::NONE;
    for k in Kernel::ALL {
        let mine: Vec<_> = kchecks.iter().filter(|c| c.kernel == k.name()).collect();
        if !mine.is_empty() && mine.iter().all(|c| c.passed()) {
            passed = KernelSet::parse(&format!("{},{}", passed.names().join(","), k.name()))?;
        }
    }
    report.push(section(
        a.json,
        "kernels",
        json!({
            "built": cfg!(feature = "cuda"), "checks": kchecks, "passed": passed.names(),
            "all_passed": passed == KernelSet::ALL, "peak_mib": watch.peak_mib(),
        }),
    ));
    drop(watch);
    if !dev.is_cpu() {
        report.push(section(a.json, "attention_memory", attention_memory(&dev, passed)?));
    }

    // 2. A SmolLM2-135M-shaped model's log-probs on the device (f32 and bf16) against the CPU.
    let watch = MemoryWatch::start(&dev)?;
    let cfg = ModelConfig::shape_of("smollm2-135m")?;
    let cpu = random_model_on(cfg.clone(), &Device::Cpu, DType::F32)?;
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = (0..2)
        .map(|i| {
            let s = tokens(256, 50 + i, cfg.vocab_size);
            (s[..128].to_vec(), s[128..].to_vec())
        })
        .collect();
    let want = score(&cpu, &pairs, 0, false)?.token_logprobs.to_vec1::<f32>()?;
    let mut lp = json!({});
    for dtype in [DType::F32, DType::BF16] {
        let mut m = cpu.deep_clone()?;
        m.place(&dev, dtype)?;
        let got = if dev.is_cpu() && dtype == DType::F32 {
            collm_model::ops::with_generic_ops(|| score(&m, &pairs, 0, false))?
        } else {
            score(&m, &pairs, 0, false)?
        }
        .token_logprobs
        .to_vec1::<f32>()?;
        let worst = want.iter().zip(&got).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let mean = want.iter().zip(&got).map(|(x, y)| (x - y).abs()).sum::<f32>() / want.len() as f32;
        lp[format!("{dtype:?}").to_lowercase()] = json!({"max_abs_diff": worst, "mean_abs_diff": mean});
    }
    drop(cpu);
    lp["tokens"] = json!(want.len());
    lp["peak_mib"] = json!(watch.peak_mib());
    report.push(section(a.json, "logprobs_vs_cpu", lp));
    drop(watch);

    // 3. Decode tokens/s at batch 1 and 32 (bf16 off the CPU), prompt 128, 64 new tokens.
    let dtype = if dev.is_cpu() { DType::F32 } else { DType::BF16 };
    for shape in a.decode_shapes.iter().filter(|s| !s.is_empty()) {
        let watch = MemoryWatch::start(&dev)?;
        let m = random_model_on(ModelConfig::shape_of(shape)?, &dev, dtype)?;
        let mut rows = vec![];
        for batch in [1usize, 32] {
            let prompts: Vec<Vec<u32>> = (0..batch).map(|i| tokens(128, i as u64, m.cfg.vocab_size)).collect();
            let params = SamplingParams { max_new_tokens: 64, greedy: true, ..Default::default() };
            // A warm-up pass (kernels load and the allocator warms), then the timed one.
            for timed in [false, true] {
                sync(&dev)?;
                let t0 = Instant::now();
                let (mut cache, logits) = prefill(&m, &prompts, 0)?;
                sync(&dev)?;
                let prefill_s = t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                let g = decode(&m, &mut cache, logits, &params, &[], &mut row_rngs(1, batch), 0)?;
                sync(&dev)?;
                let decode_s = t1.elapsed().as_secs_f64();
                if timed {
                    let n: usize = g.iter().map(|g| g.tokens.len()).sum();
                    rows.push(json!({"batch": batch, "prefill_s": prefill_s, "decode_s": decode_s, "tokens_per_s": n as f64 / decode_s}));
                }
            }
        }
        report.push(section(a.json, &format!("decode {shape} {dtype:?}"), json!({"rows": rows, "peak_mib": watch.peak_mib()})));
    }

    // 4. One teacher-forced train step (forward, backward, AdamW) in bf16: the generic path, then
    // the kernels that passed.
    let watch = MemoryWatch::start(&dev)?;
    let cfg = ModelConfig::shape_of(&a.train_shape)?;
    let m = random_model_on(cfg.clone(), &dev, dtype)?;
    let (b, t) = (a.train_batch, a.train_tokens);
    if t < 2 {
        bail!("--train-tokens must be at least 2");
    }
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = (0..b)
        .map(|i| {
            let s = tokens(t, 900 + i as u64, cfg.vocab_size);
            (s[..1].to_vec(), s[1..].to_vec())
        })
        .collect();
    drop(watch);
    let runs = if passed == KernelSet::NONE {
        vec![("generic", KernelSet::NONE)]
    } else {
        vec![("generic", KernelSet::NONE), ("kernels", passed)]
    };
    for (label, set) in runs {
        let watch = MemoryWatch::start(&dev)?;
        let mut opt = AdamW::new(AdamWConfig { lr: 1e-6, ..Default::default() });
        let mut times = vec![];
        for r in 0..3 {
            sync(&dev)?;
            let t0 = Instant::now();
            with_kernels(set, || step(&m, &pairs, &mut opt))?;
            sync(&dev)?;
            if r > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let step_s = times.iter().sum::<f64>() / times.len() as f64;
        let flops = train_flops(&cfg, b, t);
        let name = if label == "generic" { "train_step".to_string() } else { format!("train_step ({label}: {})", set.names().join(", ")) };
        report.push(section(
            a.json,
            &name,
            json!({
                "shape": a.train_shape, "dtype": format!("{dtype:?}"), "batch": b, "tokens": t, "params": cfg.param_count(),
                "kernels": set.names(), "step_s": step_s, "tflops": flops / step_s / 1e12,
                "mfu": flops / step_s / (a.peak_tflops * 1e12), "peak_tflops_assumed": a.peak_tflops, "peak_mib": watch.peak_mib(),
            }),
        ));
    }
    if a.json {
        println!("{}", json!({"summary": report}));
    }
    Ok(())
}

/// The device memory one layer's attention (forward and backward) of a Qwen3-1.7B shape takes at
/// a 1,024- and a 4,096-token history, bf16: the generic path (which keeps the [q, k]
/// probabilities for its backward) against the attention kernel, where it passed its check.
fn attention_memory(dev: &Device, passed: KernelSet) -> Result<Value> {
    let cfg = ModelConfig::shape_of("qwen3-1.7b")?;
    let (groups, n_rep, hd) = (cfg.num_kv_heads, cfg.num_heads / cfg.num_kv_heads, cfg.head_dim);
    let mut rows = vec![];
    for len in [1024usize, 4096] {
        let mask = collm_model::ops::AttnMask::causal(&[vec![true; len]], 0, len);
        let mut sets = vec![("generic", KernelSet::NONE)];
        if passed.contains(Kernel::Attention) {
            sets.push(("kernel", KernelSet::only(Kernel::Attention)));
        }
        for (label, set) in sets {
            sync(dev)?;
            let watch = MemoryWatch::start(dev)?;
            let t0 = Instant::now();
            let r = with_kernels(set, || -> Result<()> {
                let q = candle_core::Var::from_tensor(
                    &candle_core::Tensor::randn(0f32, 1.0, (1, groups, n_rep * len, hd), dev)?.to_dtype(DType::BF16)?,
                )?;
                let k = candle_core::Var::from_tensor(
                    &candle_core::Tensor::randn(0f32, 1.0, (1, groups, len, hd), dev)?.to_dtype(DType::BF16)?,
                )?;
                let v = candle_core::Var::from_tensor(
                    &candle_core::Tensor::randn(0f32, 1.0, (1, groups, len, hd), dev)?.to_dtype(DType::BF16)?,
                )?;
                let o = collm_model::ops::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 1.0 / (hd as f32).sqrt())?;
                let g = o.to_dtype(DType::F32)?.sum_all()?.backward()?;
                anyhow::ensure!(g.get(q.as_tensor()).is_some() && g.get(k.as_tensor()).is_some(), "attention gave no gradient");
                sync(dev)
            });
            let secs = t0.elapsed().as_secs_f64();
            rows.push(match r {
                Ok(()) => json!({"history": len, "path": label, "peak_mib": watch.peak_mib(), "fwd_bwd_s": secs}),
                Err(e) => json!({"history": len, "path": label, "error": format!("{e:#}")}),
            });
        }
    }
    Ok(json!({"shape": "qwen3-1.7b, one layer", "dtype": "bf16", "rows": rows}))
}

fn step(m: &Transformer, pairs: &[(Vec<u32>, Vec<u32>)], opt: &mut AdamW) -> Result<()> {
    let loss = score(m, pairs, 0, true)?.token_logprobs.mean_all()?.neg()?;
    let mut g = Grads::new();
    g.backward(&loss, m.trainable())?;
    g.clip_norm(1.0)?;
    opt.step(m.trainable(), &g)?;
    Ok(())
}
