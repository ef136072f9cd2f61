//! The generic path (candle's differentiable ops, which run on any device) against the fused CPU
//! kernels: every op's forward and gradients, a whole tiny model's log-probs, hidden states and
//! weight gradients, and AdamW's update. Then bf16: log-probs near f32's, training that lowers
//! the NLL like f32 does, and placement.

use candle_core::{DType, Device, Tensor, Var};
use collm_model::checkpoint;
use collm_model::ops::{self, with_generic_ops, AttnMask, RopeTable};
use collm_model::*;

mod common;
use common::*;

fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap())
}

fn var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&random(shape, seed)).unwrap()
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| model::normal(&mut rng)).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
}

/// Runs `op` on the inputs along both paths and checks that the outputs and the gradients of
/// Σ out · w with respect to every input agree within 1e-4 (relative to the gradient's size).
fn check(name: &str, inputs: &[&Var], op: impl Fn() -> Tensor) {
    let run = || {
        let out = op();
        let w = random(out.dims(), 99);
        let store = (out.to_dtype(DType::F32).unwrap() * w).unwrap().sum_all().unwrap().backward().unwrap();
        let grads: Vec<Tensor> =
            inputs.iter().map(|v| store.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: an input got no gradient")).clone()).collect();
        (out, grads)
    };
    let (fused, fused_grads) = run();
    let (generic, generic_grads) = with_generic_ops(run);
    let d = max_diff(&fused, &generic);
    assert!(d <= 1e-4 * max_abs(&generic).max(1.0), "{name}: outputs differ by {d}");
    for (i, (a, b)) in fused_grads.iter().zip(&generic_grads).enumerate() {
        let scale = max_abs(b);
        assert!(scale > 1e-6, "{name}: gradient {i} is zero, so the check would prove nothing");
        let d = max_diff(a, b);
        assert!(d <= 1e-4 * scale.max(1.0), "{name}: gradient {i} differs by {d} (scale {scale})");
    }
}

#[test]
fn each_op_matches_its_generic_path_with_gradients() {
    let valid: Vec<Vec<bool>> = (0..2).map(|r| (0..40).map(|j| r == 0 || !(j < 3 || (20..23).contains(&j))).collect()).collect();
    let mask = AttnMask::causal(&valid, 8, 32);

    let s = var(&[2, 3, 32, 40], 1);
    check("attn_softmax", &[&s], || ops::attn_softmax(s.as_tensor(), &mask, 0.3).unwrap());

    let (x, w) = (var(&[2, 5, 24], 2), var(&[24], 3));
    check("rms_norm", &[&x, &w], || ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap());

    let positions: Vec<u32> = (0..2 * 5).map(|i| (i * 7 % 13) as u32).collect();
    let table = RopeTable::new(&positions, 8, 10000.0);
    let q = var(&[2, 5, 3, 8], 4);
    check("rope", &[&q], || ops::rope(q.as_tensor(), &table).unwrap());

    // A projection's output into heads and back: 6 heads in 2 groups, rotated or not, from the
    // flat [b, t, heads · hd] and from [b, t, heads, hd] (after a q/k norm).
    let x = var(&[2, 5, 6 * 8], 23);
    check("to_heads (rope, grouped)", &[&x], || ops::to_heads(x.as_tensor(), Some(&table), 6, 2).unwrap());
    check("to_heads (plain)", &[&x], || ops::to_heads(x.as_tensor(), None, 6, 6).unwrap());
    check("to_heads (4-d)", &[&q], || ops::to_heads(q.as_tensor(), Some(&table), 3, 1).unwrap());
    let o = var(&[2, 2, 3 * 5, 8], 24);
    check("from_heads", &[&o], || ops::from_heads(o.as_tensor(), 6).unwrap());
    assert_eq!(ops::to_heads(x.as_tensor(), Some(&table), 6, 2).unwrap().dims(), &[2, 2, 15, 8]);
    assert_eq!(ops::from_heads(o.as_tensor(), 6).unwrap().dims(), &[2, 5, 48]);
    assert!(ops::to_heads(x.as_tensor(), None, 5, 5).is_err() && ops::to_heads(x.as_tensor(), None, 6, 4).is_err());

    let logits = var(&[6, 50], 5);
    check("token_logprobs", &[&logits], || ops::token_logprobs(logits.as_tensor(), &[0, 7, 49, 3, 3, 21]).unwrap());

    // Scaled so that the gate reaches far into both tails of the sigmoid; 40,000 values span
    // several parallel tasks and leave a remainder.
    let (gate, up) = (Var::from_tensor(&(random(&[4, 10_000], 21) * 12.0).unwrap()).unwrap(), var(&[4, 10_000], 22));
    check("swiglu", &[&gate, &up], || ops::swiglu(gate.as_tensor(), up.as_tensor()).unwrap());

    let (x, frozen) = (var(&[3, 4, 16], 6), random(&[10, 16], 7));
    check("frozen_linear", &[&x], || ops::frozen_linear(x.as_tensor(), &frozen).unwrap());

    let (x, w) = (var(&[3, 4, 16], 8), var(&[10, 16], 9));
    check("linear_nt", &[&x, &w], || ops::linear_nt(x.as_tensor(), w.as_tensor()).unwrap());

    // A projection into heads in one op (6 heads in 2 groups, rotated or not), W trained or frozen.
    let (x, w) = (var(&[2, 5, 16], 45), var(&[48, 16], 46));
    check("linear_heads (rope, grouped)", &[&x, &w], || ops::linear_heads(x.as_tensor(), w.as_tensor(), Some(&table), 6, 2).unwrap());
    check("linear_heads (plain)", &[&x, &w], || ops::linear_heads(x.as_tensor(), w.as_tensor(), None, 6, 6).unwrap());
    let frozen = random(&[48, 16], 47);
    check("linear_heads (frozen)", &[&x], || ops::linear_heads(x.as_tensor(), &frozen, Some(&table), 6, 3).unwrap());
    assert!(ops::linear_heads(x.as_tensor(), &random(&[47, 16], 48), None, 6, 6).is_err());
    assert!(ops::linear_heads(x.as_tensor(), w.as_tensor(), None, 0, 1).is_err());
    assert!(ops::linear_heads(&var(&[2, 0, 16], 50).as_tensor().clone(), w.as_tensor(), None, 6, 6).is_err());

    // A projection added onto the residual stream: W trains, or is frozen (no gradient).
    let (res, x, w) = (var(&[3, 4, 10], 40), var(&[3, 4, 16], 41), var(&[10, 16], 42));
    check("residual_linear", &[&res, &x, &w], || ops::residual_linear(res.as_tensor(), x.as_tensor(), w.as_tensor()).unwrap());
    let frozen = random(&[10, 16], 43);
    check("residual_linear (frozen)", &[&res, &x], || ops::residual_linear(res.as_tensor(), x.as_tensor(), &frozen).unwrap());
    assert!(ops::residual_linear(var(&[3, 4, 9], 44).as_tensor(), x.as_tensor(), w.as_tensor()).is_err());
    // The same number of rows in another arrangement is an error, as the composed add's is.
    assert!(ops::residual_linear(var(&[4, 3, 10], 49).as_tensor(), x.as_tensor(), w.as_tensor()).is_err());

    // A LoRA-adapted frozen projection: x, A and B get gradients, W none.
    let (x, frozen, a, b) = (var(&[3, 7, 16], 16), random(&[10, 16], 17), var(&[3, 16], 18), var(&[10, 3], 19));
    check("lora_linear", &[&x, &a, &b], || ops::lora_linear(x.as_tensor(), &frozen, a.as_tensor(), b.as_tensor(), 1.5).unwrap());
    // Thin products over several 64-row blocks with a ragged depth (37), an odd rank, and a
    // rank past the thin kernel's limit (the packed GEMM then serves x Aᵀ and dy B).
    for (rank, seed) in [(5usize, 30u64), (17, 34)] {
        let (x, frozen, a, b) =
            (var(&[2, 70, 37], seed), random(&[12, 37], seed + 1), var(&[rank, 37], seed + 2), var(&[12, rank], seed + 3));
        check("lora_linear (thin)", &[&x, &a, &b], || ops::lora_linear(x.as_tensor(), &frozen, a.as_tensor(), b.as_tensor(), 0.7).unwrap());
    }
    // A rank-0 adapter (no product at all) is the base projection, backward included.
    let (x0, a0, b0) = (var(&[2, 3, 16], 51), var(&[0, 16], 52), var(&[10, 0], 53));
    let y0 = ops::lora_linear(x0.as_tensor(), &frozen, a0.as_tensor(), b0.as_tensor(), 1.0).unwrap();
    assert!(max_diff(&y0, &ops::frozen_linear(x0.as_tensor(), &frozen).unwrap()) < 1e-6);
    assert!(y0.sum_all().unwrap().backward().is_ok());
    // Without a graph over more rows than the streaming path takes (sampling's prefill).
    let (xs, a_, b_) = (random(&[40, 16], 20), random(&[3, 16], 21), random(&[10, 3], 22));
    let fused = ops::lora_linear(&xs, &frozen, &a_, &b_, 1.5).unwrap();
    let generic = with_generic_ops(|| ops::lora_linear(&xs, &frozen, &a_, &b_, 1.5).unwrap());
    assert!(max_diff(&fused, &generic) <= 1e-4 * max_abs(&generic).max(1.0), "lora_linear without a graph");

    // The fused, block-wise attention (query blocks of 64 rows; several blocks per head).
    let (q, k, v) = (var(&[2, 2, 3 * 32, 8], 10), var(&[2, 2, 40, 8], 11), var(&[2, 2, 40, 8], 12));
    let long = {
        let valid: Vec<Vec<bool>> = (0..2).map(|r| (0..140).map(|j| r == 0 || j >= 5).collect()).collect();
        AttnMask::causal(&valid, 10, 130)
    };
    check("attention", &[&q, &k, &v], || ops::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 0.35).unwrap());
    let (q, k, v) = (var(&[2, 1, 2 * 130, 8], 13), var(&[2, 1, 140, 8], 14), var(&[2, 1, 140, 8], 15));
    check("attention (long)", &[&q, &k, &v], || ops::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &long, 0.35).unwrap());
}

