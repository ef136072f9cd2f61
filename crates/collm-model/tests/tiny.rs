//! Behaviour of the model core on tiny random models built here: KV-cache decoding, gradients,
//! LoRA, AdamW, padding invariance, checkpoints, HF export, GGUF loading, malformed inputs.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use collm_model::checkpoint;
use collm_model::generate::{extend, prefill};
use collm_model::loader;
use collm_model::*;

mod common;
use common::*;

fn all_archs() -> Vec<Transformer> {
    let mut untied = ModelConfig::tiny(Arch::Llama, 64);
    untied.tie_word_embeddings = false;
    vec![tiny(Arch::Llama, 64, 1), tiny(Arch::Qwen2, 64, 2), tiny(Arch::Qwen3, 64, 3), Transformer::random(untied, 4).unwrap()]
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Logits at every position of one unpadded sequence, from a fresh full forward.
fn full_logits(m: &Transformer, seq: &[u32]) -> Tensor {
    let mut cache = KvCache::new(1, m.cfg.num_layers);
    let h = m.forward(&[seq.to_vec()], &[vec![true; seq.len()]], &mut cache, false).unwrap();
    m.logits(&h.squeeze(0).unwrap(), false).unwrap()
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    for m in all_archs() {
        let seqs: Vec<Vec<u32>> = vec![vec![5, 9, 17, 3, 44, 2, 8, 31, 12], vec![7, 1, 60, 22, 13, 9, 40, 33, 21]];
        let prompt_lens = [3usize, 6];
        let prompts: Vec<Vec<u32>> = seqs.iter().zip(prompt_lens).map(|(s, n)| s[..n].to_vec()).collect();
        let (mut cache, mut logits) = prefill(&m, &prompts, 0).unwrap();
        let full: Vec<Tensor> = seqs.iter().map(|s| full_logits(&m, s)).collect();
        for step in 0..3 {
            for r in 0..2 {
                let pos = prompt_lens[r] - 1 + step;
                let want = full[r].get(pos).unwrap();
                let d = max_diff(&logits.get(r).unwrap(), &want);
                assert!(d <= 1e-4, "{:?}: row {r} step {step}: cached logits differ by {d}", m.cfg.arch);
            }
            let next: Vec<Vec<u32>> = (0..2).map(|r| vec![seqs[r][prompt_lens[r] + step]]).collect();
            logits = extend(&m, &mut cache, &next, 0).unwrap();
        }
    }
}

/// The decode step on raw slices (`decode_cpu`) gives the general pass's hidden states: every
/// architecture (biases, q/k norms, untied head) and a LoRA adapter whose B is not zero, three
/// rows left-padded to different prompt lengths with one row finished (stepping with padding)
/// after a few steps, and a batch of one, over 70 steps (the cache's room regrows).
#[test]
fn the_fast_decode_step_equals_the_general_pass() {
    use collm_model::decode_cpu::{steps_on_this_thread, without_fast_decode};
    let mut models = all_archs();
    let mut lora = tiny(Arch::Qwen2, 64, 9);
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec();
    lora.add_lora(LoraConfig { rank: 4, alpha: 8.0, targets }, 1).unwrap();
    for (name, p) in &lora.params {
        if name.contains("lora_B") {
            p.var.set(&Tensor::randn(0f32, 0.5, p.var.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    models.push(lora);
    for m in &models {
        for prompts in [vec![vec![5u32, 9, 17], vec![7, 1, 60, 22, 13, 9], vec![3]], vec![vec![11, 4, 8, 2]]] {
            let rows = prompts.len();
            let (mut fast, _) = prefill(m, &prompts, 0).unwrap();
            let mut general = fast.clone();
            for step in 0..70 {
                let tokens: Vec<Vec<u32>> = (0..rows).map(|r| vec![((step * 7 + r * 11 + 1) % 64) as u32]).collect();
                let valid: Vec<Vec<bool>> = (0..rows).map(|r| vec![!(r == 1 && step >= 4)]).collect();
                let before = steps_on_this_thread();
                let h = m.forward(&tokens, &valid, &mut fast, false).unwrap();
                assert!(steps_on_this_thread() == before + 1, "{:?}: the step did not take the fast path", m.cfg.arch);
                let want = without_fast_decode(|| m.forward(&tokens, &valid, &mut general, false)).unwrap();
                assert_eq!(h.dims(), want.dims());
                let d = max_diff(&h, &want);
                assert!(d <= 1e-4, "{:?} (LoRA {}), {rows} row(s), step {step}: hidden states differ by {d}", m.cfg.arch, m.lora.is_some());
            }
            assert_eq!((fast.next_pos.clone(), fast.valid.clone()), (general.next_pos.clone(), general.valid.clone()));
            // A pass with a graph, or with the generic ops forced, takes the general pass.
            let before = steps_on_this_thread();
            let (tokens, valid) = (vec![vec![1u32]; rows], vec![vec![true]; rows]);
            m.forward(&tokens, &valid, &mut fast.clone(), true).unwrap();
            ops::with_generic_ops(|| m.forward(&tokens, &valid, &mut fast.clone(), false)).unwrap();
            assert_eq!(steps_on_this_thread(), before, "{:?}: a graph or generic pass took the fast path", m.cfg.arch);
        }
    }
}

/// Token-by-token passes without a graph write into the cache's room in place (doubling it when
/// full): after 150 steps (the room regrown several times) each step's logits equal a full
/// forward's. A clone of the cache, extended differently from the original, gives its own
/// sequence's logits and leaves the original's intact; a pass with a graph after in-place ones
/// concatenates and still agrees.
#[test]
fn an_in_place_cache_decodes_like_a_full_pass_and_clones_stay_apart() {
    let m = tiny(Arch::Qwen3, 64, 5);
    let seq: Vec<u32> = (0..160).map(|i| (i * 13 + 7) % 64).collect();
    let other: Vec<u32> = (0..160).map(|i| (i * 5 + 3) % 64).collect();
    let full = full_logits(&m, &seq);
    let full_other = full_logits(&m, &[&seq[..40], &other[40..60]].concat());
    let step = |cache: &mut KvCache, t: u32, grad: bool| {
        let h = m.forward(&[vec![t]], &[vec![true]], cache, grad).unwrap();
        m.logits(&h.squeeze(0).unwrap(), false).unwrap().squeeze(0).unwrap()
    };
    let mut cache = KvCache::new(1, m.cfg.num_layers);
    m.forward(&[seq[..10].to_vec()], &[vec![true; 10]], &mut cache, false).unwrap();
    let check = |cache: &mut KvCache, toks: &[u32], want: &Tensor, from: usize, to: usize, what: &str| {
        for i in from..to {
            let d = max_diff(&step(cache, toks[i], false), &want.get(i).unwrap());
            assert!(d < 1e-4, "{what} step {i}: {d}");
        }
    };
    check(&mut cache, &seq, &full, 10, 40, "original");
    // A clone at position 40 and the original take turns, each with its own tokens, while they
    // could still share a room.
    let mut fork = cache.clone();
    check(&mut fork, &other, &full_other, 40, 50, "fork");
    check(&mut cache, &seq, &full, 40, 50, "original");
    check(&mut fork, &other, &full_other, 50, 60, "fork");
    check(&mut cache, &seq, &full, 50, 160, "original");
    // The original, after the fork wrote its own steps, still continues its sequence; a pass with
    // a graph appends by concatenation.
    let extra = 33u32;
    let want = full_logits(&m, &[&seq[..160], &[extra]].concat());
    let got = step(&mut cache, extra, true);
    assert!(max_diff(&got, &want.get(160).unwrap()) < 1e-4);
}

fn nll_loss(m: &Transformer, pairs: &[(Vec<u32>, Vec<u32>)]) -> Tensor {
    score(m, pairs, 0, true).unwrap().token_logprobs.mean_all().unwrap().neg().unwrap()
}

fn pairs() -> Vec<(Vec<u32>, Vec<u32>)> {
    vec![(vec![1, 2, 3], vec![4, 5, 6, 7]), (vec![9, 8], vec![7, 6, 5, 4, 3, 2])]
}

#[test]
fn every_trainable_weight_gets_a_gradient() {
    for m in all_archs() {
        let store = nll_loss(&m, &pairs()).backward().unwrap();
        let mut n = 0;
        for (name, var) in m.trainable() {
            let g = store.get(var.as_tensor()).unwrap_or_else(|| panic!("{:?}: no gradient for {name}", m.cfg.arch));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{:?}: zero gradient for {name}", m.cfg.arch);
            n += 1;
        }
        assert_eq!(n, m.params.len());
    }
}

#[test]
fn lora_trains_adapters_only() {
    for mut m in all_archs() {
        let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec();
        m.add_lora(LoraConfig { rank: 4, alpha: 8.0, targets }, 0).unwrap();
        let frozen: Vec<_> = m.params.iter().filter(|(_, p)| !p.trainable).map(|(n, p)| (n.clone(), p.var.clone())).collect();
        assert!(frozen.iter().all(|(n, _)| !n.contains("lora_")));
        let mut opt = AdamW::new(AdamWConfig { lr: 1e-2, ..Default::default() });
        for step in 0..2 {
            let store = nll_loss(&m, &pairs()).backward().unwrap();
            for (n, v) in &frozen {
                assert!(store.get(v.as_tensor()).is_none(), "frozen {n} received a gradient");
            }
            let mut grads = Grads::new();
            grads.accumulate(&store, m.trainable()).unwrap();
            for (name, _) in m.trainable() {
                let g = grads.map.get(name).unwrap_or_else(|| panic!("no gradient for adapter {name}"));
                let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                // B starts at zero, so A's gradient is zero until B has moved once.
                if step == 1 || name.contains("lora_B") {
                    assert!(norm > 0.0, "step {step}: zero gradient for {name}");
                }
            }
            opt.step(m.trainable(), &grads).unwrap();
        }
    }
}

#[test]
fn adamw_lowers_the_nll_of_a_fixed_sequence() {
    let m = tiny(Arch::Llama, 64, 11);
    let p = pairs();
    let before = nll_loss(&m, &p).to_scalar::<f32>().unwrap();
    let mut opt = AdamW::new(AdamWConfig { lr: 3e-3, weight_decay: 0.01, ..Default::default() });
    for _ in 0..30 {
        let store = nll_loss(&m, &p).backward().unwrap();
        let mut g = Grads::new();
        g.accumulate(&store, m.trainable()).unwrap();
        g.clip_norm(1.0).unwrap();
        opt.step(m.trainable(), &g).unwrap();
    }
    let after = nll_loss(&m, &p).to_scalar::<f32>().unwrap();
    assert!(after < before * 0.5, "NLL {before} -> {after}");
}

#[test]
fn adamw_matches_the_reference_formula() {
    // One parameter, two steps, against AdamW written out by hand (PyTorch's algorithm).
    let var = candle_core::Var::from_slice(&[0.5f32, -1.0, 2.0], 3, &Device::Cpu).unwrap();
    let name = "w".to_string();
    let cfg = AdamWConfig { lr: 0.1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
    let mut opt = AdamW::new(cfg.clone());
    let mut p = [0.5f64, -1.0, 2.0];
    let (mut m, mut v) = ([0f64; 3], [0f64; 3]);
    let gs = [[0.1f64, -0.2, 0.3], [0.05, 0.4, -0.1]];
    for (t, g) in gs.iter().enumerate() {
        let mut grads = Grads::new();
        grads.map.insert(name.clone(), Tensor::new(&[g[0] as f32, g[1] as f32, g[2] as f32], &Device::Cpu).unwrap());
        opt.step([(&name, &var)], &grads).unwrap();
        let t = (t + 1) as i32;
        for i in 0..3 {
            p[i] *= 1.0 - cfg.lr * cfg.weight_decay;
            m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g[i];
            v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g[i] * g[i];
            let mh = m[i] / (1.0 - cfg.beta1.powi(t));
            let vh = v[i] / (1.0 - cfg.beta2.powi(t));
            p[i] -= cfg.lr * mh / (vh.sqrt() + cfg.eps);
        }
    }
    let got = var.as_tensor().to_vec1::<f32>().unwrap();
    for i in 0..3 {
        assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
    }
}

#[test]
fn adamw_counts_steps_per_parameter() {
    // A value head steps alone for two updates (the backbone is frozen: no gradient), then both
    // step. As in PyTorch, the backbone's first step has the bias correction of step 1: with
    // zero moments that step is lr · g / (|g| + eps) ≈ lr · sign(g), whatever came before.
    let head = candle_core::Var::from_slice(&[1.0f32], 1, &Device::Cpu).unwrap();
    let body = candle_core::Var::from_slice(&[0.0f32, 0.0], 2, &Device::Cpu).unwrap();
    let (hn, bn) = ("head".to_string(), "body".to_string());
    let mut opt = AdamW::new(AdamWConfig { lr: 0.1, ..Default::default() });
    let grads = |names: &[(&String, f32)]| {
        let mut g = Grads::new();
        for (n, x) in names {
            let len = if n.as_str() == "head" { 1 } else { 2 };
            g.map.insert((*n).clone(), Tensor::new(vec![*x; len], &Device::Cpu).unwrap());
        }
        g
    };
    for _ in 0..2 {
        opt.step([(&hn, &head), (&bn, &body)], &grads(&[(&hn, 0.5)])).unwrap();
    }
    assert_eq!(body.as_tensor().to_vec1::<f32>().unwrap(), vec![0.0, 0.0], "no gradient: no step");
    opt.step([(&hn, &head), (&bn, &body)], &grads(&[(&hn, 0.5), (&bn, 0.01)])).unwrap();
    let b = body.as_tensor().to_vec1::<f32>().unwrap();
    // One global counter (t = 3) would give m̂ = 0.001/(1 − 0.9³), v̂ = 1e-7/(1 − 0.999³):
    // a step of 0.1 · 0.00369 / 0.00577 ≈ 0.064 instead of 0.1.
    assert!((b[0] + 0.1).abs() < 1e-4, "the backbone's first step: {b:?}");
    assert_eq!(opt.param_steps(), [(bn.clone(), 1), (hn.clone(), 3)].into_iter().collect());
    // The counts survive a save and load.
    let mut back = AdamW::new(opt.cfg.clone());
    back.load_state_tensors(opt.t, &opt.param_steps(), &opt.state_tensors().unwrap()).unwrap();
    assert_eq!(back.param_steps(), opt.param_steps());
    // Old checkpoints without counts give every parameter the update count.
    back.load_state_tensors(3, &Default::default(), &opt.state_tensors().unwrap()).unwrap();
    assert_eq!(back.param_steps()[&bn], 3);
}

#[test]
fn gradient_accumulation_equals_one_big_batch_and_clipping_bounds_the_norm() {
    let m = tiny(Arch::Qwen2, 64, 5);
    let p = pairs();
    // Sum of per-response log-prob sums: additive over micro-batches.
    let loss = |ps: &[(Vec<u32>, Vec<u32>)]| score(&m, ps, 0, true).unwrap().sums().unwrap().sum_all().unwrap().neg().unwrap();
    let mut whole = Grads::new();
    whole.accumulate(&loss(&p).backward().unwrap(), m.trainable()).unwrap();
    let mut acc = Grads::new();
    acc.accumulate(&loss(&p[..1]).backward().unwrap(), m.trainable()).unwrap();
    acc.accumulate(&loss(&p[1..]).backward().unwrap(), m.trainable()).unwrap();
    assert_eq!(acc.micro_batches, 2);
    for (name, g) in &whole.map {
        let d = max_diff(g, &acc.map[name]);
        assert!(d < 1e-4, "{name}: accumulated gradient differs by {d}");
    }
    let before = acc.clip_norm(0.5).unwrap();
    assert!(before > 0.5);
    let after = acc.global_norm().unwrap() * acc.scale;
    assert!((after - 0.5).abs() < 1e-3, "clipped norm {after}");
}

#[test]
fn weight_gradients_summed_in_place_equal_candles_store() {
    // Every architecture (tied and untied output heads, biases, QK norms), in full and with LoRA
    // adapters on a frozen base, over two micro-batches: the sums Grads::backward keeps (the
    // projections' and the embedding's gradients added in place) against candle's gradient
    // store summed by Grads::accumulate.
    let mut models = all_archs();
    for mut m in all_archs() {
        let targets = ["q_proj", "v_proj", "gate_proj", "down_proj"].map(String::from).to_vec();
        m.add_lora(LoraConfig { rank: 4, alpha: 8.0, targets }, 1).unwrap();
        models.push(m);
    }
    let p = pairs();
    for m in &models {
        let loss = |ps: &[(Vec<u32>, Vec<u32>)]| score(m, ps, 0, true).unwrap().sums().unwrap().sum_all().unwrap().neg().unwrap();
        let mut store = Grads::new();
        store.accumulate(&loss(&p[..1]).backward().unwrap(), m.trainable()).unwrap();
        store.accumulate(&loss(&p[1..]).backward().unwrap(), m.trainable()).unwrap();
        let mut sink = Grads::new();
        sink.backward(&loss(&p[..1]), m.trainable()).unwrap();
        sink.backward(&loss(&p[1..]), m.trainable()).unwrap();
        let names = |g: &Grads| g.map.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&sink), names(&store), "{:?}", m.cfg.arch);
        assert_eq!(sink.micro_batches, 2);
        for (name, g) in &store.map {
            let scale = g.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
            let d = max_diff(g, &sink.map[name]) / scale;
            assert!(d < 1e-5, "{:?} {name}: the sink's sum differs by {d} (relative)", m.cfg.arch);
        }
        // The full models' projections, embedding and output head (the embedding twice when tied)
        // went through the sink in both micro-batches; the adapters' gradients come from candle's
        // store.
        let lora = m.params.keys().any(|n| n.contains("lora_"));
        let expected = if lora {
            0
        } else {
            let weights =
                m.trainable().filter(|(n, v)| v.rank() == 2 && (n.contains("proj") || n.contains("embed") || n.contains("lm_head")));
            2 * (weights.count() + m.cfg.tie_word_embeddings as usize)
        };
        assert_eq!(sink.sunk, expected, "{:?} lora {lora}", m.cfg.arch);
    }
}

/// A LoRA model's frozen base held in bf16 (`hold_frozen_in`) computes exactly what the f32 model
/// computes on the same bf16-rounded weights: log-probs and adapter gradients with a graph (the
/// frozen projections, the LoRA op, the projection-into-heads and residual ops, the embedding and
/// the tied or untied head), the generic ops, prefill and token-by-token decoding (the fast decode
/// step), and the merged weights an export writes. Every architecture, with the attention adapted
/// and with only the MLP adapted (plain frozen q/k/v), B not zero.
#[test]
fn a_frozen_base_in_bf16_computes_as_f32_on_its_rounded_values() {
    use collm_model::decode_cpu::steps_on_this_thread;
    let p = pairs();
    for targets in [vec!["q_proj", "v_proj", "gate_proj", "down_proj"], vec!["gate_proj", "up_proj"]] {
        for mut m in all_archs() {
            let targets: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
            m.add_lora(LoraConfig { rank: 4, alpha: 8.0, targets: targets.clone() }, 1).unwrap();
            for (name, p) in &m.params {
                if name.contains("lora_B") {
                    p.var.set(&Tensor::randn(0f32, 0.5, p.var.shape(), &Device::Cpu).unwrap()).unwrap();
                }
            }
            let what = format!("{:?} {targets:?}", m.cfg.arch);
            // The reference: the same values rounded to bf16, held in f32.
            let mut reference = m.deep_clone().unwrap();
            reference.hold_frozen_in(candle_core::DType::BF16).unwrap();
            reference.hold_frozen_in(candle_core::DType::F32).unwrap();
            assert_eq!(reference.frozen_dtype(), Some(candle_core::DType::F32));
            let bytes = |m: &Transformer| m.params.values().map(|p| p.var.elem_count() * p.var.dtype().size_in_bytes()).sum::<usize>();
            let frozen_f32 = bytes(&m);
            m.hold_frozen_in(candle_core::DType::BF16).unwrap();
            assert_eq!(m.frozen_dtype(), Some(candle_core::DType::BF16), "{what}");
            assert_eq!(m.dtype(), candle_core::DType::F32, "{what}: the model still computes in f32");
            let frozen_elems: usize = m.params.values().filter(|p| !p.trainable && p.var.rank() == 2).map(|p| p.var.elem_count()).sum();
            assert_eq!(bytes(&m), frozen_f32 - 2 * frozen_elems, "{what}: the frozen matrices take half the bytes");
            assert!(m.params.iter().all(|(n, p)| p.var.dtype() == candle_core::DType::F32 || (!p.trainable && !n.contains("norm"))));

            // With a graph: log-probs and the adapters' gradients, over two micro-batches.
            let run = |m: &Transformer| {
                let mut g = Grads::new();
                let mut lps = vec![];
                for ps in [&p[..1], &p[1..]] {
                    let s = score(m, ps, 0, true).unwrap();
                    lps.push(s.token_logprobs.flatten_all().unwrap());
                    g.backward(&s.sums().unwrap().sum_all().unwrap().neg().unwrap(), m.trainable()).unwrap();
                }
                (Tensor::cat(&lps, 0).unwrap(), g)
            };
            let ((lp, g), (want_lp, want_g)) = (run(&m), run(&reference));
            assert!(max_diff(&lp, &want_lp) < 1e-5, "{what}: log-probs differ by {}", max_diff(&lp, &want_lp));
            assert_eq!(g.map.len(), want_g.map.len(), "{what}");
            for (name, w) in &want_g.map {
                let scale = w.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
                let d = max_diff(&g.map[name], w) / scale;
                assert!(d < 1e-5, "{what} {name}: gradient differs by {d} (relative)");
            }
            // The generic ops widen the base where they meet it.
            let generic = ops::with_generic_ops(|| score(&m, &p, 0, false).unwrap().token_logprobs);
            let d = max_diff(&generic, &score(&reference, &p, 0, false).unwrap().token_logprobs);
            assert!(d < 1e-4, "{what}: generic ops differ by {d}");

            // Sampling: a prefill of rows × 24 (the large-row products), then decode steps of
            // one row (batch-1 decoding's dot kernels) and of two (the paired-row kernels), each
            // the fast decode step on the bf16 weights.
            for rows in [1, 2] {
                let prompts: Vec<Vec<u32>> = (0..rows).map(|r| (0..24).map(|i| ((i * 7 + r * 5 + 1) % 64) as u32).collect()).collect();
                let (mut c, mut l) = prefill(&m, &prompts, 0).unwrap();
                let (mut rc, mut rl) = prefill(&reference, &prompts, 0).unwrap();
                for step in 0..4 {
                    let d = max_diff(&l, &rl);
                    assert!(d < 1e-4, "{what}: {rows} row(s), step {step}: logits differ by {d}");
                    let next: Vec<Vec<u32>> = (0..rows).map(|r| vec![((step * 3 + r) % 64) as u32]).collect();
                    let before = steps_on_this_thread();
                    l = extend(&m, &mut c, &next, 0).unwrap();
                    assert_eq!(steps_on_this_thread(), before + 1, "{what}: the bf16 base did not take the fast decode step");
                    rl = extend(&reference, &mut rc, &next, 0).unwrap();
                }
            }

            // Merging (what the exports write) brings the base back to f32.
            let (merged, want) = (m.lora_merged().unwrap().unwrap(), reference.lora_merged().unwrap().unwrap());
            for (name, w) in want.tensors().unwrap() {
                assert_eq!(merged.params[&name].var.dtype(), candle_core::DType::F32, "{what} {name}");
                let d = max_diff(&merged.params[&name].var.as_tensor().clone(), &w);
                assert!(d < 1e-6, "{what} {name}: merged weight differs by {d}");
            }
        }
    }
    // Refused where it has no meaning.
    let mut full = tiny(Arch::Llama, 64, 1);
    let err = full.hold_frozen_in(candle_core::DType::BF16).unwrap_err().to_string();
    assert!(err.contains("no frozen weight"), "{err}");
}

#[test]
fn padding_does_not_change_scores() {
    for m in all_archs() {
        let alone = score(&m, &pairs()[..1], 0, false).unwrap().per_response().unwrap();
        let mut batch = pairs();
        batch.push((vec![3; 12], vec![4; 9]));
        let together = score(&m, &batch, 0, false).unwrap().per_response().unwrap();
        let also_pad = score(&m, &batch, 33, false).unwrap().per_response().unwrap();
        for (a, b) in alone[0].iter().zip(&together[0]) {
            assert!((a - b).abs() < 1e-5, "{:?}: padded batch changed a log-prob: {a} vs {b}", m.cfg.arch);
        }
        assert_eq!(together, also_pad, "the pad id changed a score");
        // Teacher-forced scores agree with the sampling path's KV-cached logits.
        let full = full_logits(&m, &[1, 2, 3, 4, 5, 6, 7]);
        let lp = full.log_sum_exp(candle_core::D::Minus1).unwrap();
        let want = (full.get(2).unwrap().get(4).unwrap() - lp.get(2).unwrap()).unwrap().to_scalar::<f32>().unwrap();
        assert!((alone[0][0] - want).abs() < 1e-5);
    }
}

#[test]
fn greedy_generation_is_batch_independent_and_seeded_sampling_reproducible() {
    let m = tiny(Arch::Qwen3, 64, 8);
    let prompts = vec![vec![1, 2, 3, 4, 5], vec![6, 7], vec![9, 10, 11]];
    let greedy = SamplingParams { max_new_tokens: 6, greedy: true, ..Default::default() };
    let batch = generate(&m, &prompts, &greedy, &[], 0, 0).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let one = generate(&m, &[p.clone()], &greedy, &[], 0, 0).unwrap();
        assert_eq!(one[0].tokens, batch[i].tokens, "row {i}");
        let s = score(&m, &[(p.clone(), one[0].tokens.clone())], 0, false).unwrap().per_response().unwrap();
        for (a, b) in s[0].iter().zip(&one[0].logprobs) {
            assert!((a - b).abs() < 1e-4, "sampling log-prob {b} vs teacher-forced {a}");
        }
    }
    let sp = SamplingParams { max_new_tokens: 8, temperature: 1.0, top_p: 0.9, top_k: 20, greedy: false };
    let a = generate(&m, &prompts, &sp, &[], 42, 0).unwrap();
    let b = generate(&m, &prompts, &sp, &[], 42, 0).unwrap();
    let c = generate(&m, &prompts, &sp, &[], 43, 0).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.iter().map(|g| g.tokens.clone()).collect::<Vec<_>>(), c.iter().map(|g| g.tokens.clone()).collect::<Vec<_>>());
    // Stop tokens end a row; the others go on.
    let stop = batch[0].tokens[2];
    let s = generate(&m, &prompts[..1], &greedy, &[stop], 0, 0).unwrap();
    assert_eq!(s[0].tokens, batch[0].tokens[..3].to_vec());
    assert!(s[0].stopped);
}

#[test]
fn value_head_outputs_scalars_and_trains() {
    for kind in [ValueHeadKind::Linear, ValueHeadKind::Mlp] {
        let m = tiny(Arch::Llama, 64, 3);
        let vh = ValueHead::new(kind, 32, 0, &Device::Cpu).unwrap();
        let mut cache = KvCache::new(2, m.cfg.num_layers);
        let h = m.forward(&[vec![1, 2, 3], vec![4, 5, 6]], &[vec![true; 3], vec![true; 3]], &mut cache, true).unwrap();
        let last = h.narrow(1, 2, 1).unwrap().squeeze(1).unwrap();
        let v = vh.forward(&last, true).unwrap();
        assert_eq!(v.dims(), &[2]);
        let target = Tensor::new(&[1.0f32, -1.0], &Device::Cpu).unwrap();
        let loss = (v - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        let store = loss.backward().unwrap();
        for (n, var) in vh.trainable().chain(m.trainable()) {
            assert!(store.get(var.as_tensor()).is_some(), "{kind:?}: no gradient for {n}");
        }
    }
}

#[test]
fn checkpoints_round_trip_full_and_lora_only() {
    let dir = tmpdir("ckpt");
    let m = tiny(Arch::Qwen3, 64, 21);
    checkpoint::save(&m, &dir.join("full"), false).unwrap();
    let mut back = tiny(Arch::Qwen3, 64, 99);
    checkpoint::load_into(&mut back, &dir.join("full")).unwrap();
    assert_eq!(max_diff(&full_logits(&m, &[1, 2, 3]), &full_logits(&back, &[1, 2, 3])), 0.0);

    let mut l = tiny(Arch::Llama, 64, 5);
    l.add_lora(LoraConfig { rank: 2, alpha: 4.0, targets: vec!["q_proj".into(), "down_proj".into()] }, 1).unwrap();
    // Move B away from zero so the adapters matter.
    for (n, p) in &l.params {
        if n.contains("lora_B") {
            p.var.set(&Tensor::ones(p.var.dims(), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
        }
    }
    checkpoint::save(&l, &dir.join("lora"), true).unwrap();
    let saved = loader::read_safetensors(&dir.join("lora/model.safetensors")).unwrap();
    assert!(saved.keys().all(|k| k.contains("lora_")));
    let mut back = tiny(Arch::Llama, 64, 5);
    checkpoint::load_into(&mut back, &dir.join("lora")).unwrap();
    assert_eq!(max_diff(&full_logits(&l, &[1, 2, 3]), &full_logits(&back, &[1, 2, 3])), 0.0);
    // A checkpoint of another shape is refused with the reason.
    let mut other = tiny(Arch::Qwen2, 64, 5);
    let err = checkpoint::load_into(&mut other, &dir.join("full")).unwrap_err();
    assert!(format!("{err:#}").contains("different model config"), "{err:#}");
}

#[test]
fn hf_export_loads_back_with_identical_logits() {
    let dir = tmpdir("hf");
    let tok = Tokenizer::byte_level(&SPECIALS).unwrap();
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        let mut m = tiny(arch, 260, 7);
        m.add_lora(LoraConfig { rank: 2, alpha: 4.0, targets: vec!["v_proj".into()] }, 3).unwrap();
        for (n, p) in &m.params {
            if n.contains("lora_B") {
                p.var.set(&(Tensor::ones(p.var.dims(), candle_core::DType::F32, &Device::Cpu).unwrap() * 0.1).unwrap()).unwrap();
            }
        }
        let out = dir.join(format!("{arch:?}"));
        checkpoint::export_hf(&m, &tok, &out).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            assert!(out.join(f).exists(), "{f} missing");
        }
        let back = loader::load(out.to_str().unwrap()).unwrap();
        assert!(back.model.lora.is_none());
        let seq = back.tokenizer.encode("hello team", false).unwrap();
        let d = max_diff(&full_logits(&m, &seq), &full_logits(&back.model, &seq));
        assert!(d < 1e-5, "{arch:?}: exported logits differ by {d}");
        assert_eq!(back.tokenizer.decode(&seq, false).unwrap(), "hello team");
    }
}

/// llama.cpp's Q/K row permutation (the inverse of what the loader undoes).
#[test]
fn gguf_loading_undoes_the_qk_permutation_and_dequantizes() {
    let dir = tmpdir("gguf");
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        let m = tiny(arch, 264, 13);
        let seq = [5u32, 100, 7, 200, 9, 42];
        for (dt, tol) in
            [(GgmlDType::F32, 1e-5), (GgmlDType::F16, 1e-2), (GgmlDType::Q8_0, 5e-2), (GgmlDType::Q4_0, 0.3), (GgmlDType::Q4_1, 0.3)]
        {
            let path = dir.join(format!("{arch:?}-{dt:?}.gguf"));
            write_gguf(&m, &path, dt, None);
            let back = loader::load(path.to_str().unwrap()).unwrap();
            assert_eq!(back.model.cfg, m.cfg, "{arch:?} {dt:?}: config");
            let d = max_diff(&full_logits(&m, &seq), &full_logits(&back.model, &seq));
            assert!(d < tol, "{arch:?} {dt:?}: logits differ by {d}");
        }
        let back = loader::load(dir.join(format!("{arch:?}-F32.gguf")).to_str().unwrap()).unwrap();
        assert_eq!(back.tokenizer.stop_ids, vec![0, 2]);
        let msgs = [Message { role: "user".into(), content: "hi".into() }];
        assert_eq!(back.tokenizer.apply_chat_template(&msgs, true).unwrap(), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        let ids = back.tokenizer.encode("<|im_start|>hi he", false).unwrap();
        assert_eq!(ids[0], 1, "special tokens are recognised in text");
        assert_eq!(*ids.last().unwrap(), 260, "the GGUF merges are applied");
    }
}

#[test]
fn gguf_k_quants_and_bf16_dequantize() {
    // k-quant blocks hold 256 values, so every matrix row here is 256 wide.
    let dir = tmpdir("gguf-k");
    let mut cfg = ModelConfig::tiny(Arch::Llama, 264);
    (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) = (256, 256, 4, 2, 64);
    let m = Transformer::random(cfg, 21).unwrap();
    let seq = [5u32, 100, 7, 200, 9, 42];
    let want = full_logits(&m, &seq);
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    for (dt, rel) in [(GgmlDType::BF16, 0.01), (GgmlDType::Q6K, 0.06), (GgmlDType::Q4K, 0.3)] {
        let path = dir.join(format!("{dt:?}.gguf"));
        write_gguf(&m, &path, dt, None);
        let back = loader::load(path.to_str().unwrap()).unwrap();
        let d = max_diff(&want, &full_logits(&back.model, &seq));
        assert!(d < rel * scale, "{dt:?}: logits differ by {d} (largest logit {scale})");
        assert!(d > 0.0 || dt == GgmlDType::BF16, "{dt:?}: the weights were quantized");
    }
}

#[test]
fn malformed_inputs_give_clear_errors() {
    let dir = tmpdir("bad");
    let m = tiny(Arch::Llama, 264, 1);
    let good = dir.join("good.gguf");
    write_gguf(&m, &good, GgmlDType::F32, None);
    // Truncated GGUF.
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = format!("{:#}", loader::load(cut.to_str().unwrap()).err().unwrap());
    assert!(e.contains("cut.gguf") && (e.contains("truncated") || e.contains("not a readable GGUF")), "{e}");
    std::fs::write(&cut, &bytes[..100]).unwrap();
    let e = format!("{:#}", loader::load(cut.to_str().unwrap()).err().unwrap());
    assert!(e.contains("cut.gguf"), "{e}");
    // Missing tensor.
    let missing = dir.join("missing.gguf");
    write_gguf(&m, &missing, GgmlDType::F32, Some("model.layers.1.mlp.up_proj.weight"));
    let e = format!("{:#}", loader::load(missing.to_str().unwrap()).err().unwrap());
    assert!(e.contains("missing tensor 'model.layers.1.mlp.up_proj.weight'"), "{e}");
    // Wrong shape in a Hugging Face directory.
    let tok = Tokenizer::byte_level(&SPECIALS).unwrap();
    let hf = dir.join("hf");
    checkpoint::export_hf(&m, &tok, &hf).unwrap();
    let mut ts = loader::read_safetensors(&hf.join("model.safetensors")).unwrap();
    ts.insert("model.norm.weight".into(), Tensor::ones(7, candle_core::DType::F32, &Device::Cpu).unwrap());
    loader::write_safetensors(&ts, &hf.join("model.safetensors")).unwrap();
    let e = format!("{:#}", loader::load(hf.to_str().unwrap()).err().unwrap());
    assert!(e.contains("'model.norm.weight' has shape [7], expected [32]"), "{e}");
    // Unknown architecture and broken config.json.
    let cfg_path = hf.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = format!("{:#}", loader::load(hf.to_str().unwrap()).err().unwrap());
    assert!(e.contains("GPTNeoXForCausalLM"), "{e}");
    std::fs::write(&cfg_path, "{ not json").unwrap();
    let e = format!("{:#}", loader::load(hf.to_str().unwrap()).err().unwrap());
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");
    // Sizes that used to panic (a zero head count), abort on allocation (4e9 layers) or fail with
    // a bare shape mismatch (7 heads for 32 hidden) name the field.
    let hf2 = dir.join("hf2");
    checkpoint::export_hf(&m, &tok, &hf2).unwrap();
    let ok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf2.join("config.json")).unwrap()).unwrap();
    for (key, value, want) in [
        ("num_attention_heads", serde_json::json!(0), "'num_attention_heads' = 0 does not divide"),
        ("num_attention_heads", serde_json::json!(7), "'num_attention_heads' = 7 does not divide 'hidden_size' = 32"),
        ("num_hidden_layers", serde_json::json!(4_000_000_000u64), "layers = 4000000000: must be between 1 and 1024"),
    ] {
        let mut c = ok.clone();
        c[key] = value;
        c.as_object_mut().unwrap().remove("head_dim");
        std::fs::write(hf2.join("config.json"), c.to_string()).unwrap();
        let e = format!("{:#}", loader::load(hf2.to_str().unwrap()).err().unwrap());
        assert!(e.contains("config.json") && e.contains(want), "{key}: {e}");
    }
    for (key, v, want) in [
        ("attention.head_count", 0, "attention heads = 0"),
        ("attention.head_count_kv", 0, "0 key/value heads"),
        ("block_count", u32::MAX, "layers = 4294967295"),
    ] {
        let p = dir.join(format!("bad-{key}.gguf"));
        write_gguf_with(&m, &p, GgmlDType::F32, None, &[(key, v)]);
        let e = format!("{:#}", loader::load(p.to_str().unwrap()).err().unwrap());
        assert!(e.contains(&format!("bad-{key}.gguf")) && e.contains(want), "{key}: {e}");
    }
    // A damaged tensor offset or dimension used to load and generate garbage: it is refused,
    // naming the tensor.
    let offset_of = |bytes: &[u8], name: &str| -> (usize, usize) {
        // name, then n_dims (u32), the dims (u64 each), the type (u32) and the offset (u64).
        let at = bytes.windows(name.len()).position(|w| w == name.as_bytes()).unwrap() + name.len();
        let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        (at + 4, at + 4 + 8 * n_dims + 4)
    };
    let (dims_at, off_at) = offset_of(&bytes, "blk.0.ffn_up.weight");
    let mut moved = bytes.clone();
    moved[off_at..off_at + 8].copy_from_slice(&0u64.to_le_bytes());
    let p = dir.join("bad-offset.gguf");
    std::fs::write(&p, &moved).unwrap();
    let e = format!("{:#}", loader::load(p.to_str().unwrap()).err().unwrap());
    assert!(e.contains("bad-offset.gguf") && e.contains("overlaps"), "{e}");
    let mut grown = bytes.clone();
    grown[dims_at..dims_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let p = dir.join("bad-dim.gguf");
    std::fs::write(&p, &grown).unwrap();
    let e = format!("{:#}", loader::load(p.to_str().unwrap()).err().unwrap());
    assert!(e.contains("bad-dim.gguf") && e.contains("blk.0.ffn_up.weight") && e.contains("runs past the end"), "{e}");
    // Sequences past the context are refused instead of running silently.
    let mut short = ModelConfig::tiny(Arch::Llama, 264);
    short.max_position_embeddings = 8;
    let sm = Transformer::random(short, 1).unwrap();
    let mut cache = KvCache::new(1, sm.cfg.num_layers);
    sm.forward(&[vec![1; 8]], &[vec![true; 8]], &mut cache, false).unwrap();
    let e = sm.forward(&[vec![1]], &[vec![true]], &mut cache, false).unwrap_err();
    assert!(e.to_string().contains("9 tokens is longer than the model's context of 8"), "{e}");
    // A model too big for this machine's memory is an error, not an abort.
    let mut huge = ModelConfig::tiny(Arch::Llama, 264);
    (huge.hidden_size, huge.num_layers, huge.intermediate_size, huge.head_dim) = (65_536, 1024, 1 << 20, 64);
    let e = format!("{:#}", Transformer::random(huge, 1).err().unwrap());
    assert!(e.contains("GiB of memory is available"), "{e}");
    // A chat template that loops for ever runs out of fuel.
    let mut t = Tokenizer::byte_level(&SPECIALS).unwrap();
    t.chat_template = Some("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}".into());
    let e = format!("{:#}", t.apply_chat_template(&[], true).unwrap_err());
    assert!(e.contains("chat template failed to render") && e.contains("fuel"), "{e}");
    // A path that does not exist.
    let e = format!("{:#}", loader::load("/nonexistent/model.gguf").err().unwrap());
    assert!(e.contains("not found"), "{e}");
    // Out-of-vocabulary token ids are refused, not a panic.
    let mut cache = KvCache::new(1, m.cfg.num_layers);
    let e = m.forward(&[vec![5000]], &[vec![true]], &mut cache, false).unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
}

/// The fused, block-wise attention equals the plain composition (scores, masked softmax,
/// weighted sum) in its output and in the gradients of q, k and v, across several query blocks,
/// grouped heads, a cached prefix and padding.
#[test]
fn fused_attention_matches_the_unfused_ops_with_gradients() {
    use candle_core::Var;
    use collm_model::ops::{attention, attention_unfused, AttnMask};
    let dev = Device::Cpu;
    let (b, groups, n_rep, q_len, past, hd) = (2, 2, 3, 150, 7, 16);
    let k_len = past + q_len;
    // Row 1 has padding at its start (keys 0..4 invalid) and in the middle.
    let valid: Vec<Vec<bool>> = (0..b).map(|r| (0..k_len).map(|j| r == 0 || !(j < 4 || (60..63).contains(&j))).collect()).collect();
    let mask = AttnMask::causal(&valid, past, q_len);
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, groups, n_rep * q_len, hd), &dev).unwrap()).unwrap();
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, groups, k_len, hd), &dev).unwrap()).unwrap();
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, groups, k_len, hd), &dev).unwrap()).unwrap();
    let w = Tensor::randn(0f32, 1.0, (b, groups, n_rep * q_len, hd), &dev).unwrap();
    let scale = 0.25;
    let fused = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, scale).unwrap();
    let plain = attention_unfused(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, scale).unwrap();
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(diff(&fused, &plain) < 1e-5, "outputs differ by {}", diff(&fused, &plain));
    let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gp = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
        let (a, c) = (gf.get(x.as_tensor()).unwrap(), gp.get(x.as_tensor()).unwrap());
        let scale = c.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(scale > 1e-3, "d{name} is zero");
        assert!(diff(a, c) < 1e-4 * scale.max(1.0), "d{name} differs by {} (scale {scale})", diff(a, c));
    }
}

