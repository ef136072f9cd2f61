//! collm's CUDA kernels (src/cuda/kernels.cu), run on the CPU: the kernels' own source compiled
//! with g++ under a CUDA emulation (src/cuda/emu: a fiber per CUDA thread, barriers, warp
//! shuffles) and launched as src/cuda/ops.rs launches them, against collm's fused CPU ops:
//! forward and every gradient, f32 and bf16. This checks the kernels' arithmetic, masks and
//! indexing on a machine without a GPU; `collm bench gpu` checks them again on a real one.

use candle_core::{DType, Device, Tensor, Var};
use collm_model::ops::{self, AttnMask, RopeTable};
use rand::{rngs::StdRng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The emulated kernels, built once per test run.
fn driver() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cuda/emu/driver.cpp");
        let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join("collm-kernels-emu");
        let out = Command::new("g++")
            .args(["-O2", "-std=c++20", "-Wall", "-Wno-unknown-pragmas", "-o"])
            .arg(&bin)
            .arg(&src)
            .output()
            .expect("g++ is needed to run collm's CUDA kernels on the CPU (Debian: apt install g++)");
        assert!(out.status.success(), "g++ failed on {}:\n{}", src.display(), String::from_utf8_lossy(&out.stderr));
        bin
    })
}

struct Run {
    dir: PathBuf,
}

impl Run {
    fn new(name: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kernels-emu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    fn put(&self, name: &str, t: &Tensor) {
        let v: Vec<f32> = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        std::fs::write(self.dir.join(name), v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    }

    fn put_bytes(&self, name: &str, b: &[u8]) {
        std::fs::write(self.dir.join(name), b).unwrap();
    }

    fn exec(&self, args: &[String]) {
        let out = Command::new(driver()).arg(&self.dir).args(args).output().unwrap();
        assert!(out.status.success(), "emulated kernels {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn get(&self, name: &str, shape: &[usize]) -> Tensor {
        let b = std::fs::read(self.dir.join(name)).unwrap();
        let v: Vec<f32> = b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| collm_model::model::normal(&mut rng)).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
}

/// `t` rounded to bf16 (what a bf16 kernel reads), back in f32.
fn bf16_round(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()
}

/// max |a − b| relative to max |a| (at least 1).
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let m = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    m(&(a - b).unwrap()) / m(a).max(1.0)
}

fn tol(dtype: &str) -> f32 {
    if dtype == "bf16" {
        1e-2
    } else {
        1e-4
    }
}

/// Inputs in the kernel's precision: rounded to bf16 for a bf16 run, so that the reference sees
/// what the kernel reads.
fn input(shape: &[usize], seed: u64, dtype: &str) -> Tensor {
    let t = seeded(shape, seed);
    if dtype == "bf16" {
        bf16_round(&t)
    } else {
        t
    }
}

#[test]
fn rms_norm_kernel_matches_the_fused_cpu_op() {
    for dtype in ["f32", "bf16"] {
        let (rows, d) = (70, 576);
        let (x, w, g) = (input(&[rows, d], 1, dtype), input(&[d], 2, dtype), input(&[rows, d], 3, dtype));
        let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let y = ops::rms_norm(xv.as_tensor(), wv.as_tensor(), 1e-5).unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let r = Run::new(&format!("rms-{dtype}"));
        r.put("x", &x);
        r.put("w", &w);
        r.put("g", &g);
        r.exec(&["rms".into(), dtype.into(), rows.to_string(), d.to_string(), "1e-5".into()]);
        let t = tol(dtype);
        let e = rel(&y, &r.get("y", &[rows, d]));
        assert!(e <= t, "{dtype} y: {e}");
        let e = rel(grads.get(xv.as_tensor()).unwrap(), &r.get("dx", &[rows, d]));
        assert!(e <= t, "{dtype} dx: {e}");
        let e = rel(grads.get(wv.as_tensor()).unwrap(), &r.get("dw", &[d]));
        assert!(e <= t, "{dtype} dw: {e}");
    }
}

#[test]
fn rope_kernel_matches_the_fused_cpu_op() {
    for dtype in ["f32", "bf16"] {
        let (b, t, h, hd) = (2, 9, 3, 64);
        let positions: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7) % 23).collect();
        let table = RopeTable::new(&positions, hd, 10000.0);
        let (x, g) = (input(&[b, t, h, hd], 4, dtype), input(&[b, t, h, hd], 5, dtype));
        let xv = Var::from_tensor(&x).unwrap();
        let y = ops::rope(xv.as_tensor(), &table).unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let r = Run::new(&format!("rope-{dtype}"));
        r.put("x", &x);
        r.put("g", &g);
        r.put("cos", &Tensor::from_slice(&table.cos[..], table.cos.len(), &Device::Cpu).unwrap());
        r.put("sin", &Tensor::from_slice(&table.sin[..], table.sin.len(), &Device::Cpu).unwrap());
        r.exec(&["rope".into(), dtype.into(), (b * t).to_string(), h.to_string(), (hd / 2).to_string()]);
        let e = rel(&y, &r.get("y", &[b, t, h, hd]));
        assert!(e <= tol(dtype), "{dtype} y: {e}");
        let e = rel(grads.get(xv.as_tensor()).unwrap(), &r.get("dx", &[b, t, h, hd]));
        assert!(e <= tol(dtype), "{dtype} dx: {e}");
    }
}