/// Log-probs, hidden states and the gradient of every trainable weight from one teacher-forced
/// pass over `seqs`, along the path in force.
fn model_pass(m: &Transformer, seqs: &[Vec<u32>]) -> (Tensor, Tensor, Vec<(String, Tensor)>) {
    let spans: Vec<Vec<(usize, usize)>> = seqs.iter().map(|s| vec![(1, s.len() / 2), (s.len() / 2 + 1, s.len())]).collect();
    let positions: Vec<Vec<usize>> = seqs.iter().map(|s| vec![0, s.len() / 3, s.len() - 1]).collect();
    let out = score_spans(m, seqs, &spans, &positions, 0, true).unwrap();
    let hidden = out.hidden.clone().unwrap();
    let w = random(hidden.dims(), 5);
    let loss = (out.token_logprobs.sum_all().unwrap().neg().unwrap()
        + (hidden.to_dtype(DType::F32).unwrap() * w).unwrap().sum_all().unwrap())
    .unwrap();
    let store = loss.backward().unwrap();
    let grads = m
        .trainable()
        .map(|(n, v)| (n.clone(), store.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {n}")).clone()))
        .collect();
    (out.token_logprobs, hidden, grads)
}

fn sequences(vocab: u32, lens: &[usize], seed: u64) -> Vec<Vec<u32>> {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    lens.iter().map(|&n| (0..n).map(|_| rand::Rng::random_range(&mut rng, 1..vocab)).collect()).collect()
}

#[test]
fn a_tiny_model_gives_the_same_logprobs_hidden_states_and_gradients_on_both_paths() {
    let mut untied = ModelConfig::tiny(Arch::Llama, 64);
    untied.tie_word_embeddings = false;
    let models =
        vec![tiny(Arch::Llama, 64, 1), tiny(Arch::Qwen2, 64, 2), tiny(Arch::Qwen3, 64, 3), Transformer::random(untied, 4).unwrap()];
    // 330 tokens × 4 heads takes the fused block-wise attention on the CPU path; the short,
    // padded batch the plain attention ops.
    let batches = [sequences(64, &[330], 1), sequences(64, &[17, 9, 12], 2)];
    for mut m in models {
        for lora in [false, true] {
            if lora {
                let targets = ["q_proj", "v_proj", "down_proj"].map(String::from).to_vec();
                m.add_lora(LoraConfig { rank: 2, alpha: 4.0, targets }, 7).unwrap();
                // B starts at zero: move it, so the adapters change the outputs.
                for (n, p) in &m.params {
                    if n.contains("lora_B") {
                        p.var.set(&random(p.var.dims(), 3).affine(0.05, 0.0).unwrap()).unwrap();
                    }
                }
            }
            for seqs in &batches {
                let what = format!("{:?} lora {lora}, {} rows", m.cfg.arch, seqs.len());
                let (lp, h, g) = model_pass(&m, seqs);
                let (lp2, h2, g2) = with_generic_ops(|| model_pass(&m, seqs));
                assert!(max_diff(&lp, &lp2) <= 1e-4, "{what}: log-probs differ by {}", max_diff(&lp, &lp2));
                assert!(max_diff(&h, &h2) <= 1e-4, "{what}: hidden states differ by {}", max_diff(&h, &h2));
                assert_eq!(g.len(), m.trainable().count());
                for ((name, a), (_, b)) in g.iter().zip(&g2) {
                    let scale = max_abs(b);
                    assert!(scale > 0.0, "{what}: {name}'s gradient is zero");
                    assert!(
                        max_diff(a, b) <= 1e-4 * scale.max(1.0),
                        "{what}: {name}'s gradient differs by {} (scale {scale})",
                        max_diff(a, b)
                    );
                }
            }
        }
    }
}

/// Three AdamW steps on a tiny model from fixed gradients, clipped; returns the weights.
fn adamw_steps(m: &Transformer) -> Vec<Vec<f32>> {
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() });
    for step in 0..3 {
        let mut grads = Grads::new();
        for (i, (name, v)) in m.trainable().enumerate() {
            grads.map.insert(name.clone(), random(v.dims(), 100 * step + i as u64).to_dtype(v.dtype()).unwrap());
        }
        grads.clip_norm(5.0).unwrap();
        opt.step(m.trainable(), &grads).unwrap();
    }
    m.trainable().map(|(_, v)| v.as_tensor().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

#[test]
fn adamw_updates_alike_on_both_paths() {
    let fused = adamw_steps(&tiny(Arch::Qwen3, 64, 5));
    let generic = with_generic_ops(|| adamw_steps(&tiny(Arch::Qwen3, 64, 5)));
    let start = tiny(Arch::Qwen3, 64, 5);
    let first: Vec<f32> = start.trainable().next().unwrap().1.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    assert!(fused[0].iter().zip(&first).any(|(a, b)| (a - b).abs() > 1e-3), "the weights did not move");
    for (a, b) in fused.iter().zip(&generic) {
        let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d <= 1e-6, "AdamW's paths differ by {d}");
    }
}

fn nll(m: &Transformer, seqs: &[Vec<u32>]) -> Tensor {
    let spans: Vec<Vec<(usize, usize)>> = seqs.iter().map(|s| vec![(1, s.len())]).collect();
    score_spans(m, seqs, &spans, &vec![vec![]; seqs.len()], 0, true).unwrap().token_logprobs.mean_all().unwrap().neg().unwrap()
}

/// The NLL of a fixed batch before and after each of 30 AdamW steps on it.
fn train_curve(m: &Transformer, seqs: &[Vec<u32>]) -> Vec<f32> {
    let mut opt = AdamW::new(AdamWConfig { lr: 3e-3, weight_decay: 0.01, ..Default::default() });
    let mut curve = vec![];
    for _ in 0..30 {
        let loss = nll(m, seqs);
        curve.push(loss.to_scalar::<f32>().unwrap());
        let mut g = Grads::new();
        g.accumulate(&loss.backward().unwrap(), m.trainable()).unwrap();
        g.clip_norm(1.0).unwrap();
        opt.step(m.trainable(), &g).unwrap();
    }
    curve.push(nll(m, seqs).to_scalar::<f32>().unwrap());
    curve
}

#[test]
fn bf16_training_lowers_the_nll_like_f32() {
    let seqs = sequences(64, &[24, 17], 9);
    for arch in [Arch::Llama, Arch::Qwen3] {
        let full = tiny(arch, 64, 21);
        let mut half = tiny(arch, 64, 21);
        half.place(&Device::Cpu, DType::BF16).unwrap();
        assert!(half.params.values().all(|p| p.var.dtype() == DType::BF16));
        let a = train_curve(&full, &seqs);
        let b = train_curve(&half, &seqs);
        eprintln!("{arch:?}: f32 NLL {:.3} -> {:.3}, bf16 {:.3} -> {:.3}", a[0], a[30], b[0], b[30]);
        assert!((a[0] - b[0]).abs() < 0.02, "{arch:?}: starting NLL f32 {} bf16 {}", a[0], b[0]);
        assert!(a[30] < 0.5 * a[0] && b[30] < 0.5 * b[0], "{arch:?}: f32 {a:?}\nbf16 {b:?}");
        for (t, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 0.1 * x.max(0.5), "{arch:?} step {t}: f32 NLL {x}, bf16 {y}");
        }
        // The optimizer holds f32 masters of the bf16 weights; the weights are their rounding.
        let mut opt = AdamW::new(AdamWConfig { lr: 1e-3, ..Default::default() });
        let mut g = Grads::new();
        g.accumulate(&nll(&half, &seqs).backward().unwrap(), half.trainable()).unwrap();
        assert!(g.map.values().all(|t| t.dtype() == DType::F32), "gradients are summed in f32");
        opt.step(half.trainable(), &g).unwrap();
        let state = opt.state_tensors().unwrap();
        for (name, v) in half.trainable() {
            let master = &state[&format!("{name}.master")];
            assert_eq!(master.dtype(), DType::F32);
            let rounded = master.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(max_diff(&rounded, &v.as_tensor().flatten_all().unwrap()), 0.0, "{name}");
        }
    }
}