/// Log-probs, hidden states, the tokens shared and every trainable weight's gradient of one
/// `score_spans` pass whose loss weighs each span token and hidden value differently.
fn span_pass(
    m: &Transformer,
    seqs: &[Vec<u32>],
    spans: &[Vec<(usize, usize)>],
    positions: &[Vec<usize>],
) -> (Tensor, Tensor, usize, Vec<(String, Option<Tensor>)>) {
    let out = score_spans(m, seqs, spans, positions, 0, true).unwrap();
    let hidden = out.hidden.clone().unwrap();
    let n = out.token_logprobs.dims1().unwrap();
    let w = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap().affine(0.1, -1.0).unwrap();
    let hw = Tensor::arange(0f32, hidden.elem_count() as f32, &Device::Cpu).unwrap().sin().unwrap().reshape(hidden.dims()).unwrap();
    let store =
        ((&out.token_logprobs * w).unwrap().sum_all().unwrap() + (&hidden * hw).unwrap().sum_all().unwrap()).unwrap().backward().unwrap();
    let grads = m.trainable().map(|(k, v)| (k.clone(), store.get(v.as_tensor()).cloned())).collect();
    (out.token_logprobs, hidden, out.shared_tokens, grads)
}

#[test]
fn shared_prefixes_give_the_unshared_log_probs_hidden_states_and_gradients() {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(11);
    let mut draw = |n: usize| -> Vec<u32> { (0..n).map(|_| rand::Rng::random_range(&mut rng, 1..64u32)).collect() };
    // MAGRPO's shapes: K samples of a node share its history. Node A (K = 4), node B (K = 3,
    // sharing B's first tokens with A), a singleton, and a two-turn chain whose first turn is
    // A's history (scored spans and a value position in each turn). One long case takes the
    // fused attention on the shared prefix.
    let hist_a = draw(23);
    let mut hist_b = hist_a[..4].to_vec();
    hist_b.extend(draw(15));
    let mut cases = vec![];
    let mut seqs = vec![];
    let mut spans = vec![];
    let mut positions = vec![];
    for (hist, k) in [(&hist_a, 4), (&hist_b, 3)] {
        for j in 0..k {
            let resp = draw(3 + 2 * j);
            let n = hist.len();
            seqs.push(hist.iter().cloned().chain(resp.iter().cloned()).collect::<Vec<_>>());
            spans.push(vec![(n, n + resp.len())]);
            positions.push(vec![n - 1, n + resp.len() - 1]);
        }
    }
    seqs.push(draw(17));
    spans.push(vec![(5, 17)]);
    positions.push(vec![16]);
    let mut chain = hist_a.clone();
    chain.extend(draw(6));
    let turn2 = chain.len();
    chain.extend(draw(9));
    seqs.push(chain.clone());
    spans.push(vec![(hist_a.len(), hist_a.len() + 6), (turn2 + 3, chain.len())]);
    positions.push(vec![hist_a.len() - 1, turn2 + 2]);
    cases.push((seqs, spans, positions));
    let long = draw(300);
    let mut seqs = vec![];
    for j in 0..3 {
        seqs.push(long.iter().cloned().chain(draw(20 + j)).collect::<Vec<_>>());
    }
    let spans = seqs.iter().map(|s| vec![(300, s.len())]).collect::<Vec<_>>();
    let positions = vec![vec![299]; 3];
    cases.push((seqs, spans, positions));
    // A critic's shapes: no scored spans, one value position per sequence, sequences sharing only
    // a short template.
    let template = draw(12);
    let seqs: Vec<Vec<u32>> = (0..4).map(|j| template.iter().cloned().chain(draw(14 + j)).collect()).collect();
    let positions = seqs.iter().map(|s| vec![s.len() - 1]).collect::<Vec<_>>();
    cases.push((seqs, vec![vec![]; 4], positions));

    for mut m in all_archs().into_iter().take(3) {
        for lora in [false, true] {
            if lora {
                m.add_lora(LoraConfig { rank: 2, alpha: 4.0, targets: vec!["q_proj".into(), "v_proj".into()] }, 5).unwrap();
                for (n, p) in &m.params {
                    if n.contains("lora_B") {
                        p.var.set(&Tensor::randn(0f32, 0.05, p.var.dims(), &Device::Cpu).unwrap()).unwrap();
                    }
                }
            }
            for (c, (seqs, spans, positions)) in cases.iter().enumerate() {
                let what = format!("{:?} lora {lora} case {c}", m.cfg.arch);
                let (lp, h, shared, g) = span_pass(&m, seqs, spans, positions);
                let (lp0, h0, none, g0) = score::without_prefix_sharing(|| span_pass(&m, seqs, spans, positions));
                assert_eq!(none, 0);
                // The history of A (22 tokens before its first scored position) runs once instead
                // of 5 times, B's 18 once instead of 3 times; the long prefix once instead of 3.
                assert_eq!(shared, [4 * 22 + 2 * 18, 2 * 299, 3 * 12][c], "{what}");
                assert_eq!(lp.dims(), lp0.dims(), "{what}");
                assert!(lp.elem_count() == 0 || max_diff(&lp, &lp0) <= 1e-4, "{what}: log-probs differ");
                assert!(max_diff(&h, &h0) <= 1e-4, "{what}: hidden states differ by {}", max_diff(&h, &h0));
                for ((name, a), (_, b)) in g.iter().zip(&g0) {
                    // Without scored spans the output head gets no gradient, shared or not.
                    let (Some(a), Some(b)) = (a, b) else {
                        assert!(
                            a.is_none() && b.is_none() && c == 2 && name.contains("lm_head"),
                            "{what}: {name} has a gradient in one pass only"
                        );
                        continue;
                    };
                    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                    assert!(scale > 0.0, "{what}: {name}'s gradient is zero");
                    assert!(max_diff(a, b) <= 1e-4 * scale.max(1.0), "{what}: {name}'s gradient differs by {}", max_diff(a, b));
                }
            }
        }
    }
}