#[test]
fn token_logprobs_kernel_matches_the_fused_cpu_op() {
    let (n, vocab) = (7, 3001);
    let x = (seeded(&[n, vocab], 6) * 4.0).unwrap();
    let targets: Vec<u32> = vec![0, 3000, 17, 17, 1500, 2, 999];
    // A zero row gradient (a masked token) takes the kernel's early exit.
    let g = Tensor::from_vec(vec![1.0f32, -0.5, 0.0, 2.0, 0.25, 1.0, -1.0], n, &Device::Cpu).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let y = ops::token_logprobs(xv.as_tensor(), &targets).unwrap();
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let r = Run::new("lp");
    r.put("x", &x);
    r.put("g", &g);
    r.put_bytes("t", &targets.iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<u8>>());
    r.exec(&["lp".into(), n.to_string(), vocab.to_string()]);
    let e = rel(&y, &r.get("y", &[n]));
    assert!(e <= 1e-4, "y: {e}");
    let e = rel(grads.get(xv.as_tensor()).unwrap(), &r.get("dx", &[n, vocab]));
    assert!(e <= 1e-4, "dx: {e}");
}

/// Attention with grouped-query heads, padding, a cached past and a decode step, head_dim 64 and
/// 128: the output and dq, dk, dv against the fused CPU attention.
#[test]
fn attention_kernels_match_the_fused_cpu_op() {
    // (batch, groups, n_rep, q_len, past, hd, padded keys in batch row 1: at the start if
    // positive, at the end if negative, dtype)
    let cases = [
        (2, 2, 2, 48, 8, 64, 5, "f32"),
        (2, 1, 1, 70, 10, 128, 7, "f32"),
        (2, 2, 3, 1, 39, 64, 3, "f32"),
        (1, 1, 2, 33, 0, 32, 0, "f32"),
        (2, 1, 2, 40, 0, 64, -6, "f32"),
        (2, 2, 2, 48, 8, 64, 5, "bf16"),
    ];
    for (i, &(b, g, n_rep, q_len, past, hd, pad, dtype)) in cases.iter().enumerate() {
        let kl = past + q_len;
        let real = |j: usize| if pad >= 0 { j >= pad as usize } else { j + ((-pad) as usize) < kl };
        let valid: Vec<Vec<bool>> = (0..b).map(|r| (0..kl).map(|j| r == 0 || real(j)).collect()).collect();
        let mask = AttnMask::causal(&valid, past, q_len);
        let scale = 1.0 / (hd as f32).sqrt();
        let rows = n_rep * q_len;
        let seed = 10 * i as u64;
        let (q, k, v) =
            (input(&[b, g, rows, hd], seed, dtype), input(&[b, g, kl, hd], seed + 1, dtype), input(&[b, g, kl, hd], seed + 2, dtype));
        let go = input(&[b, g, rows, hd], seed + 3, dtype);
        let (qv, kv, vv) = (Var::from_tensor(&q).unwrap(), Var::from_tensor(&k).unwrap(), Var::from_tensor(&v).unwrap());
        let o = ops::attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), &mask, scale).unwrap();
        let grads = (&o * &go).unwrap().sum_all().unwrap().backward().unwrap();
        let r = Run::new(&format!("attn-{i}"));
        for (name, t) in [("q", &q), ("k", &k), ("v", &v), ("go", &go)] {
            r.put(name, t);
        }
        r.put_bytes("valid", &mask.key_validity());
        let args = [b, g, rows, q_len, kl, hd].map(|x| x.to_string());
        r.exec(&[&["attn".to_string(), dtype.to_string()][..], &args[..], &[scale.to_string()]].concat());
        let t = tol(dtype);
        let case = format!("case {i} {:?}", cases[i]);
        let e = rel(&o, &r.get("o", &[b, g, rows, hd]));
        assert!(e <= t, "{case} o: {e}");
        for (name, var, shape) in [("dq", &qv, [b, g, rows, hd]), ("dk", &kv, [b, g, kl, hd]), ("dv", &vv, [b, g, kl, hd])] {
            let e = rel(grads.get(var.as_tensor()).unwrap(), &r.get(name, &shape));
            assert!(e <= t, "{case} {name}: {e}");
        }
    }
}