#[test]
fn a_bf16_model_resumes_exactly_from_its_checkpoint_and_optimizer_state() {
    let seqs = sequences(64, &[20, 11], 4);
    let step = |m: &Transformer, opt: &mut AdamW| {
        let mut g = Grads::new();
        g.accumulate(&nll(m, &seqs).backward().unwrap(), m.trainable()).unwrap();
        opt.step(m.trainable(), &g).unwrap();
    };
    let weights =
        |m: &Transformer| m.tensors().unwrap().values().map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect::<Vec<_>>();
    let mut a = tiny(Arch::Qwen2, 64, 8);
    a.place(&Device::Cpu, DType::BF16).unwrap();
    let mut opt_a = AdamW::new(AdamWConfig { lr: 1e-2, ..Default::default() });
    for _ in 0..2 {
        step(&a, &mut opt_a);
    }
    let dir = tmpdir("bf16-resume");
    checkpoint::save(&a, &dir, false).unwrap();
    let state = opt_a.state_tensors().unwrap();
    let mut b = tiny(Arch::Qwen2, 64, 99);
    b.place(&Device::Cpu, DType::BF16).unwrap();
    checkpoint::load_into(&mut b, &dir).unwrap();
    let mut opt_b = AdamW::new(AdamWConfig { lr: 1e-2, ..Default::default() });
    opt_b.load_state_tensors(opt_a.t, &opt_a.param_steps(), &state).unwrap();
    let same = |a: &Transformer, b: &Transformer| {
        let (x, y) = (weights(a), weights(b));
        x.iter().zip(&y).map(|(p, q)| p.iter().zip(q).filter(|(u, v)| u != v).count()).sum::<usize>()
    };
    assert_eq!(same(&a, &b), 0, "weights differ after loading the checkpoint");
    for _ in 0..2 {
        step(&a, &mut opt_a);
        step(&b, &mut opt_b);
    }
    assert_eq!(same(&a, &b), 0, "the resumed bf16 run diverged (count of differing weights)");
    // Without the masters the run would not be exact: a fresh optimizer state restarts from
    // the rounded weights (this is what the masters are for).
    assert!(state.keys().any(|k| k.ends_with(".master")));
}