/// The FLOP count of a pass (collm_model::flops) and the weight bytes it reads, hand-worked for the tiny Llama (hidden 32,
/// intermediate 64, 2 layers, 4 heads of 8 over 2 key-value heads: 9216 projection weights per
/// layer). Two rows of 3 slots, the second ending in padding: 5 real tokens, which see 6 + 3 = 9
/// keys in all.
#[test]
fn a_pass_counts_its_flops_over_real_tokens_and_its_weight_reads() {
    let mut m = tiny(Arch::Llama, 64, 1);
    let tokens = vec![vec![5, 9, 17], vec![7, 1, 0]];
    let valid = vec![vec![true; 3], vec![true, true, false]];
    let h = m.forward(&tokens, &valid, &mut KvCache::new(2, 2), false).unwrap();
    // 2 FLOPs per weight per token, and 4·heads·head_dim per key seen, in each of 2 layers.
    let layers = 2 * (2 * 9216 * 5 + 4 * 4 * 8 * 9);
    assert_eq!(m.flops.total(), layers);
    // The pass read each layer's weights once, whatever the rows: 9216 projection weights and two
    // norms of 32 per layer, in f32.
    let layer_bytes = 2 * (9216 + 2 * 32) * 4;
    assert_eq!(m.weight_reads.total(), layer_bytes);
    m.logits(&h.flatten_to(1).unwrap(), false).unwrap();
    assert_eq!(m.flops.total(), layers + 2 * 64 * 32 * 6, "the tied output head over 6 rows");
    assert_eq!(m.weight_reads.total(), layer_bytes + 64 * 32 * 4, "the tied output head, read once for its 6 rows");
    // Both were passes of 6 rows, which stream the weights: small passes.
    assert_eq!((m.small_passes.flops.total(), m.small_passes.weight_reads.total()), (m.flops.total(), m.weight_reads.total()));
    // A pass over 17 rows (more than SMALL_ROWS = 16) is bound by its arithmetic: not a small one.
    let (f0, b0) = (m.flops.total(), m.weight_reads.total());
    let long = m.forward(&[(0..17).collect()], &[vec![true; 17]], &mut KvCache::new(1, 2), false).unwrap();
    m.logits(&long.flatten_to(1).unwrap(), false).unwrap();
    assert!(m.flops.total() > f0 && m.weight_reads.total() > b0);
    assert_eq!((m.small_passes.flops.total(), m.small_passes.weight_reads.total()), (f0, b0));
    // A training pass with LoRA (rank 2) on q_proj: the frozen weights cost 2 + 2 per token, the
    // adapters (128 weights per layer) 2 + 4, attention three times its forward.
    m.add_lora(LoraConfig { rank: 2, alpha: 4.0, targets: vec!["q_proj".into()] }, 0).unwrap();
    let (before, reads) = (m.flops.total(), m.weight_reads.total());
    m.forward(&tokens, &valid, &mut KvCache::new(2, 2), true).unwrap();
    assert_eq!(m.flops.total() - before, 2 * (9216 * 4 + 128 * 6) * 5 + 3 * 2 * (4 * 4 * 8 * 9));
    // A training pass is bound by its arithmetic: it adds no weight reads to the count.
    assert_eq!(m.weight_reads.total(), reads);
    // A copy counts on its own.
    assert_eq!(m.deep_clone().unwrap().flops.total(), 0);
    assert_eq!(m.deep_clone().unwrap().weight_reads.total(), 0);
}

