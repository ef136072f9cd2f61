//! Criterion benchmarks of the hot kernels, on a randomly initialised model of SmolLM2-135M's
//! shape (30 layers, hidden 576, 9 query / 3 key-value heads, vocabulary 49152), f32 on the CPU:
//! - `decode_step/bN`: one sampling step for N rows (forward of one new token each over a
//!   128-token KV cache, then the last position's logits), on the decode step's raw slices
//!   (`decode_cpu`) and, as `bN_general`, through the general pass;
//! - `forward_backward/BxT`: the teacher-forced pass of the policy loss (token log-probs of a
//!   padded batch) and its backward;
//! - `adamw_step`: one fused AdamW step over every parameter;
//! - `attention/…`: the fused block-wise attention and the plain ops, forward and backward;
//! - `linear/…`: a trainable projection (512 rows, 576 → 1536), forward and backward, fused
//!   against candle's matmul (the generic path);
//! - `shared_prefix/…`: MAGRPO's shape (K = 4 samples of one 160-token history, 48-token
//!   responses) scored and backpropagated with the history run once, and run per sample;
//! - `gemm/…`: collm's AVX-512 GEMM against the gemm crate on a projection's and lm_head's shape.
//!
//! `cargo bench -p collm-model --bench kernels` (criterion keeps the last run in target/criterion
//! and reports the change against it).

use candle_core::{Device, Tensor, Var};
use collm_model::generate::prefill;
use collm_model::*;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::time::Duration;

fn smollm2_shape() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        rope_theta: 100000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        qkv_bias: false,
        qk_norm: false,
        max_position_embeddings: 8192,
    }
}

fn tokens(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    (0..n as u64).map(|i| ((i * 7919 + seed * 104729 + 13) % vocab as u64) as u32).collect()
}