#[test]
fn placing_a_model_checks_the_dtype_and_keeps_outputs() {
    let mut m = tiny(Arch::Llama, 64, 3);
    let err = m.place(&Device::Cpu, DType::F16).unwrap_err().to_string();
    assert!(err.contains("f32 or bf16"), "{err}");
    let seqs = sequences(64, &[12], 1);
    let before = nll(&m, &seqs).to_scalar::<f32>().unwrap();
    m.place(&Device::Cpu, DType::BF16).unwrap();
    m.place(&Device::Cpu, DType::F32).unwrap();
    let after = nll(&m, &seqs).to_scalar::<f32>().unwrap();
    assert!((before - after).abs() < 0.01, "{before} vs {after}");
}

/// What `collm bench gpu` runs on a GPU, here with the CPU's generic path as the device: every
/// op passes, and a broken op would show (the check compares against the fused kernels).
#[test]
fn the_device_check_passes_on_the_cpus_generic_path() {
    let checks = collm_model::devcheck::check_ops(&Device::Cpu).unwrap();
    assert_eq!(checks.len(), 8);
    for c in &checks {
        assert!(c.passed(), "{c:?}");
    }
    // A random model of a real shape, made on a device in bf16.
    let mut cfg = ModelConfig::shape_of("smollm2-135m").unwrap();
    cfg.num_layers = 2;
    let m = collm_model::devcheck::random_model_on(cfg, &Device::Cpu, DType::BF16).unwrap();
    assert_eq!(m.dtype(), DType::BF16);
    assert_eq!(m.cfg.hidden_size, 576);
    assert!(ModelConfig::shape_of("llama-70b").is_err());
}

/// The kernel checks `collm bench gpu` runs on a GPU compare each CUDA kernel against the generic
/// path; where no kernel serves (the CPU, or a build without CUDA) they say so and none passes, so
/// a kernel that silently fell back to the generic path can never be reported as checked.
#[test]
fn a_kernel_check_passes_only_where_the_kernel_ran() {
    let checks = collm_model::devcheck::check_kernels(&Device::Cpu).unwrap();
    // Six cases in f32 and bf16, and AdamW.
    assert_eq!(checks.len(), 13);
    for k in collm_model::cuda::Kernel::ALL {
        assert!(checks.iter().any(|c| c.kernel == k.name()), "no check of {k:?}");
    }
    for c in &checks {
        assert!(!c.ran && !c.passed(), "{c:?}");
        // Both runs took the same (generic) path: identical results.
        assert_eq!((c.output, c.gradient), (0.0, 0.0), "{c:?}");
    }
    let bf16 = checks.iter().filter(|c| c.dtype == "bf16").count();
    assert_eq!(bf16, 6);
    assert!(checks
        .iter()
        .all(|c| c.tolerance == collm_model::devcheck::kernel_tolerance(if c.dtype == "bf16" { DType::BF16 } else { DType::F32 })));
}