/// Building a model tells candle's worker pool not to spin between ops (its threads would share a
/// core with the GEMMs' threads).
#[test]
fn building_a_model_keeps_candles_pool_from_spinning() {
    let _m = tiny(Arch::Llama, 64, 3);
    let v = std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT").expect("the spin limit is set once a model is built");
    assert_eq!(v, collm_model::model::BARRIER_POOL_SPIN_LIMIT.to_string(), "(run the tests without CANDLE_BARRIER_POOL_SPIN_LIMIT set)");
}

#[cfg(target_os = "linux")]
#[test]
fn a_models_weights_lie_on_huge_pages_where_the_kernel_allows() {
    use candle_core::{CpuStorage, Storage};
    // An 8 MiB embedding (65,536 × 32 in f32): whole 2 MiB pages lie inside it wherever it starts.
    let m = Transformer::random(ModelConfig::tiny(Arch::Llama, 1 << 16), 3).unwrap();
    let copy = m.deep_clone().unwrap();
    for (which, model) in [("built", &m), ("deep copy", &copy)] {
        let (s, _) = model.params["model.embed_tokens.weight"].var.as_tensor().storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(v)) = &*s else { panic!("an f32 host weight expected") };
        let huge = collm_model::hugepages::huge_bytes_in(v.as_ptr() as usize, v.len() * 4).unwrap();
        if collm_model::hugepages::can_collapse() {
            assert!(huge >= 6 << 20, "{which}: {huge} bytes of the 8 MiB embedding on huge pages");
        } else {
            eprintln!("this kernel cannot move memory onto huge pages (THP off or Linux before 6.1)");
        }
    }
    assert_eq!(max_diff(&full_logits(&m, &[1, 2, 3]), &full_logits(&copy, &[1, 2, 3])), 0.0);
}