fn kernels(c: &mut Criterion) {
    let model = Transformer::random(smollm2_shape(), 0).expect("random model");
    let vocab = model.cfg.vocab_size;

    let mut g = c.benchmark_group("decode_step");
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    for b in [1usize, 4, 8] {
        let prompts: Vec<Vec<u32>> = (0..b).map(|i| tokens(128, i as u64, vocab)).collect();
        let (cache, _) = prefill(&model, &prompts, 0).expect("prefill");
        let next: Vec<Vec<u32>> = (0..b).map(|i| vec![(i * 31 + 7) as u32]).collect();
        let valid = vec![vec![true]; b];
        let step = |c: &mut KvCache| {
            let h = model.forward(&next, &valid, c, false).unwrap();
            model.logits(&h.squeeze(1).unwrap(), false).unwrap()
        };
        g.bench_function(format!("b{b}"), |bench| bench.iter_batched(|| cache.clone(), |mut c| step(&mut c), BatchSize::LargeInput));
        g.bench_function(format!("b{b}_general"), |bench| {
            bench.iter_batched(|| cache.clone(), |mut c| decode_cpu::without_fast_decode(|| step(&mut c)), BatchSize::LargeInput)
        });
    }
    g.finish();

    let mut g = c.benchmark_group("forward_backward");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    for (b, t) in [(2usize, 64usize), (4, 128)] {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = (0..b)
            .map(|i| {
                let s = tokens(t, 100 + i as u64, vocab);
                (s[..t / 2].to_vec(), s[t / 2..].to_vec())
            })
            .collect();
        g.bench_function(format!("{b}x{t}"), |bench| {
            bench.iter(|| {
                let s = score(&model, &pairs, 0, true).unwrap();
                let loss = s.token_logprobs.mean_all().unwrap().neg().unwrap();
                loss.backward().unwrap()
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("adamw_step");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    let mut grads = Grads::new();
    {
        let pairs = vec![(tokens(8, 1, vocab), tokens(8, 2, vocab))];
        let s = score(&model, &pairs, 0, true).unwrap();
        let store = s.token_logprobs.mean_all().unwrap().backward().unwrap();
        grads.accumulate(&store, model.trainable()).unwrap();
    }
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-6, ..Default::default() });
    g.bench_function(format!("{}M_params", model.num_params() / 1_000_000), |bench| {
        bench.iter(|| opt.step(model.trainable(), &grads).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("shared_prefix");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    let history = tokens(160, 7, vocab);
    let seqs: Vec<Vec<u32>> = (0..4).map(|k| history.iter().cloned().chain(tokens(48, 50 + k, vocab)).collect()).collect();
    let spans: Vec<Vec<(usize, usize)>> = seqs.iter().map(|s| vec![(160, s.len())]).collect();
    let none = vec![vec![]; 4];
    for (name, share) in [("shared_4x208", true), ("unshared_4x208", false)] {
        g.bench_function(name, |bench| {
            bench.iter(|| {
                let run = || score_spans(&model, &seqs, &spans, &none, 0, true).unwrap();
                let s = if share { run() } else { score::without_prefix_sharing(run) };
                s.token_logprobs.mean_all().unwrap().neg().unwrap().backward().unwrap()
            })
        });
    }
    g.finish();

    let dev = Device::Cpu;
    let mut g = c.benchmark_group("linear");
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (512, 576), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.05, (1536, 576), &dev).unwrap()).unwrap();
    for (name, generic) in [("fused_fwd_bwd_512x576x1536", false), ("generic_fwd_bwd_512x576x1536", true)] {
        g.bench_function(name, |bench| {
            bench.iter(|| {
                let run = || ops::linear_nt(x.as_tensor(), w.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
                if generic {
                    ops::with_generic_ops(run)
                } else {
                    run()
                }
            })
        });
    }
    // A frozen projection alone and with a rank-8 LoRA adapter (what the adapter adds).
    let frozen = w.as_detached_tensor();
    let a = Var::from_tensor(&Tensor::randn(0f32, 0.05, (8, 576), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.05, (1536, 8), &dev).unwrap()).unwrap();
    g.bench_function("frozen_fwd_bwd_512x576x1536", |bench| {
        bench.iter(|| ops::frozen_linear(x.as_tensor(), &frozen).unwrap().sum_all().unwrap().backward().unwrap())
    });
    g.bench_function("lora_r8_fwd_bwd_512x576x1536", |bench| {
        bench.iter(|| {
            ops::lora_linear(x.as_tensor(), &frozen, a.as_tensor(), b.as_tensor(), 2.0).unwrap().sum_all().unwrap().backward().unwrap()
        })
    });
    // The same with the frozen weight held in bf16 (widened inside the GEMMs a block of at most 4 MiB at a time: here the whole weight).
    let frozen_bf16 = frozen.to_dtype(candle_core::DType::BF16).unwrap();
    g.bench_function("frozen_bf16_fwd_bwd_512x576x1536", |bench| {
        bench.iter(|| ops::frozen_linear(x.as_tensor(), &frozen_bf16).unwrap().sum_all().unwrap().backward().unwrap())
    });
    g.bench_function("lora_r8_bf16_base_fwd_bwd_512x576x1536", |bench| {
        bench.iter(|| {
            ops::lora_linear(x.as_tensor(), &frozen_bf16, a.as_tensor(), b.as_tensor(), 2.0).unwrap().sum_all().unwrap().backward().unwrap()
        })
    });
    // The adapter's thin product X Aᵀ: streamed against A, and through the packed GEMM.
    let (xs, av): (Vec<f32>, Vec<f32>) = (x.flatten_all().unwrap().to_vec1().unwrap(), a.flatten_all().unwrap().to_vec1().unwrap());
    g.bench_function("thin_512x576x8", |bench| bench.iter(|| ops::matmul_nt_thin(&xs, 512, 576, &av, 8).unwrap()));
    g.bench_function("packed_512x576x8", |bench| bench.iter(|| ops::matmul_nt(&xs, 512, 576, &av, 8)));
    g.finish();

    // Sampling's small-row products at 16 rows (MAGRPO's K = 4 samples of 4 episodes): rows of
    // A dotted with the weight rows, and weights broadcast against Aᵀ (AVX-512F; on other CPUs
    // both rows run the dot products).
    let mut g = c.benchmark_group("small_rows");
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    for (name, broadcast) in [("dot_16x576x1536", false), ("broadcast_16x576x1536", true)] {
        g.bench_function(name, |bench| bench.iter(|| ops::matmul_nt_small_with(broadcast, &xs[..16 * 576], 16, 576, &wv, 1536).unwrap()));
    }
    // Batch-1 decoding's product against a weight in f32 and in bf16 (widened in registers).
    let wb: Vec<half::bf16> = wv.iter().map(|&v| half::bf16::from_f32(v)).collect();
    g.bench_function("dot_1x576x1536", |bench| {
        bench.iter(|| ops::matmul_nt_small_many(&xs[..576], 1, 576, &[(ops::Weight::F32(&wv), 1536)]).unwrap())
    });
    g.bench_function("dot_bf16_1x576x1536", |bench| {
        bench.iter(|| ops::matmul_nt_small_many(&xs[..576], 1, 576, &[(ops::Weight::Bf16(&wb), 1536)]).unwrap())
    });
    // A rank-16 LoRA adapter's thin product X Aᵀ over 512 rows takes the same kernels (A as the rows).
    let a16: Vec<f32> = (0..16 * 576).map(|i| ((i * 37) % 97) as f32 / 970.0 - 0.05).collect();
    for (name, broadcast) in [("thin_dot_16x576x512", false), ("thin_broadcast_16x576x512", true)] {
        g.bench_function(name, |bench| bench.iter(|| ops::matmul_nt_small_with(broadcast, &a16, 16, 576, &xs, 512).unwrap()));
    }
    g.finish();

    // The GEMM kernels side by side on SmolLM2's projection and lm_head shapes (on a CPU without
    // AVX-512 both rows run the gemm crate).
    let mut g = c.benchmark_group("gemm");
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    for (m, k, n) in [(512usize, 576usize, 1536usize), (880, 576, 576), (256, 576, 49152)] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 97) as f32 / 97.0 - 0.5).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i % 89) as f32 / 89.0 - 0.5).collect();
        for (name, kernel) in [("avx512", sgemm::Kernel::Avx512), ("gemm_crate", sgemm::Kernel::GemmCrate)] {
            g.bench_function(format!("{name}_{m}x{k}x{n}"), |bench| bench.iter(|| sgemm::matmul_nt_with(kernel, &a, m, k, &b, n)));
        }
        // The same product on AMX tiles in bf16 (where the CPU has them).
        if collm_model::amx::available() {
            g.bench_function(format!("amx_bf16_{m}x{k}x{n}"), |bench| bench.iter(|| collm_model::amx::matmul_nt_bf16(&a, m, k, &b, n)));
        }
    }
    // A weight's gradient dyᵀ·x [1536, 576] over 1024 rows: both operands are packed from
    // rows that are contiguous along the panels.
    let (dy, x): (Vec<f32>, Vec<f32>) =
        ((0..1024 * 1536).map(|i| (i % 83) as f32 / 83.0 - 0.5).collect(), (0..1024 * 576).map(|i| (i % 79) as f32 / 79.0 - 0.5).collect());
    g.bench_function("tn_1536x1024x576", |bench| bench.iter(|| ops::matmul_tn(&dy, 1024, 1536, &x, 576).unwrap()));
    g.finish();

    // Attention of one layer's shape (9 query heads over 3 key-value heads, head size 64).
    let mut g = c.benchmark_group("attention");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for t in [256usize, 1024] {
        // Grouped heads ride in the query rows: q is [batch, kv heads, 3·t, head size].
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 3 * t, 64), &dev).unwrap()).unwrap();
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, t, 64), &dev).unwrap()).unwrap();
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, t, 64), &dev).unwrap()).unwrap();
        let mask = ops::AttnMask::causal(&vec![vec![true; t]; 2], 0, t);
        for (name, fused) in [("fused", true), ("unfused", false)] {
            g.bench_function(format!("{name}_fwd_bwd_2x{t}"), |bench| {
                bench.iter(|| {
                    let o = if fused {
                        ops::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 0.125).unwrap()
                    } else {
                        ops::attention_unfused(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 0.125).unwrap()
                    };
                    o.sqr().unwrap().sum_all().unwrap().backward().unwrap()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