/// The mask the attention kernel reads (key validity per batch row) describes the same mask as
/// the dense one: rebuilt from it, every entry agrees.
#[test]
fn key_validity_rebuilds_the_dense_mask() {
    // Row 0's last slot (29) is padding: the validity marks it real (only the last position, its
    // own, ever sees it), and the rebuilt mask must still agree.
    let valid: Vec<Vec<bool>> = vec![(0..30).map(|j| j % 7 != 1).collect(), (0..30).map(|j| j >= 4).collect()];
    for (past, q_len) in [(0, 30), (10, 20), (29, 1)] {
        let mask = AttnMask::causal(&valid, past, q_len);
        let kv = mask.key_validity();
        assert_eq!(kv.len(), 2 * 30);
        for b in 0..2 {
            for i in 0..q_len {
                let last = past + i;
                for j in 0..30 {
                    let sees = j <= last && (kv[b * 30 + j] == 1 || j == last);
                    assert_eq!(sees, mask.data[(b * q_len + i) * 30 + j] == 0.0, "past {past} row {b} query {i} key {j}");
                }
            }
        }
    }
}

/// Two AdamW steps: the second by the kernels from the first's state, against collm's CPU AdamW.
#[test]
fn adamw_kernels_match_the_cpu_optimizer() {
    let n = 1000;
    let cfg = collm_model::AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() };
    let p = Var::from_tensor(&seeded(&[n], 20)).unwrap();
    let name = "w".to_string();
    let mut opt = collm_model::AdamW::new(cfg.clone());
    let mut state = vec![];
    for s in 0..2u64 {
        state.push((p.as_tensor().copy().unwrap(), opt.state_tensors().unwrap()));
        let mut grads = collm_model::Grads::new();
        grads.map.insert(name.clone(), seeded(&[n], 30 + s));
        grads.scale = 0.5;
        opt.step([(&name, &p)], &grads).unwrap();
    }
    let (p1, st1) = &state[1];
    let r = Run::new("adamw");
    r.put("p", p1);
    r.put("g", &seeded(&[n], 31));
    r.put("m", &st1["w.exp_avg"]);
    r.put("v", &st1["w.exp_avg_sq"]);
    let (bc1, bc2) = (1.0 - cfg.beta1.powi(2), 1.0 - cfg.beta2.powi(2));
    let decay = 1.0 - cfg.lr * cfg.weight_decay;
    let args = [cfg.lr, decay, cfg.beta1, cfg.beta2, cfg.eps, bc1, bc2, 0.5].map(|x| format!("{x:e}"));
    r.exec(&[&["adamw".to_string(), n.to_string()][..], &args[..]].concat());
    let st2 = opt.state_tensors().unwrap();
    assert!(rel(p.as_tensor(), &r.get("p", &[n])) <= 1e-6, "p");
    assert!(rel(&st2["w.exp_avg"], &r.get("m", &[n])) <= 1e-6, "m");
    assert!(rel(&st2["w.exp_avg_sq"], &r.get("v", &[n])) <= 1e-6, "v");
    // The step moved the parameter: the comparison is not of two unchanged copies.
    assert!(rel(p1, p.as_tensor()) > 1e-4);
}
