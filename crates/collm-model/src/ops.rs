//! Fused CPU ops that candle lacks a backward for: attention softmax, RMSNorm, RoPE, token
//! log-probabilities (log-softmax + gather) and a linear layer whose weight is frozen.
//!
//! Each op has two paths. The fused path (CPU, f32) is a single-pass kernel with an explicit
//! backward, so the same model code serves sampling (detached weights, no graph) and training
//! (gradients reach every trainable weight). The generic path composes candle's differentiable
//! ops and runs on any device and dtype; it is the reference the fused kernels are tested
//! against ([`with_generic_ops`] forces it on the CPU).

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;
use std::cell::Cell;
use std::sync::Arc;

thread_local! {
    static GENERIC: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every op on this thread taking its generic path (candle's differentiable ops),
/// as on a device without collm kernels: the reference the fused CPU kernels are checked against.
pub fn with_generic_ops<R>(f: impl FnOnce() -> R) -> R {
    with_switch(&GENERIC, true, f)
}

/// Runs `f` with the thread-local switch `key` set to `on`, restoring its value afterwards (also
/// when `f` panics).
pub(crate) fn with_switch<R>(key: &'static std::thread::LocalKey<Cell<bool>>, on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(&'static std::thread::LocalKey<Cell<bool>>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.with(|s| s.set(self.1));
        }
    }
    let _restore = Restore(key, key.with(|s| s.replace(on)));
    f()
}

/// Whether the fused CPU kernels serve `t`: an f32 tensor on the CPU, and the generic path not
/// forced on this thread.
pub fn fused(t: &Tensor) -> bool {
    cpu_f32(t) && fused_ops_on()
}

/// Whether `t` is f32 on the CPU (what the fused kernels read).
fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Whether the fused CPU kernels are on for this thread (not forced off by [`with_generic_ops`]).
pub fn fused_ops_on() -> bool {
    !GENERIC.with(|g| g.get())
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("collm op: expected a contiguous f32 tensor"),
    }
}

/// Runs `f` over the contiguous f32 data of `t`, brought to the host in f32 first when it lives
/// on another device or in another dtype.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.device().is_cpu() && t.dtype() == DType::F32 {
        t.contiguous()?
    } else {
        t.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?.contiguous()?
    };
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => Ok(f(slice(c, l)?)),
        _ => bail!("collm op: expected a CPU tensor"),
    }
}

// ---------------------------------------------------------------------------------------------
// A weight matrix as the CPU kernels read it. A LoRA run's frozen base may be held in bf16
// (`Transformer::hold_frozen_in`): half the memory and half the bytes a decode step streams.
// Its rows are widened to f32 a block at a time inside each product (bf16 → f32 is exact), so
// the arithmetic is the f32 kernels' on the same values; a product holds one f32 block of at most
// [`WIDEN_ELEMS`] values beside the bf16 weight. (The generic ops, off these kernels' paths, widen
// the whole weight where they meet it.)

/// Rows of a weight [rows, k], f32 or bf16.
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

impl<'a> From<&'a [f32]> for Weight<'a> {
    fn from(w: &'a [f32]) -> Self {
        Weight::F32(w)
    }
}

impl<'a> Weight<'a> {
    pub fn len(&self) -> usize {
        match self {
            Weight::F32(w) => w.len(),
            Weight::Bf16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `r` of the weight.
    fn slice(&self, r: std::ops::Range<usize>) -> Weight<'a> {
        match *self {
            Weight::F32(w) => Weight::F32(&w[r]),
            Weight::Bf16(w) => Weight::Bf16(&w[r]),
        }
    }

    /// The weight's values as f32: borrowed when it is f32, else widened into `scratch`.
    fn as_f32<'s>(&'s self, scratch: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        match *self {
            Weight::F32(w) => w,
            Weight::Bf16(w) => {
                scratch.clear();
                scratch.extend(w.iter().map(|&v| widen(v)));
                scratch
            }
        }
    }
}

/// A bf16 value as f32: its bits are the f32's top half (exact; a NaN stays a NaN). half's own
/// conversion quiets signalling NaNs with a branch that keeps the loops here from vectorizing.
#[inline(always)]
fn widen(v: half::bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// Widens bf16 into f32 on all threads.
fn widen_par(src: &[half::bf16], dst: &mut Vec<f32>) {
    dst.clear();
    dst.reserve(src.len());
    let spare = &mut dst.spare_capacity_mut()[..src.len()];
    spare.par_chunks_mut(1 << 14).zip(src.par_chunks(1 << 14)).for_each(|(d, s)| {
        for (d, s) in d.iter_mut().zip(s) {
            d.write(widen(*s));
        }
    });
    // SAFETY: the loop above wrote each of the first src.len() elements of the spare capacity.
    unsafe { dst.set_len(src.len()) };
}

/// Whether `t` is a weight the CPU kernels read: f32 or bf16, on the CPU.
fn cpu_weight(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::BF16)
}

/// Whether the ops that take a weight as a trained input (f32 only) or a frozen one (f32 or bf16)
/// read `w` on the CPU kernels: a bf16 weight that tracks a graph (a bf16 model trained in full)
/// takes the generic path.
fn trainable_or_frozen(w: &Tensor) -> bool {
    cpu_weight(w) && (w.dtype() == DType::F32 || !w.track_op())
}

/// Runs `f` over a CPU weight's contiguous values, f32 or bf16 as held; other dtypes and
/// devices are brought to the host in f32 first.
pub fn with_weight<R>(t: &Tensor, f: impl FnOnce(Weight) -> R) -> Result<R> {
    if !(cpu_weight(t) && t.dtype() == DType::BF16) {
        return with_f32(t, |w| f(Weight::F32(w)));
    }
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => {
            let data = c.as_slice::<half::bf16>()?;
            match l.contiguous_offsets() {
                Some((a, b)) => Ok(f(Weight::Bf16(&data[a..b]))),
                None => bail!("collm op: expected a contiguous bf16 weight"),
            }
        }
        _ => bail!("collm op: expected a CPU tensor"),
    }
}

/// Values of a bf16 weight widened per block of the products below (4 MiB of f32): a block is a
/// GEMM of its own, so a projection of SmolLM2's size is one block and the output head's 49,152
/// rows of 576 are 28 blocks. `cargo bench -p collm-model --bench kernels -- linear/frozen` on
/// the Xeon: a frozen 1536×576 projection's forward + backward over 512 rows 8.9 ms with blocks
/// of 512 rows, 8.4 ms with 2048 (one block), against 7.6 ms in f32 (the difference is the
/// widening's writes).
const WIDEN_ELEMS: usize = 1 << 20;

/// Rows of a weight with rows of `k` values per widened block: at least 16, however long a row.
fn widen_rows(k: usize) -> usize {
    (WIDEN_ELEMS / k.max(1)).max(16)
}

/// C[m, n] = x[m, k] · Wᵀ for W [n, k] (+ C when `accumulate`), C row-major [m, n].
fn xwt_into(c: &mut [f32], x: &[f32], m: usize, k: usize, w: Weight, n: usize, accumulate: bool) {
    assert!(c.len() >= m * n && x.len() >= m * k && w.len() == n * k, "xwt: C, x or W does not fit {m}x{k} · ({n}x{k})ᵀ");
    if m == 0 || n == 0 {
        return;
    }
    match w {
        Weight::F32(w) => gemm_into(c, m, n, k, x, (1, k), w, (k, 1), 1.0, accumulate),
        Weight::Bf16(wb) => {
            let (mut block, step) = (Vec::new(), widen_rows(k));
            for n0 in (0..n).step_by(step) {
                let rows = step.min(n - n0);
                widen_par(&wb[n0 * k..(n0 + rows) * k], &mut block);
                let view = |x: &[f32], rs, cs| crate::sgemm::View { ptr: x.as_ptr(), rs, cs };
                // SAFETY: C holds m rows of n values, of which this writes columns n0..n0+rows;
                // x holds m rows of k, the block `rows` rows of k (read as its transpose).
                unsafe {
                    crate::sgemm::gemm(m, rows, k, c.as_mut_ptr().add(n0), n, accumulate, view(x, k, 1), view(&block, 1, k), 1.0, true)
                }
            }
        }
    }
}

/// x[m, k] · Wᵀ for W [n, k]: [m, n].
pub fn matmul_nt_w(x: &[f32], m: usize, k: usize, w: Weight, n: usize) -> Vec<f32> {
    if let Weight::F32(w) = w {
        return matmul_nt(x, m, k, w, n);
    }
    let mut c = vec![0f32; m * n];
    xwt_into(&mut c, x, m, k, w, n, false);
    c
}

/// dy[m, n] · W for W [n, k]: [m, k] (a frozen projection's input gradient).
fn matmul_nn_w(dy: &[f32], m: usize, n: usize, w: Weight, k: usize) -> Vec<f32> {
    assert!(dy.len() == m * n && w.len() == n * k, "matmul_nn: dy or W does not fit {m}x{n} · {n}x{k}");
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * k];
    }
    match w {
        Weight::F32(w) => gemm_f32(m, k, n, dy, (1, n), w, (1, k)),
        Weight::Bf16(wb) => {
            let mut c = vec![0f32; m * k];
            let (mut block, step) = (Vec::new(), widen_rows(k));
            for n0 in (0..n).step_by(step) {
                let rows = step.min(n - n0);
                widen_par(&wb[n0 * k..(n0 + rows) * k], &mut block);
                // The block's rows n0.. of W meet columns n0.. of dy; the blocks' products add.
                gemm_into(&mut c, m, k, rows, &dy[n0..], (1, n), &block, (1, k), 1.0, n0 > 0);
            }
            c
        }
    }
}

fn last_dim(l: &Layout) -> usize {
    *l.dims().last().unwrap_or(&1)
}

/// Calls `body(args)` compiled for AVX2 + FMA where the CPU has them (the compiler then vectorizes
/// its plain loops 8 wide with fused multiply-adds), else the portable build of the same `body`.
/// Used as the tail of a function: `avx2_fma!(body(xs: &[f32], shift: f32) -> f32)`.
macro_rules! avx2_fma {
    ($body:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) -> $ret {
                $body($($arg),*)
            }
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { avx2($($arg),*) };
        }
        $body($($arg),*)
    }};
}
pub(crate) use avx2_fma;

// ---------------------------------------------------------------------------------------------
// exp over rows: a polynomial (Cephes' expf, within 2 ulp of libm's) in plain f32 arithmetic
// that the compiler vectorizes, with AVX2 + FMA where the CPU has them. libm's expf is a call
// per value: it was 4–5% of a train step (the softmaxes of attention and of the output head).

#[inline(always)]
fn exp_poly(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Below about −87.3 exp(x) is under f32's normal range: 0 (−inf, a masked score, included).
    let tiny = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.5;
    let y = p * z + r + 1.0;
    let scaled = y * f32::from_bits(((n as i32 + 127) << 23) as u32);
    if tiny {
        0.0
    } else {
        scaled
    }
}

/// xs[j] ← exp(xs[j] − shift); returns Σ xs[j] (after).
pub fn exp_shift_sum(xs: &mut [f32], shift: f32) -> f32 {
    #[inline(always)]
    fn body(xs: &mut [f32], shift: f32) -> f32 {
        let mut acc = [0f32; 8];
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            for i in 0..8 {
                c[i] = exp_poly(c[i] - shift);
                acc[i] += c[i];
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp_poly(*x - shift);
            sum += *x;
        }
        sum
    }
    avx2_fma!(body(xs: &mut [f32], shift: f32) -> f32)
}

/// Σ exp(xs[j] − shift), xs unchanged.
pub fn sum_exp_shift(xs: &[f32], shift: f32) -> f32 {
    #[inline(always)]
    fn body(xs: &[f32], shift: f32) -> f32 {
        let mut acc = [0f32; 8];
        let mut chunks = xs.chunks_exact(8);
        for c in &mut chunks {
            for i in 0..8 {
                acc[i] += exp_poly(c[i] - shift);
            }
        }
        acc.iter().sum::<f32>() + chunks.remainder().iter().map(|&x| exp_poly(x - shift)).sum::<f32>()
    }
    avx2_fma!(body(xs: &[f32], shift: f32) -> f32)
}

/// out[j] = scale · exp(xs[j] − shift).
pub fn exp_shift_scaled(xs: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
    #[inline(always)]
    fn body(xs: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = scale * exp_poly(x - shift);
        }
    }
    avx2_fma!(body(xs: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> ())
}

// ---------------------------------------------------------------------------------------------
// Attention softmax: softmax(scale * x + mask) over the last dim, mask shared across heads.

/// Additive attention mask of shape [batch, q_len, k_len] (0 or -inf), broadcast over heads.
#[derive(Clone)]
pub struct AttnMask {
    pub data: Arc<Vec<f32>>,
    pub batch: usize,
    pub q_len: usize,
    pub k_len: usize,
}

impl AttnMask {
    /// Query slot `past + i` may see key slot `j` when `j <= past + i` and the key is valid
    /// (not padding); a query always sees itself, so no row is ever fully masked.
    pub fn causal(valid: &[Vec<bool>], past: usize, q_len: usize) -> Self {
        let batch = valid.len();
        let k_len = past + q_len;
        let mut data = vec![f32::NEG_INFINITY; batch * q_len * k_len];
        for (b, v) in valid.iter().enumerate() {
            for i in 0..q_len {
                let row = &mut data[(b * q_len + i) * k_len..(b * q_len + i + 1) * k_len];
                for (j, r) in row.iter_mut().enumerate().take(past + i + 1) {
                    if v[j] || j == past + i {
                        *r = 0.0;
                    }
                }
            }
        }
        Self { data: Arc::new(data), batch, q_len, k_len }
    }

    /// Per batch row and key slot, 1 where the key is a real token: the last query position sees
    /// every real key (and itself, the last slot, which no other position sees), so its row is the
    /// validity. The CUDA attention kernel takes the mask in this form, O(k_len) per row.
    pub fn key_validity(&self) -> Vec<u8> {
        let (q, k) = (self.q_len, self.k_len);
        (0..self.batch).flat_map(|b| self.data[(b * q + q - 1) * k..(b * q + q) * k].iter().map(|&m| (m == 0.0) as u8)).collect()
    }

    fn tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        Tensor::from_slice(&self.data[..], (self.batch, 1, self.q_len, self.k_len), device)
    }
}

struct AttnSoftmax {
    mask: AttnMask,
    scale: f32,
}

impl AttnSoftmax {
    fn mask_row(&self, row: usize, rows_per_batch: usize) -> &[f32] {
        let b = row / rows_per_batch;
        let q = row % self.mask.q_len;
        let k = self.mask.k_len;
        &self.mask.data[(b * self.mask.q_len + q) * k..(b * self.mask.q_len + q + 1) * k]
    }
}

impl CustomOp1 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "collm-attn-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let k = last_dim(l);
        if k != self.mask.k_len {
            bail!("attn softmax: key length {k} != mask {}", self.mask.k_len);
        }
        let rows_per_batch = x.len() / k / self.mask.batch;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(k).zip(x.par_chunks(k)).enumerate().with_min_len(16).for_each(|(r, (o, xi))| {
            let m = self.mask_row(r, rows_per_batch);
            let mut max = f32::NEG_INFINITY;
            for j in 0..k {
                let v = xi[j] * self.scale + m[j];
                o[j] = v;
                max = max.max(v);
            }
            let inv = 1.0 / exp_shift_sum(o, max);
            o.iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let k = self.mask.k_len;
        let scale = self.scale;
        let out = with_f32(res, |y| {
            with_f32(grad, |g| {
                let mut dx = vec![0f32; y.len()];
                dx.par_chunks_mut(k).zip(y.par_chunks(k).zip(g.par_chunks(k))).with_min_len(16).for_each(|(d, (y, g))| {
                    let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                    for j in 0..k {
                        d[j] = scale * y[j] * (g[j] - dot);
                    }
                });
                dx
            })
        })??;
        Ok(Some(Tensor::from_vec(out, res.shape(), res.device())?))
    }
}

/// softmax(scale * scores + mask) over the last dim. `scores` is [batch, ..., q_len, k_len].
pub fn attn_softmax(scores: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor> {
    if fused(scores) {
        return scores.apply_op1(AttnSoftmax { mask: mask.clone(), scale });
    }
    // In f32 whatever the scores' dtype (as transformers does), back in that dtype at the end.
    let dims = scores.dims().to_vec();
    let m = mask.tensor(scores.device())?;
    // Every leading dim after the batch, the query heads stacked per key/value group included.
    let (b, rest) = (dims[0], scores.elem_count() / (dims[0] * mask.q_len * mask.k_len));
    let s = (scores.to_dtype(DType::F32)?.reshape((b, rest, mask.q_len, mask.k_len))? * scale as f64)?.broadcast_add(&m)?;
    let max = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.reshape(dims)?.to_dtype(scores.dtype())
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w

/// One row of RMSNorm: o = x / sqrt(mean(x²) + eps) · w (the fused op's and the decode step's).
#[inline]
pub(crate) fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, o: &mut [f32]) {
    let d = w.len();
    let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for j in 0..d {
        o[j] = x[j] * r * w[j];
    }
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "collm-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1)?;
        let w = slice(s2, l2)?;
        let d = w.len();
        if last_dim(l1) != d {
            bail!("rms_norm: hidden size {} != weight size {d}", last_dim(l1));
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, x)| rms_norm_row(x, w, self.eps, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let eps = self.eps;
        let want_w = w.track_op();
        let (dx, dw) = with_f32(x, |x| {
            with_f32(w, |w| {
                with_f32(grad, |g| {
                    // dW sums over rows: each fixed block of rows adds into its own partial, and
                    // the partials are summed in order, so the result does not depend on how
                    // rayon schedules the blocks (a fold/reduce would make training runs differ).
                    const ROWS: usize = 32;
                    let mut dx = vec![0f32; x.len()];
                    let partials: Vec<Vec<f32>> = dx
                        .par_chunks_mut(d * ROWS)
                        .zip(x.par_chunks(d * ROWS).zip(g.par_chunks(d * ROWS)))
                        .map(|(dxb, (xb, gb))| {
                            let mut acc = if want_w { vec![0f32; d] } else { Vec::new() };
                            for (dx, (x, g)) in dxb.chunks_mut(d).zip(xb.chunks(d).zip(gb.chunks(d))) {
                                let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                                let r = 1.0 / (ms + eps).sqrt();
                                let mut dot = 0f32;
                                for j in 0..d {
                                    dot += g[j] * w[j] * x[j];
                                }
                                let c = dot * r * r / d as f32;
                                for j in 0..d {
                                    dx[j] = r * (g[j] * w[j] - x[j] * c);
                                }
                                if want_w {
                                    for j in 0..d {
                                        acc[j] += g[j] * x[j] * r;
                                    }
                                }
                            }
                            acc
                        })
                        .collect();
                    let mut dw = if want_w { vec![0f32; d] } else { Vec::new() };
                    for p in &partials {
                        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
                    }
                    (dx, dw)
                })
            })
        })???;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = if want_w { Some(Tensor::from_vec(dw, w.shape(), w.device())?) } else { None };
        Ok((Some(dx), dw))
    }
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    if fused(&x) && w.dtype() == DType::F32 {
        return x.apply_op2(w, RmsNorm { eps: eps as f32 });
    }
    if let Some(y) = crate::cuda::rms_norm(&x, w, eps)? {
        return Ok(y);
    }
    // Normalized in f32, then scaled in the input's dtype (as transformers does).
    let x32 = x.to_dtype(DType::F32)?;
    let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
    x32.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(x.dtype())?.broadcast_mul(&w.to_dtype(x.dtype())?)
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: h = silu(gate) · up, the gate of a Llama/Qwen MLP, in one pass forward and one pass
// backward. Built from candle ops it is a silu (libm's exp per value, on one thread) and a product
// forward, and backward about ten elementwise passes (candle's silu gradient is composed of neg,
// exp, recip and products), each with a fresh buffer, plus a zero-filled gradient and an add per
// input: about 5% of a SmolLM2 train step. Here: h, then dgate and dup from one read of gate,
// up and dh, the sigmoid recomputed (nothing kept), on all threads.

struct SwiGlu;

/// Elements per parallel task of the elementwise kernels.
const ELEMS_PER_TASK: usize = 16 * 1024;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    // exp_poly clamps its argument: far below zero this gives about 6e-39, far above it exactly 1.
    1.0 / (1.0 + exp_poly(-x))
}

fn swiglu_rows(g: &[f32], u: &[f32], h: &mut [f32]) {
    #[inline(always)]
    fn body(g: &[f32], u: &[f32], h: &mut [f32]) {
        for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
            *h = g * sigmoid(g) * u;
        }
    }
    avx2_fma!(body(g: &[f32], u: &[f32], h: &mut [f32]) -> ())
}

/// dgate = dh · up · silu'(gate) with silu'(g) = σ(g)(1 + g(1 − σ(g))); dup = dh · silu(gate).
fn swiglu_grad_rows(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) {
    #[inline(always)]
    fn body(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for i in 0..g.len().min(u.len()).min(dh.len()).min(dg.len()).min(du.len()) {
            let (g, s) = (g[i], sigmoid(g[i]));
            dg[i] = dh[i] * u[i] * s * (1.0 + g * (1.0 - s));
            du[i] = dh[i] * g * s;
        }
    }
    avx2_fma!(body(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) -> ())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "collm-swiglu"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(gs, gl)?, slice(us, ul)?);
        if gl.dims() != ul.dims() {
            bail!("swiglu: gate {:?} and up {:?} differ in shape", gl.dims(), ul.dims());
        }
        let mut h: Vec<f32> = vec![0f32; g.len()];
        h.par_chunks_mut(ELEMS_PER_TASK)
            .zip(g.par_chunks(ELEMS_PER_TASK).zip(u.par_chunks(ELEMS_PER_TASK)))
            .for_each(|(h, (g, u))| swiglu_rows(g, u, h));
        Ok((CpuStorage::F32(h), gl.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32(gate, |g| {
            with_f32(up, |u| {
                with_f32(grad, |dh| {
                    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
                    dg.par_chunks_mut(ELEMS_PER_TASK)
                        .zip(du.par_chunks_mut(ELEMS_PER_TASK))
                        .zip(g.par_chunks(ELEMS_PER_TASK).zip(u.par_chunks(ELEMS_PER_TASK)).zip(dh.par_chunks(ELEMS_PER_TASK)))
                        .for_each(|((dg, du), ((g, u), dh))| swiglu_grad_rows(g, u, dh, dg, du));
                    (dg, du)
                })
            })
        })???;
        Ok((Some(Tensor::from_vec(dg, gate.shape(), gate.device())?), Some(Tensor::from_vec(du, up.shape(), up.device())?)))
    }
}

/// silu(gate) · up of two slices on the calling thread (the decode step's few rows).
pub(crate) fn swiglu_slices(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut h = vec![0f32; gate.len().min(up.len())];
    swiglu_rows(gate, up, &mut h);
    h
}

/// silu(gate) · up elementwise (the MLP's gate): one fused op on the CPU in f32, candle's silu
/// and product elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused(gate) && fused(up) && gate.dims() == up.dims() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    gate.silu()? * up
}

// ---------------------------------------------------------------------------------------------
// RoPE (the "rotate half" form used by Hugging Face checkpoints), per-row positions.

/// cos/sin tables for a batch: [batch * seq, head_dim / 2], one row per token.
#[derive(Clone)]
pub struct RopeTable {
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
    pub half: usize,
}

impl RopeTable {
    pub fn new(positions: &[u32], head_dim: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)).collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self { cos: Arc::new(cos), sin: Arc::new(sin), half }
    }
}

struct Rope {
    table: RopeTable,
    heads: usize,
    inverse: bool,
}

fn rope_apply(x: &[f32], t: &RopeTable, heads: usize, inverse: bool) -> Vec<f32> {
    let hd = 2 * t.half;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(heads * hd).zip(x.par_chunks(heads * hd)).enumerate().for_each(|(tok, (o, x))| {
        for (o, x) in o.chunks_mut(hd).zip(x.chunks(hd)) {
            rope_row(x, o, t, tok, inverse);
        }
    });
    out
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "collm-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        if x.len() != self.table.cos.len() * 2 * self.heads {
            bail!("rope: tensor of {} values does not match the table", x.len());
        }
        Ok((CpuStorage::F32(rope_apply(x, &self.table, self.heads, self.inverse)), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = with_f32(grad, |g| rope_apply(g, &self.table, self.heads, !self.inverse))?;
        Ok(Some(Tensor::from_vec(g, res.shape(), res.device())?))
    }
}

/// Rotates `x` of shape [batch, seq, heads, head_dim] by the table's per-token angles.
pub fn rope(x: &Tensor, table: &RopeTable) -> Result<Tensor> {
    let (b, t, h, d) = x.dims4()?;
    let x = x.contiguous()?;
    if fused(&x) {
        return x.apply_op1(Rope { table: table.clone(), heads: h, inverse: false });
    }
    if let Some(y) = crate::cuda::rope(&x, table, h)? {
        return Ok(y);
    }
    let half = d / 2;
    let cos = Tensor::from_slice(&table.cos[..], (b, t, 1, half), x.device())?.to_dtype(x.dtype())?;
    let sin = Tensor::from_slice(&table.sin[..], (b, t, 1, half), x.device())?.to_dtype(x.dtype())?;
    let x1 = x.narrow(3, 0, half)?;
    let x2 = x.narrow(3, half, half)?;
    let o1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let o2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[o1, o2], 3)
}

// ---------------------------------------------------------------------------------------------
// Heads: a projection's output [batch, seq, heads · head_dim] into the head-major layout that
// attention reads, RoPE applied on the way, and attention's output back. Composed of candle ops
// (reshape, rope, transpose, a contiguous copy, the query heads regrouped) each of these was
// several graph nodes, and every node of a backward pass cost a zero-filled gradient buffer and
// an add (strided, for the transposes); here each is one op, one pass each way.

struct ToHeads {
    table: Option<RopeTable>,
    heads: usize,
    groups: usize,
}

/// (batch, seq, head_dim) of a [batch, seq, …] tensor holding `heads` heads per token.
fn head_dims(l: &Layout, heads: usize) -> Result<(usize, usize, usize)> {
    let d = l.dims();
    if d.len() < 3 || heads == 0 {
        bail!("heads: a tensor of shape {d:?} does not hold {heads} heads per token");
    }
    let (b, t) = (d[0], d[1]);
    let per_token = l.shape().elem_count() / (b * t).max(1);
    if per_token == 0 || !per_token.is_multiple_of(heads) {
        bail!("heads: a tensor of shape {d:?} does not hold {heads} heads per token");
    }
    Ok((b, t, per_token / heads))
}

/// Rotates one head's row by the angles of table row `tok` (inverse: the other way).
#[inline(always)]
pub(crate) fn rope_row(src: &[f32], dst: &mut [f32], t: &RopeTable, tok: usize, inverse: bool) {
    let half = t.half;
    let (c, s) = (&t.cos[tok * half..(tok + 1) * half], &t.sin[tok * half..(tok + 1) * half]);
    for i in 0..half {
        let (a, b) = (src[i], src[i + half]);
        let sn = if inverse { -s[i] } else { s[i] };
        dst[i] = a * c[i] - b * sn;
        dst[i + half] = b * c[i] + a * sn;
    }
}

/// Token-major [b, t, heads, hd] to head-major [b, heads, t, hd], rotating each head row by its
/// token's angles when there is a table (`inverse`: the other way).
fn permute_heads(x: &[f32], t: usize, heads: usize, hd: usize, table: Option<&RopeTable>, inverse: bool) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(t * hd).enumerate().for_each(|(bh, o)| {
        let (r, h) = (bh / heads, bh % heads);
        for j in 0..t {
            let tok = r * t + j;
            let token_major = (tok * heads + h) * hd;
            let (src, dst) = (&x[token_major..token_major + hd], &mut o[j * hd..(j + 1) * hd]);
            match table {
                Some(tb) => rope_row(src, dst, tb, tok, inverse),
                None => dst.copy_from_slice(src),
            }
        }
    });
    out
}

/// The inverse of [`permute_heads`]: head-major [b, heads, t, hd] to token-major.
fn unpermute_heads(x: &[f32], t: usize, heads: usize, hd: usize, table: Option<&RopeTable>, inverse: bool) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(heads * hd).enumerate().for_each(|(tok, o)| {
        let (r, j) = (tok / t, tok % t);
        for h in 0..heads {
            let head_major = ((r * heads + h) * t + j) * hd;
            let (src, dst) = (&x[head_major..head_major + hd], &mut o[h * hd..(h + 1) * hd]);
            match table {
                Some(tb) => rope_row(src, dst, tb, tok, inverse),
                None => dst.copy_from_slice(src),
            }
        }
    });
    out
}

impl CustomOp1 for ToHeads {
    fn name(&self) -> &'static str {
        "collm-to-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let (b, t, hd) = head_dims(l, self.heads)?;
        if let Some(tb) = &self.table {
            if tb.cos.len() != b * t * tb.half || 2 * tb.half != hd {
                bail!("to_heads: the RoPE table does not fit {b}x{t} tokens of head size {hd}");
            }
        }
        let out = permute_heads(x, t, self.heads, hd, self.table.as_ref(), false);
        Ok((CpuStorage::F32(out), Shape::from((b, self.groups, self.heads / self.groups * t, hd))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, t, hd) = head_dims(arg.layout(), self.heads)?;
        let dx = with_f32(grad, |g| unpermute_heads(g, t, self.heads, hd, self.table.as_ref(), true))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// A projection's output `x` [batch, seq, heads · head_dim] (or [batch, seq, heads, head_dim]) as
/// attention's operand [batch, groups, heads / groups · seq, head_dim]: head-major, each group's
/// heads one after another (the query heads that share a key/value head), rotated by `rope`'s
/// per-token angles when given.
pub fn to_heads(x: &Tensor, rope: Option<&RopeTable>, heads: usize, groups: usize) -> Result<Tensor> {
    if groups == 0 || !heads.is_multiple_of(groups) {
        bail!("to_heads: {heads} heads do not split into {groups} groups");
    }
    let (b, t, hd) = head_dims(x.layout(), heads)?;
    if fused(x) {
        return x.contiguous()?.apply_op1(ToHeads { table: rope.cloned(), heads, groups });
    }
    let x = x.reshape((b, t, heads, hd))?;
    let x = match rope {
        Some(table) => self::rope(&x, table)?,
        None => x,
    };
    x.transpose(1, 2)?.contiguous()?.reshape((b, groups, heads / groups * t, hd))
}

/// [`to_heads`] of the projection x Wᵀ in one op: the projection's token-major output is a
/// temporary of the op, not a tensor the graph keeps until the backward ends (nor a node whose
/// backward zero-fills and adds a gradient). `w` trains when it tracks a graph, else it is frozen.
pub fn linear_heads(x: &Tensor, w: &Tensor, rope: Option<&RopeTable>, heads: usize, groups: usize) -> Result<Tensor> {
    if groups == 0 || !heads.is_multiple_of(groups) {
        bail!("linear_heads: {heads} heads do not split into {groups} groups");
    }
    if fused(x) && trainable_or_frozen(w) && (x.track_op() || w.track_op()) {
        let op = |w: Option<Tensor>| LinearHeads { w, table: rope.cloned(), heads, groups };
        let x = x.contiguous()?;
        return if w.track_op() { x.apply_op2(&w.contiguous()?, op(None)) } else { x.apply_op1(op(Some(w.detach().contiguous()?))) };
    }
    let y = if w.track_op() { linear_nt(x, w)? } else { frozen_linear(x, w)? };
    to_heads(&y, rope, heads, groups)
}

/// The op of [`linear_heads`]: `w` holds a frozen weight (one input, x), or is None when the
/// weight is the op's second input and trains.
struct LinearHeads {
    w: Option<Tensor>,
    table: Option<RopeTable>,
    heads: usize,
    groups: usize,
}

impl LinearHeads {
    fn fwd(&self, x: &[f32], xl: &Layout, w: Weight, (out_f, in_f): (usize, usize)) -> Result<(CpuStorage, Shape)> {
        let d = xl.dims();
        if d.len() != 3
            || d[2] != in_f
            || w.len() != out_f * in_f
            || self.heads == 0
            || out_f == 0
            || !out_f.is_multiple_of(self.heads)
            || d[0] * d[1] == 0
        {
            bail!("linear_heads: x {d:?} and W {out_f}x{in_f} do not fit {} heads", self.heads);
        }
        let (b, t, hd) = (d[0], d[1], out_f / self.heads);
        if let Some(tb) = &self.table {
            if tb.cos.len() != b * t * tb.half || 2 * tb.half != hd {
                bail!("linear_heads: the RoPE table does not fit {b}x{t} tokens of head size {hd}");
            }
        }
        let y = matmul_nt_w(x, b * t, in_f, w, out_f);
        let out = permute_heads(&y, t, self.heads, hd, self.table.as_ref(), false);
        Ok((CpuStorage::F32(out), Shape::from((b, self.groups, self.heads / self.groups * t, hd))))
    }

    /// (dx when x tracks a graph, dW when the weight trains).
    fn bwd(&self, x: &Tensor, w: &Tensor, grad: &Tensor, trains: bool) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out_f, _) = w.dims2()?;
        let (b, t, _) = x.dims3()?;
        let dy = with_f32(grad, |g| unpermute_heads(g, t, self.heads, out_f / self.heads, self.table.as_ref(), true))?;
        linear_grads(x, w, &Tensor::from_vec(dy, (b * t, out_f), x.device())?, x.track_op(), trains)
    }
}

impl CustomOp1 for LinearHeads {
    fn name(&self) -> &'static str {
        "collm-linear-heads"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = frozen_weight(&self.w, "linear_heads")?;
        with_weight(w, |ws| self.fwd(slice(xs, xl)?, xl, ws, w.dims2()?))?
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let w = frozen_weight(&self.w, "linear_heads")?;
        Ok(self.bwd(x, w, grad, false)?.0)
    }
}

impl CustomOp2 for LinearHeads {
    fn name(&self) -> &'static str {
        "collm-linear-heads"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.fwd(slice(xs, xl)?, xl, Weight::F32(slice(ws, wl)?), wl.shape().dims2()?)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.bwd(x, w, grad, true)
    }
}

/// (batch, seq, head_dim) of a head-major [batch, …, head_dim] tensor of `heads` heads.
fn merged_dims(d: &[usize], heads: usize) -> Result<(usize, usize, usize)> {
    let n: usize = d.iter().product();
    let (b, hd) = (d.first().copied().unwrap_or(0), d.last().copied().unwrap_or(0));
    if d.len() < 3 || n == 0 || heads == 0 || !n.is_multiple_of(b * heads * hd) {
        bail!("from_heads: a tensor of shape {d:?} does not hold {heads} heads");
    }
    Ok((b, n / (b * heads * hd), hd))
}

struct FromHeads {
    heads: usize,
}

impl CustomOp1 for FromHeads {
    fn name(&self) -> &'static str {
        "collm-from-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let (b, t, hd) = merged_dims(l.dims(), self.heads)?;
        let out = unpermute_heads(x, t, self.heads, hd, None, false);
        Ok((CpuStorage::F32(out), Shape::from((b, t, self.heads * hd))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, t, hd) = merged_dims(arg.dims(), self.heads)?;
        let dx = with_f32(grad, |g| permute_heads(g, t, self.heads, hd, None, false))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Attention's output [batch, groups, heads / groups · seq, head_dim] (head-major) as
/// [batch, seq, heads · head_dim], the output projection's input.
pub fn from_heads(o: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, hd) = merged_dims(o.dims(), heads)?;
    if fused(o) {
        return o.contiguous()?.apply_op1(FromHeads { heads });
    }
    o.reshape((b, heads, t, hd))?.transpose(1, 2)?.reshape((b, t, heads * hd))
}

// ---------------------------------------------------------------------------------------------
// Token log-probabilities: log_softmax(logits)[target], fused, with backward.

struct TokenLogprobs {
    targets: Arc<Vec<u32>>,
    /// Each row's log-sum-exp, kept by the forward for the backward (which then needs one exp
    /// per logit instead of three passes).
    lse: std::sync::Mutex<Vec<f32>>,
}

fn row_lse(row: &[f32]) -> f32 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    max + sum_exp_shift(row, max).ln()
}

impl CustomOp1 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "collm-token-logprobs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let v = last_dim(l);
        let n = x.len() / v;
        if n != self.targets.len() {
            bail!("token_logprobs: {} rows but {} targets", n, self.targets.len());
        }
        let lse: Vec<f32> = x.par_chunks(v).map(row_lse).collect();
        let out: Vec<f32> = x.chunks(v).zip(self.targets.iter()).zip(&lse).map(|((row, &t), l)| row[t as usize] - l).collect();
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let v = arg.dim(D::Minus1)?;
        let g = grad.to_vec1::<f32>()?;
        let kept = std::mem::take(&mut *self.lse.lock().unwrap_or_else(|e| e.into_inner()));
        let out = with_f32(arg, |x| {
            let lse = if kept.len() == g.len() { kept } else { x.par_chunks(v).map(row_lse).collect() };
            // Every element is written (no zero fill): −g·softmax, plus g at the target.
            let mut d: Vec<f32> = Vec::with_capacity(x.len());
            // SAFETY: f32 has no invalid bit patterns, and each row is overwritten whole below
            // before the vector is read.
            unsafe { d.set_len(x.len()) };
            d.par_chunks_mut(v).zip(x.par_chunks(v)).enumerate().for_each(|(n, (d, row))| {
                let gn = g[n];
                if gn == 0.0 {
                    d.fill(0.0);
                    return;
                }
                exp_shift_scaled(row, lse[n], -gn, d);
                d[self.targets[n] as usize] += gn;
            });
            d
        })?;
        Ok(Some(Tensor::from_vec(out, arg.shape(), arg.device())?))
    }
}

/// log p(target) for each row of `logits` [n, vocab]; returns [n].
pub fn token_logprobs(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    // In f32 whatever the logits' dtype.
    let logits = logits.contiguous()?.to_dtype(DType::F32)?;
    if fused(&logits) {
        return logits.apply_op1(TokenLogprobs { targets: Arc::new(targets.to_vec()), lse: Default::default() });
    }
    if let Some(y) = crate::cuda::token_logprobs(&logits, targets)? {
        return Ok(y);
    }
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let ids = Tensor::from_slice(targets, (targets.len(), 1), logits.device())?;
    shifted.gather(&ids, 1)?.sub(&lse)?.squeeze(1)
}

// ---------------------------------------------------------------------------------------------
// Embedding lookup whose weight trains: rows of the table forward; backward, the output's
// gradient rows added at their ids into the table's gradient (in the gradient sink's sum when it
// keeps one). candle's index_select backward zero-fills a table-sized buffer, copies it in
// index_add and adds the copy into a third: for SmolLM2's 49,152 × 576 table, 340 MB per pass.

struct Embedding {
    ids: Vec<u32>,
}

impl Embedding {
    fn check(&self, vocab: usize) -> Result<()> {
        match self.ids.iter().find(|&&id| id as usize >= vocab) {
            Some(id) => bail!("embedding: token id {id} is outside the table of {vocab} rows"),
            None => Ok(()),
        }
    }
}

impl CustomOp1 for Embedding {
    fn name(&self) -> &'static str {
        "collm-embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = slice(s, l)?;
        let (vocab, hidden) = l.shape().dims2()?;
        self.check(vocab)?;
        let mut out = Vec::with_capacity(self.ids.len() * hidden);
        for &id in &self.ids {
            out.extend_from_slice(&w[id as usize * hidden..(id as usize + 1) * hidden]);
        }
        Ok((CpuStorage::F32(out), Shape::from((self.ids.len(), hidden))))
    }

    fn bwd(&self, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (vocab, hidden) = w.dims2()?;
        self.check(vocab)?;
        let add_rows = |sum: &mut [f32], g: &[f32]| {
            for (&id, row) in self.ids.iter().zip(g.chunks_exact(hidden)) {
                for (s, v) in sum[id as usize * hidden..(id as usize + 1) * hidden].iter_mut().zip(row) {
                    *s += v;
                }
            }
        };
        let contribution = |sum: Option<&mut [f32]>| -> Result<Option<Vec<f32>>> {
            with_f32(grad, |g| {
                if g.len() != self.ids.len() * hidden {
                    bail!("embedding backward: a gradient of {} values for {} rows of {hidden}", g.len(), self.ids.len());
                }
                Ok(match sum {
                    Some(sum) => {
                        add_rows(sum, g);
                        None
                    }
                    None => {
                        // Written, not calloc'ed: this sum is read before it is written (by the
                        // rows added below, the output head's GEMM when tied, AdamW).
                        let mut dw = crate::optim::written_zeros(vocab * hidden);
                        add_rows(&mut dw, g);
                        Some(dw)
                    }
                })
            })?
        };
        crate::optim::weight_grad(w, &contribution)
    }
}

/// Rows `ids` (u32, one dimension) of the table `w` [vocab, hidden]: [ids, hidden].
pub fn embedding(w: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if fused(w) && w.track_op() {
        let ids = ids.to_device(&candle_core::Device::Cpu)?.to_vec1::<u32>()?;
        return w.contiguous()?.apply_op1(Embedding { ids });
    }
    w.index_select(ids, 0)
}

// ---------------------------------------------------------------------------------------------
// Linear with a frozen weight: y = x W^T (+ b); the backward computes dx only, never dW.

struct FrozenLinear {
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "collm-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let (out_f, in_f) = self.w.dims2()?;
        let n = x.len() / in_f;
        let y = with_weight(&self.w, |w| matmul_nt_w(x, n, in_f, w, out_f))?;
        let mut dims = l.dims().to_vec();
        *dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (out_f, _) = self.w.dims2()?;
        Ok(linear_grads(arg, &self.w, &grad.reshape(((), out_f))?.contiguous()?, true, false)?.0)
    }
}

/// The gradients of y = x Wᵀ from dy [rows, out] (contiguous): dx = dy W in x's shape when
/// `want_dx`, dW = dyᵀ x in W's own [out, in] layout when `want_dw`.
fn linear_grads(x: &Tensor, w: &Tensor, dy: &Tensor, want_dx: bool, want_dw: bool) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (out_f, in_f) = w.dims2()?;
    let rows = dy.dim(0)?;
    let dx = if want_dx { Some(matmul_nn(dy, w)?.reshape(x.shape())?) } else { None };
    if !want_dw {
        return Ok((dx, None));
    }
    // dW = dyᵀ x: a new buffer, or added by the GEMM (β = 1) into the sum that the gradient
    // sink keeps for W.
    let contribution = |sum: Option<&mut [f32]>| -> Result<Option<Vec<f32>>> {
        with_f32(dy, |g| {
            with_f32(x, |xs| match sum {
                None => matmul_tn(g, rows, out_f, xs, in_f).map(Some),
                Some(sum) => {
                    if g.len() != rows * out_f || xs.len() != rows * in_f || sum.len() != out_f * in_f {
                        bail!(
                            "linear backward: dy {rows}x{out_f}, x of {} values and a sum of {} do not fit W {out_f}x{in_f}",
                            xs.len(),
                            sum.len()
                        );
                    }
                    gemm_into(sum, out_f, in_f, rows, g, (out_f, 1), xs, (1, in_f), 1.0, true);
                    Ok(None)
                }
            })
        })??
    };
    Ok((dx, crate::optim::weight_grad(w, &contribution)?))
}

/// The frozen weight an op holds when its weight is not one of its inputs.
fn frozen_weight<'a>(w: &'a Option<Tensor>, op: &str) -> Result<&'a Tensor> {
    w.as_ref().ok_or_else(|| candle_core::Error::Msg(format!("{op}: no frozen weight")))
}

/// C[m, n] = A[m, k] · B[n, k]^T on row-major slices.
pub fn matmul_nt(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
    gemm_f32(m, n, k, a, (1, k), b, (k, 1))
}

/// C[m, n] = A · B with C row-major and A [m, k], B [k, n] read through the strides given as
/// (between columns, between rows): a transposed operand costs no copy.
fn gemm_f32(m: usize, n: usize, k: usize, a: &[f32], a_st: (usize, usize), b: &[f32], b_st: (usize, usize)) -> Vec<f32> {
    // Without accumulation the GEMM writes every element of C and reads none: no zero fill.
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: C has room for m*n values, all written (k = 0 writes zeros) before set_len
    // exposes them.
    unsafe {
        gemm_checked(c.as_mut_ptr(), m, n, k, a, a_st, b, b_st, 1.0, false);
        c.set_len(m * n);
    }
    c
}

/// C[m, n] (= or +=) α·A·B on row-major slices, the operands read through (column, row) strides.
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_st: (usize, usize),
    b: &[f32],
    b_st: (usize, usize),
    alpha: f32,
    accumulate: bool,
) {
    assert!(c.len() >= m * n, "gemm_into: C holds {} values, not {m}x{n}", c.len());
    // SAFETY: C holds m*n initialised values.
    unsafe { gemm_checked(c.as_mut_ptr(), m, n, k, a, a_st, b, b_st, alpha, accumulate) }
}

/// [`crate::sgemm::gemm`] on all threads with C row-major [m, n], after checking that the
/// strides keep every read inside A and B.
///
/// # Safety
/// C must hold room for m·n values (initialised ones when accumulating).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_checked(
    c: *mut f32,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_st: (usize, usize),
    b: &[f32],
    b_st: (usize, usize),
    alpha: f32,
    accumulate: bool,
) {
    gemm_checked_with(crate::sgemm::best_kernel(), c, m, n, k, a, a_st, b, b_st, alpha, accumulate)
}

/// [`gemm_checked`] through the kernel named.
///
/// # Safety
/// As for [`gemm_checked`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_checked_with(
    kernel: crate::sgemm::Kernel,
    c: *mut f32,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (a_cs, a_rs): (usize, usize),
    b: &[f32],
    (b_cs, b_rs): (usize, usize),
    alpha: f32,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, cs: usize, rs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(k == 0 || (last(m, k, a_cs, a_rs) < a.len() && last(k, n, b_cs, b_rs) < b.len()), "gemm: the strides reach past the data");
    let view = |x: &[f32], rs, cs| crate::sgemm::View { ptr: x.as_ptr(), rs, cs };
    crate::sgemm::gemm_with(kernel, m, n, k, c, n, accumulate, view(a, a_rs, a_cs), view(b, b_rs, b_cs), alpha, true)
}

/// y = x W^T where W receives no gradient (and costs no backward work); x keeps its gradient.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if fused(x) && cpu_weight(w) && x.track_op() {
        return x.contiguous()?.apply_op1(FrozenLinear { w: w.detach().contiguous()? });
    }
    linear_nt(x, &w.detach())
}

/// res + x Wᵀ: a projection added onto the residual stream (attention's output projection, the
/// MLP's down projection) in one op. Composed, the projection's output is a tensor of its own
/// that the graph keeps until the backward ends, and the add a node whose backward zero-fills
/// and adds a gradient for each side; here the GEMM accumulates onto a copy of `res`, and the
/// backward hands `res` the output's gradient as it is. `w` trains when it tracks a graph, else
/// it is frozen (no gradient, no backward work for it).
pub fn residual_linear(res: &Tensor, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let graph = res.track_op() || x.track_op() || w.track_op();
    if fused(x) && cpu_f32(res) && trainable_or_frozen(w) && graph {
        let (res, x) = (res.contiguous()?, x.contiguous()?);
        return if w.track_op() {
            res.apply_op3(&x, &w.contiguous()?, ResidualLinear { w: None })
        } else {
            res.apply_op2(&x, ResidualLinear { w: Some(w.detach().contiguous()?) })
        };
    }
    let y = if w.track_op() { linear_nt(x, w)? } else { frozen_linear(x, w)? };
    res + y
}

/// The op of [`residual_linear`]: `w` holds a frozen weight (two inputs, res and x), or is None
/// when the weight is the op's third input and trains.
struct ResidualLinear {
    w: Option<Tensor>,
}

impl ResidualLinear {
    fn fwd(
        &self,
        res: &[f32],
        rl: &Layout,
        x: &[f32],
        xl: &Layout,
        w: Weight,
        (out_f, in_f): (usize, usize),
    ) -> Result<(CpuStorage, Shape)> {
        let rows = x.len() / in_f.max(1);
        let (rd, xd) = (rl.dims(), xl.dims());
        let lead = |d: &[usize]| d[..d.len().saturating_sub(1)].to_vec();
        if xd.last() != Some(&in_f)
            || rd.last() != Some(&out_f)
            || lead(rd) != lead(xd)
            || res.len() != rows * out_f
            || w.len() != out_f * in_f
        {
            bail!("residual_linear: res {:?}, x {:?} and W {out_f}x{in_f} do not fit together", rl.dims(), xl.dims());
        }
        let mut y = res.to_vec();
        xwt_into(&mut y, x, rows, in_f, w, out_f, true);
        Ok((CpuStorage::F32(y), rl.shape().clone()))
    }

    /// (d res, dx when x tracks a graph, dW when the weight trains).
    fn bwd(&self, x: &Tensor, w: &Tensor, grad: &Tensor, trains: bool) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let (out_f, _) = w.dims2()?;
        let (dx, dw) = linear_grads(x, w, &grad.reshape(((), out_f))?.contiguous()?, x.track_op(), trains)?;
        Ok((grad.clone(), dx, dw))
    }
}

impl CustomOp2 for ResidualLinear {
    fn name(&self) -> &'static str {
        "collm-residual-linear"
    }

    fn cpu_fwd(&self, rs: &CpuStorage, rl: &Layout, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = frozen_weight(&self.w, "residual_linear")?;
        with_weight(w, |ws| self.fwd(slice(rs, rl)?, rl, slice(xs, xl)?, xl, ws, w.dims2()?))?
    }

    fn bwd(&self, _res: &Tensor, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let w = frozen_weight(&self.w, "residual_linear")?;
        let (dres, dx, _) = self.bwd(x, w, grad, false)?;
        Ok((Some(dres), dx))
    }
}

impl CustomOp3 for ResidualLinear {
    fn name(&self) -> &'static str {
        "collm-residual-linear"
    }

    fn cpu_fwd(
        &self,
        rs: &CpuStorage,
        rl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(slice(rs, rl)?, rl, slice(xs, xl)?, xl, Weight::F32(slice(ws, wl)?), wl.shape().dims2()?)
    }

    fn bwd(
        &self,
        _res: &Tensor,
        x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dres, dx, dw) = self.bwd(x, w, grad, true)?;
        Ok((Some(dres), dx, dw))
    }
}

// A trainable linear layer: y = x W^T whose backward gives dW = dy^T x in W's own [out, in]
// layout. candle's matmul backward gives the gradient of W^T, [in, out], through a transpose, and
// then adds that strided view into W's gradient element by element: on SmolLM2-135M that add cost
// more than a second of every backward pass.
struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "collm-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(xs, xl)?, slice(ws, wl)?);
        let (out_f, in_f) = wl.shape().dims2()?;
        let y = matmul_nt(x, x.len() / in_f, in_f, w, out_f);
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out_f, _) = w.dims2()?;
        linear_grads(x, w, &grad.reshape(((), out_f))?.contiguous()?, true, true)
    }
}

// A LoRA-adapted projection with a frozen base: y = x Wᵀ + s·(x Aᵀ) Bᵀ in one op. Composed of
// candle ops it costs a scaled copy and an add of the output forward, the same two backward, a
// second gradient for x that candle then adds to the first, and a GradStore entry for each; here
// the adapter's product is accumulated into the base's output by the GEMM itself (α = s), and
// the backward gives dx, dA and dB with five GEMMs and no elementwise pass.
struct LoraLinear {
    /// The frozen base weight [out, in].
    w: Tensor,
    scale: f32,
}

impl LoraLinear {
    fn dims(&self, a: &Layout, b: &Layout) -> Result<(usize, usize, usize)> {
        let ((out_f, in_f), (r, in_a), (out_b, r_b)) = (self.w.dims2()?, a.shape().dims2()?, b.shape().dims2()?);
        if in_a != in_f || out_b != out_f || r_b != r {
            bail!("lora_linear: W {out_f}x{in_f}, A {r}x{in_a} and B {out_b}x{r_b} do not fit together");
        }
        Ok((out_f, in_f, r))
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "collm-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out_f, in_f, r) = self.dims(al, bl)?;
        let (x, a, b) = (slice(xs, xl)?, slice(as_, al)?, slice(bs, bl)?);
        let rows = x.len() / in_f;
        let mut y = with_weight(&self.w, |w| matmul_nt_w(x, rows, in_f, w, out_f))?;
        let xa = matmul_nt_thin(x, rows, in_f, a, r)?;
        // y += s · (x Aᵀ) Bᵀ: B [out, r] read as Bᵀ [r, out].
        gemm_into(&mut y, rows, out_f, r, &xa, (1, r), b, (r, 1), self.scale, true);
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out_f, in_f, r) = self.dims(a.layout(), b.layout())?;
        let dy = grad.reshape(((), out_f))?.contiguous()?;
        let rows = dy.dim(0)?;
        let s = self.scale;
        let want_dx = x.track_op();
        let (dx, da, db) = with_f32(x, |x| {
            with_f32(a, |a| {
                with_f32(b, |b| {
                    with_f32(&dy, |dy| {
                        let xa = matmul_nt_thin(x, rows, in_f, a, r)?;
                        // dB = s · dyᵀ (x Aᵀ) [out, r], computed as its transpose s · (x Aᵀ)ᵀ dy
                        // [r, out]: r rows fill more of the GEMM's tile than r columns would.
                        let mut dbt = gemm_f32(r, out_f, rows, &xa, (r, 1), dy, (1, out_f));
                        dbt.iter_mut().for_each(|v| *v *= s);
                        let db = transpose(&dbt, r, out_f);
                        // d(x Aᵀ) = s · dy B [rows, r], with B read as the rows of Bᵀ [r, out].
                        let mut dxa = matmul_nt_thin(dy, rows, out_f, &transpose(b, out_f, r), r)?;
                        dxa.iter_mut().for_each(|v| *v *= s);
                        // dA = d(x Aᵀ)ᵀ x [r, in].
                        let da = matmul_tn(&dxa, rows, r, x, in_f)?;
                        // dx = dy W + d(x Aᵀ) A, the second accumulated into the first.
                        let dx = if want_dx {
                            let mut dx = with_weight(&self.w, |w| matmul_nn_w(dy, rows, out_f, w, in_f))?;
                            gemm_into(&mut dx, rows, in_f, r, &dxa, (1, r), a, (1, in_f), 1.0, true);
                            Some(dx)
                        } else {
                            None
                        };
                        Ok::<_, candle_core::Error>((dx, da, db))
                    })
                })
            })
        })?????;
        let dev = x.device();
        let dx = dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev)).transpose()?;
        Ok((dx, Some(Tensor::from_vec(da, (r, in_f), dev)?), Some(Tensor::from_vec(db, (out_f, r), dev)?)))
    }
}

/// y = x Wᵀ + scale · (x Aᵀ) Bᵀ: a projection whose base weight W is frozen (no gradient, no
/// backward work for it) with a LoRA adapter A [rank, in], B [out, rank] that trains.
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let graph = x.track_op() || a.track_op() || b.track_op();
    // Sampling a few rows streams the weights through linear_nt's small path instead.
    let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
    if fused(x) && cpu_weight(w) && cpu_f32(a) && cpu_f32(b) && (graph || rows > SMALL_ROWS) {
        let op = LoraLinear { w: w.detach().contiguous()?, scale: scale as f32 };
        let (x, a, b) = (x.contiguous()?, a.contiguous()?, b.contiguous()?);
        return if graph { x.apply_op3(&a, &b, op) } else { x.apply_op3_no_bwd(&a, &b, &op) };
    }
    let y = frozen_linear(x, w)?;
    y + (linear_nt(&linear_nt(x, a)?, b)? * scale)?
}

/// A[m, k] · B[k, n] for two matrices: through collm's GEMM for f32 on the CPU, else candle's
/// matmul (no graph is recorded either way: this serves backward passes).
fn matmul_nn(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
    if k != k2 {
        bail!("matmul_nn: {m}x{k} · {k2}x{n} do not match");
    }
    if cpu_f32(a) && cpu_weight(b) {
        let c = with_f32(a, |xa| with_weight(b, |wb| matmul_nn_w(xa, m, k, wb, n)))??;
        return Tensor::from_vec(c, (m, n), a.device());
    }
    a.matmul(&b.to_dtype(a.dtype())?)
}

/// C[m, n] = A[k, m]^T · B[k, n] on row-major slices (a weight's gradient from the output
/// gradient and the input, summed over the k rows).
pub fn matmul_tn(a: &[f32], k: usize, m: usize, b: &[f32], n: usize) -> Result<Vec<f32>> {
    if a.len() != k * m || b.len() != k * n {
        bail!("matmul_tn: shapes do not match the data ({k}x{m} and {k}x{n})");
    }
    Ok(gemm_f32(m, n, k, a, (m, 1), b, (1, n)))
}

/// y = x W^T for x of any rank (the weight is shared across the leading dims).
pub fn linear_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out_f, in_f) = w.dims2()?;
    if fused(x) && w.dtype() == DType::F32 && w.device().is_cpu() && (x.track_op() || w.track_op()) {
        return x.contiguous()?.apply_op2(&w.contiguous()?, Linear);
    }
    let mut dims = x.dims().to_vec();
    let x2 = x.reshape(((), in_f))?;
    let rows = x2.dim(0)?;
    *dims.last_mut().unwrap() = out_f;
    // Few rows and no graph (sampling): stream each weight row once through dot products, which
    // is what decoding is bound by; a general GEMM would pack the whole weight matrix per call.
    if rows <= SMALL_ROWS && fused(x) && cpu_weight(w) && !x.track_op() && !w.track_op() {
        let y = with_f32(&x2, |xs| with_weight(w, |ws| matmul_nt_small_many(xs, rows, in_f, &[(ws, out_f)])))???.pop();
        return Tensor::from_vec(y.expect("one weight, one product"), dims, x.device());
    }
    if fused(x) && cpu_weight(w) && (w.dtype() == DType::F32 || !(x.track_op() || w.track_op())) {
        let y = with_f32(&x2, |xs| with_weight(w, |ws| matmul_nt_w(xs, rows, in_f, ws, out_f)))??;
        return Tensor::from_vec(y, dims, x.device());
    }
    // A bf16 model's product over many rows, on AMX tiles where the CPU has them: candle's bf16
    // matmul widens both operands to f32 and sums the (exact) products in f32, as the tiles do, in
    // another order.
    if x.dtype() == DType::BF16 && w.dtype() == DType::BF16 && x.device().is_cpu() && w.device().is_cpu() {
        if rows >= AMX_MIN_ROWS && fused_ops_on() && crate::amx::available() {
            return x2.contiguous()?.apply_op2(&w.contiguous()?, LinearBf16)?.reshape(dims);
        }
    }
    // A weight held in another dtype than the activations (a frozen bf16 base) is widened.
    let y = x2.matmul(&w.to_dtype(x2.dtype())?.t()?)?;
    y.reshape(dims)
}

/// From this many rows a bf16 model's `linear_nt` runs on AMX tiles (one block of A is 32 rows).
pub const AMX_MIN_ROWS: usize = 32;

/// x Wᵀ of a bf16 model, x [rows, in] and W [out, in] both bf16, on AMX tiles ([`crate::amx`]):
/// the operands widened to f32 (exact), multiplied in bf16 with f32 sums, the result rounded to
/// bf16; the backward's dx = dy W and dW = dyᵀ x the same way, each only for an input that
/// tracks a graph.
struct LinearBf16;

/// The f32 values of a contiguous bf16 CPU storage.
fn bf16_values(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let data = s.as_slice::<half::bf16>()?;
    let Some((a, b)) = l.contiguous_offsets() else { bail!("collm op: expected a contiguous bf16 tensor") };
    let mut out = Vec::new();
    widen_par(&data[a..b], &mut out);
    Ok(out)
}

/// C[m, n] = A·B on AMX tiles for f32 operands read through (row, column) strides, rounded to bf16.
fn amx_product(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
) -> Result<Vec<half::bf16>> {
    if !crate::amx::available() {
        bail!("amx product: this CPU has no AMX tiles");
    }
    let mut c = vec![0f32; m * n];
    // SAFETY: C holds m × n values; gemm_checked_with checks the strides against a and b.
    unsafe { gemm_checked_with(crate::sgemm::Kernel::AmxBf16, c.as_mut_ptr(), m, n, k, a, (a_cs, a_rs), b, (b_cs, b_rs), 1.0, false) };
    Ok(c.par_iter().map(|&v| half::bf16::from_f32(v)).collect())
}

impl CustomOp2 for LinearBf16 {
    fn name(&self) -> &'static str {
        "collm-linear-bf16"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out_f, in_f) = wl.shape().dims2()?;
        let (x, w) = (bf16_values(xs, xl)?, bf16_values(ws, wl)?);
        let y = amx_product(x.len() / in_f.max(1), out_f, in_f, &x, (in_f, 1), &w, (1, in_f))?;
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::BF16(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out_f, in_f) = w.dims2()?;
        let rows = grad.elem_count() / out_f.max(1);
        let dy = with_f32(grad, |g| g.to_vec())?;
        let dx = if x.track_op() {
            let wv = with_f32(w, |v| v.to_vec())?;
            Some(Tensor::from_vec(amx_product(rows, in_f, out_f, &dy, (out_f, 1), &wv, (in_f, 1))?, x.shape(), x.device())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let xv = with_f32(x, |v| v.to_vec())?;
            Some(Tensor::from_vec(amx_product(out_f, in_f, rows, &dy, (1, out_f), &xv, (in_f, 1))?, (out_f, in_f), w.device())?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// Up to this many rows, `linear_nt` without a graph uses [`matmul_nt_small`].
pub const SMALL_ROWS: usize = 16;

/// C[m, n] = A[m, k] · B[n, k]^T for small m: parallel over blocks of B's rows, each row read
/// once and dotted with every row of A (A stays in cache).
pub fn matmul_nt_small(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Result<Vec<f32>> {
    Ok(matmul_nt_small_many(a, m, k, &[(Weight::F32(b), n)])?.pop().expect("one weight, one product"))
}

/// [`matmul_nt_small`] of one A against several weights B_i [n_i, k] in one parallel region (a
/// decode step's q, k and v projections, or gate and up): one dispatch to the threads instead of
/// one per weight. Returns each C_i [m, n_i].
pub fn matmul_nt_small_many(a: &[f32], m: usize, k: usize, ws: &[(Weight, usize)]) -> Result<Vec<Vec<f32>>> {
    small_products(a, m, k, ws, true)
}

/// [`matmul_nt_small`] with the broadcast kernel allowed (where it applies) or not: the
/// benchmarks compare the two.
pub fn matmul_nt_small_with(broadcast: bool, a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Result<Vec<f32>> {
    Ok(small_products(a, m, k, &[(Weight::F32(b), n)], broadcast)?.pop().expect("one weight, one product"))
}

/// [`matmul_nt_small_many`], the broadcast kernel allowed or not.
fn small_products(a: &[f32], m: usize, k: usize, ws: &[(Weight, usize)], broadcast: bool) -> Result<Vec<Vec<f32>>> {
    if a.len() != m * k {
        bail!("matmul_nt_small: A holds {} values, not {m}x{k}", a.len());
    }
    if let Some((b, n)) = ws.iter().find(|(b, n)| b.len() != n * k) {
        bail!("matmul_nt_small: a weight of {} values is not {n}x{k}", b.len());
    }
    if m == 0 {
        return Ok(vec![vec![]; ws.len()]);
    }
    Ok(small_products_t(a, m, k, ws, broadcast)
        .into_iter()
        .zip(ws)
        .map(|(ct, &(_, n))| {
            if m == 1 {
                return ct;
            }
            transpose(&ct, n, m)
        })
        .collect())
}

/// The products of [`matmul_nt_small_many`] transposed: C_iᵀ = B_i · Aᵀ [n_i, m], each block of
/// 64 rows of B_i a task that streams those rows once against all of A (unchecked shapes).
fn small_products_t(a: &[f32], m: usize, k: usize, ws: &[(Weight, usize)], broadcast: bool) -> Vec<Vec<f32>> {
    const BLOCK: usize = 64;
    // Each block writes one contiguous run of the transposed product.
    let mut cts: Vec<Vec<f32>> = ws.iter().map(|&(_, n)| vec![0f32; n * m]).collect();
    let mut tasks: Vec<(Weight, &mut [f32])> = vec![];
    for (ct, &(b, _)) in cts.iter_mut().zip(ws) {
        for (blk, out) in ct.chunks_mut(BLOCK * m).enumerate() {
            let rows = out.len() / m;
            tasks.push((b.slice(blk * BLOCK * k..(blk * BLOCK + rows) * k), out));
        }
    }
    // The broadcast operand serves only the f32 weights' blocks.
    let any_f32 = ws.iter().any(|(w, _)| matches!(w, Weight::F32(_)));
    let at = if broadcast && any_f32 { broadcast_operand(a, m, k) } else { None };
    // A bf16 block is widened where it is used, into the task's own buffer (in cache).
    tasks.into_par_iter().for_each_init(Vec::new, |scratch, (w, out)| match w {
        Weight::F32(w) => small_block(a, m, k, w, out, at.as_deref()),
        Weight::Bf16(w) => small_block_bf16(a, m, k, w, out, scratch),
    });
    cts
}

/// From this many rows of A, the small-row products broadcast the weights instead of dotting
/// rows (on a CPU with AVX-512F). On the Xeon (family 6 model 167), products of 16 rows with 60
/// SmolLM2 up-projections streamed from memory ran about 20% faster broadcast; at 8 rows the
/// dot products were about 10% faster.
const BROADCAST_ROWS: usize = 12;

/// Aᵀ with its rows padded to 16 lanes ([k, 16]), the operand of [`bcast_8_avx512`], where the
/// CPU has AVX-512F and A has from [`BROADCAST_ROWS`] to 16 rows.
fn broadcast_operand(a: &[f32], m: usize, k: usize) -> Option<Vec<f32>> {
    if !(BROADCAST_ROWS..=16).contains(&m) || k == 0 || !crate::sgemm::has_avx512() {
        return None;
    }
    let mut at = vec![0f32; k * 16];
    for (i, row) in a.chunks_exact(k).enumerate() {
        for (kk, &v) in row.iter().enumerate() {
            at[kk * 16 + i] = v;
        }
    }
    Some(at)
}

/// X[rows, k] · Aᵀ for a thin A [r, k] (a LoRA adapter's down-projection, or Bᵀ in its backward):
/// for r ≤ [`SMALL_ROWS`] each row of X is streamed once against all of A, which stays in cache;
/// the packed GEMM would pad r to its 32-column panel and pack all of X to use a quarter of it.
pub fn matmul_nt_thin(x: &[f32], rows: usize, k: usize, a: &[f32], r: usize) -> Result<Vec<f32>> {
    if x.len() != rows * k || a.len() != r * k {
        bail!("matmul_nt_thin: X holds {} values and A {}, not {rows}x{k} and {r}x{k}", x.len(), a.len());
    }
    if r == 0 || r > SMALL_ROWS {
        return Ok(matmul_nt(x, rows, k, a, r));
    }
    Ok(small_products_t(a, r, k, &[(Weight::F32(x), rows)], true).pop().expect("one operand, one product"))
}

/// The transpose [cols, rows] of a row-major [rows, cols] matrix.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    if t.is_empty() {
        return t;
    }
    for (i, row) in x.chunks_exact(cols).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * rows + i] = v;
        }
    }
    t
}

/// out[j, i] = A[i] · W[j] for the rows of one block of W.
fn small_block(a: &[f32], m: usize, k: usize, w: &[f32], out: &mut [f32], at: Option<&[f32]>) {
    let rows = out.len() / m;
    let mut jj = 0;
    #[cfg(target_arch = "x86_64")]
    if let Some(at) = at {
        while jj + 8 <= rows {
            // SAFETY: `at` exists only where the CPU has AVX-512F, and holds k×16 values; w holds
            // rows jj..jj+8 of k values and out rows jj..jj+8 of m ≤ 16.
            unsafe { bcast_8_avx512(at, k, &w[jj * k..(jj + 8) * k], &mut out[jj * m..(jj + 8) * m], m) };
            jj += 8;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
    jj = dot_rows(a, m, k, w, out, jj);
    for (jr, o) in out.chunks_mut(m).enumerate().skip(jj) {
        let row = &w[jr * k..(jr + 1) * k];
        for (i, oi) in o.iter_mut().enumerate() {
            *oi = dot(&a[i * k..(i + 1) * k], row);
        }
    }
}

/// [`small_block`] for a bf16 block: the dot kernels widen it in registers; the last rows (fewer
/// than four) are widened into `scratch`.
fn small_block_bf16(a: &[f32], m: usize, k: usize, w: &[half::bf16], out: &mut [f32], scratch: &mut Vec<f32>) {
    let jj = dot_rows(a, m, k, w, out, 0);
    for (jr, o) in out.chunks_mut(m).enumerate().skip(jj) {
        let row = Weight::Bf16(&w[jr * k..(jr + 1) * k]);
        let row = row.as_f32(scratch);
        for (i, oi) in o.iter_mut().enumerate() {
            *oi = dot(&a[i * k..(i + 1) * k], row);
        }
    }
}

/// out[j, i] = A[i] · W[j] for the rows of W from `jj` on, with the AVX2 dot kernels (where the
/// CPU has them); returns the first row left undone. Each product sums in one order whatever the
/// kernel: the pairs of rows of A one accumulator each, the odd last row two (see `dot_1x1_avx2`).
///
/// Up to [`ROW_ORDER_ROWS`] rows of A, the rows of W are taken one after another, each against
/// every row of A, so a block of W streams from memory in address order: one stream that the
/// prefetchers follow from row to row, and that the kernels prefetch [`ROW_PREFETCH`] elements
/// ahead of. From more rows of A on, four rows of W interleave against pairs of rows of A, which
/// takes fewer loads per FMA where loads, not memory, are the bound.
fn dot_rows<T: WElem>(a: &[f32], m: usize, k: usize, w: &[T], out: &mut [f32], mut jj: usize) -> usize {
    let rows = out.len() / m;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        let even = m & !1;
        if m <= ROW_ORDER_ROWS {
            for (j, o) in out.chunks_mut(m).enumerate().skip(jj) {
                let wr = &w[j * k..(j + 1) * k];
                let mut i = 0;
                while i + 4 <= even {
                    // SAFETY: the CPU has AVX2 and FMA; A's rows i..i+4 and W's row j hold k values each.
                    o[i..i + 4].copy_from_slice(&unsafe { dot_mx1_avx2::<T, 4>(&a[i * k..(i + 4) * k], wr, k) });
                    i += 4;
                }
                if i < even {
                    // SAFETY: as above, rows i..i+2 of A.
                    o[i..i + 2].copy_from_slice(&unsafe { dot_mx1_avx2::<T, 2>(&a[i * k..(i + 2) * k], wr, k) });
                    i += 2;
                }
                if i < m {
                    // SAFETY: as above, the last row of A.
                    o[i] = unsafe { dot_1x1_avx2(&a[i * k..(i + 1) * k], wr, k) };
                }
            }
            return rows;
        }
        while jj + 4 <= rows {
            let w4 = &w[jj * k..(jj + 4) * k];
            let mut i = 0;
            while i < even {
                // SAFETY: the CPU has AVX2 and FMA; the slices hold 2 and 4 rows of k values.
                let r = unsafe { dot_2x4_avx2(&a[i * k..(i + 2) * k], w4, k, i == 0) };
                for q in 0..4 {
                    out[(jj + q) * m + i] = r[q];
                    out[(jj + q) * m + i + 1] = r[4 + q];
                }
                i += 2;
            }
            if i < m {
                // The odd row of A against the four rows of W, in cache after the pairs.
                for q in 0..4 {
                    // SAFETY: as above; the rows of A and W hold k values.
                    out[(jj + q) * m + i] = unsafe { dot_1x1_avx2(&a[i * k..(i + 1) * k], &w4[q * k..(q + 1) * k], k) };
                }
            }
            jj += 4;
        }
    }
    jj
}

/// Up to this many rows of A (decoding at batch 1 to 4; the trainer samples 4 rows per agent
/// on a core of its own), the small-row products take the rows of W in address order. On the
/// 2-core AMD EPYC (Zen 4, family 25 model 17), one thread, criterion `decode_step`: batch 1
/// 66–69 → 40–50 ms and batch 4 75–88 → 64–74 ms this way, batch 8 100–108 → 119–120 ms
/// (slower: there the loads per FMA bound it). A C loop of these instructions over a 566 MB
/// matrix of 576-wide rows read 20–22 GB/s with one row of A (the machine's plain streaming sum
/// on one thread) and 12–15 GB/s with four, against 12–14 and 8.5–9.3 GB/s with four rows of W
/// interleaved.
const ROW_ORDER_ROWS: usize = 4;

/// How far ahead along W (in elements: 4 KiB of f32, 2 KiB of bf16) the row-order kernels
/// prefetch, one line per step of 16. A block of W spans many 4 KiB pages, and a hardware
/// prefetcher that follows a stream stops at each page's end and starts again on the next;
/// the software prefetch runs ahead across them. On the 2-core Intel Xeon (family 6 model 207,
/// KVM), criterion `decode_step`, alternating binaries: batch 1 on two threads 32.2–38.2 →
/// 28.6–33.4 ms, batch 4 on one thread 89.4 and 107.6 → 73.5 and 78.6 ms; 512 and 2048
/// elements were no better. The products are the same to the bit (a prefetch reads nothing
/// into a register).
const ROW_PREFETCH: usize = 1024;

/// Σ a_i b_i, with AVX2/FMA when the CPU has them.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// A weight element the dot kernels read: f32, or bf16 widened in registers (a frozen base held
/// in bf16 streams half the bytes per decode step).
trait WElem: Copy + Send + Sync {
    const BF16: bool;
    fn f32(self) -> f32;
}

impl WElem for f32 {
    const BF16: bool = false;
    fn f32(self) -> f32 {
        self
    }
}

impl WElem for half::bf16 {
    const BF16: bool = true;
    fn f32(self) -> f32 {
        widen(self)
    }
}

/// Eight weight elements from `p` as eight f32 lanes (inside an AVX2 kernel).
#[cfg(target_arch = "x86_64")]
macro_rules! load8 {
    ($t:ty, $p:expr) => {
        if <$t as WElem>::BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128($p as *const __m128i))))
        } else {
            _mm256_loadu_ps($p as *const f32)
        }
    };
}

/// Dots of 2 rows of `a` with 4 rows of `w` (each k long), sharing every load: returns
/// [a0·w0, a0·w1, a0·w2, a0·w3, a1·w0, …].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_2x4_avx2<T: WElem>(a: &[f32], w: &[T], k: usize, prefetch: bool) -> [f32; 8] {
    use std::arch::x86_64::*;
    let (a0, a1) = (a.as_ptr(), a.as_ptr().add(k));
    let wp = [w.as_ptr(), w.as_ptr().add(k), w.as_ptr().add(2 * k), w.as_ptr().add(3 * k)];
    let mut acc = [_mm256_setzero_ps(); 8];
    let mut i = 0;
    while i + 8 <= k {
        let x0 = _mm256_loadu_ps(a0.add(i));
        let x1 = _mm256_loadu_ps(a1.add(i));
        for q in 0..4 {
            if prefetch {
                // The same place eight rows on (the next blocks of rows): a hint, never dereferenced.
                _mm_prefetch::<_MM_HINT_T0>(wp[q].wrapping_add(8 * k + i) as *const i8);
            }
            let y = load8!(T, wp[q].add(i));
            acc[q] = _mm256_fmadd_ps(x0, y, acc[q]);
            acc[4 + q] = _mm256_fmadd_ps(x1, y, acc[4 + q]);
        }
        i += 8;
    }
    let mut out = [0f32; 8];
    for (o, v) in out.iter_mut().zip(acc) {
        *o = hsum8(v);
    }
    while i < k {
        for q in 0..4 {
            out[q] += *a0.add(i) * (*wp[q].add(i)).f32();
            out[4 + q] += *a1.add(i) * (*wp[q].add(i)).f32();
        }
        i += 1;
    }
    out
}

/// Dots of M rows of `a` (each k long) with one row of `w`, sharing each load of it: one
/// accumulator of eight lanes per row of A, reduced as [`hsum8`] does, then the last k mod 8
/// products added one by one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_mx1_avx2<T: WElem, const M: usize>(a: &[f32], w: &[T], k: usize) -> [f32; M] {
    use std::arch::x86_64::*;
    let (a0, w0) = (a.as_ptr(), w.as_ptr());
    let mut acc = [_mm256_setzero_ps(); M];
    let mut i = 0;
    while i + 8 <= k {
        if i % 16 == 0 {
            // A hint, never a fault: an address past W's end is not read (hence wrapping_add).
            _mm_prefetch::<_MM_HINT_T0>(w0.wrapping_add(i + ROW_PREFETCH) as *const i8);
        }
        let y = load8!(T, w0.add(i));
        for (r, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(a0.add(r * k + i)), y, *acc);
        }
        i += 8;
    }
    let mut out = [0f32; M];
    for (o, v) in out.iter_mut().zip(acc) {
        *o = hsum8(v);
    }
    while i < k {
        for (r, o) in out.iter_mut().enumerate() {
            *o += *a0.add(r * k + i) * (*w0.add(i)).f32();
        }
        i += 1;
    }
    out
}

/// The sum of eight lanes: upper half plus lower, then pairwise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hsum8(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let s = _mm_hadd_ps(s, s);
    _mm_cvtss_f32(_mm_hadd_ps(s, s))
}

/// out[r, i] = W[r] · A[i] for 8 rows of W and up to 16 rows of A, given as Aᵀ padded to 16
/// lanes (`at`, [k, 16]): each weight value is broadcast against the 16 rows' values at its depth,
/// 8 weight rows at a time (one load of Aᵀ and 8 broadcasts per 8 FMAs, no reductions). Dotting
/// rows instead costs three loads per two FMAs and a horizontal sum per output.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bcast_8_avx512(at: &[f32], k: usize, w: &[f32], out: &mut [f32], m: usize) {
    use std::arch::x86_64::*;
    let wp: [*const f32; 8] = std::array::from_fn(|r| w.as_ptr().add(r * k));
    // Sums of blocks of 64 depths added into the total, so no value passes through a chain of
    // more than 64 + k/64 roundings (a dot product's eight lanes have k/8).
    const BLOCK: usize = 64;
    let mut total = [_mm512_setzero_ps(); 8];
    let mut k0 = 0;
    while k0 < k {
        let mut acc = [_mm512_setzero_ps(); 8];
        for kk in k0..(k0 + BLOCK).min(k) {
            let x = _mm512_loadu_ps(at.as_ptr().add(kk * 16));
            if kk % 16 == 0 {
                for p in wp {
                    // The same place eight rows on (the next group): a hint, never dereferenced.
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(8 * k + kk) as *const i8);
                }
            }
            for r in 0..8 {
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(*wp[r].add(kk)), x, acc[r]);
            }
        }
        for (t, a) in total.iter_mut().zip(acc) {
            *t = _mm512_add_ps(*t, a);
        }
        k0 += BLOCK;
    }
    let mask = ((1u32 << m) - 1) as __mmask16;
    for (r, v) in total.into_iter().enumerate() {
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(r * m), mask, v);
    }
}

/// The dot of one row of `a` with one row of `w` (k long): two accumulators of eight lanes (the
/// even and odd steps of 16; a last step of 8 into the first), added and reduced as [`hsum8`]
/// does, then the last k mod 8 products one by one. Two chains of FMAs keep one row's loads
/// ahead of the memory it streams from (batch-1 decoding).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_1x1_avx2<T: WElem>(a: &[f32], w: &[T], k: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a0, w0) = (a.as_ptr(), w.as_ptr());
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= k {
        // A hint, as in dot_mx1_avx2.
        _mm_prefetch::<_MM_HINT_T0>(w0.wrapping_add(i + ROW_PREFETCH) as *const i8);
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0.add(i)), load8!(T, w0.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a0.add(i + 8)), load8!(T, w0.add(i + 8)), acc1);
        i += 16;
    }
    if i + 8 <= k {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0.add(i)), load8!(T, w0.add(i)), acc0);
        i += 8;
    }
    let mut out = hsum8(_mm256_add_ps(acc0, acc1));
    while i < k {
        out += *a0.add(i) * (*w0.add(i)).f32();
        i += 1;
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut acc2 = _mm256_setzero_ps();
    let mut acc3 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 32 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 16)), _mm256_loadu_ps(pb.add(i + 16)), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 24)), _mm256_loadu_ps(pb.add(i + 24)), acc3);
        i += 32;
    }
    while i + 8 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        i += 8;
    }
    let mut total = hsum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    while i < n {
        total += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    total
}

// ---------------------------------------------------------------------------------------------
// Fused attention: o = softmax(scale · q kᵀ + mask) v, computed block by block of query rows so
// that no [q_len, k_len] matrix outlives its block. The backward recomputes each block's
// probabilities from q and k instead of keeping them: memory O(len · head_dim) per layer, not
// O(len²), which is what lets long multi-turn histories train (a 2,600-token joint history held
// 14 GB of attention matrices across SmolLM2's 30 layers). Causality also skips the masked keys.

/// Query rows per block.
const ATTN_BLOCK: usize = 64;

/// C = beta·C + alpha·A·B for strided row-major views (rs: row stride, cs: column stride).
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: usize,
    accumulate: bool,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    alpha: f32,
) {
    crate::sgemm::gemm(
        m,
        n,
        k,
        c,
        c_rs,
        accumulate,
        crate::sgemm::View { ptr: a, rs: a_rs, cs: a_cs },
        crate::sgemm::View { ptr: b, rs: b_rs, cs: b_cs },
        alpha,
        false,
    )
}

struct FusedAttention {
    mask: AttnMask,
    scale: f32,
    /// Query positions per group row block: rows are [n_rep heads × q_len] within a kv group.
    q_len: usize,
}

/// One unit of work: batch row, kv group, and a block of query rows of one head.
#[derive(Clone, Copy)]
struct AttnBlock {
    pair: usize,
    row0: usize,
    rows: usize,
    /// Keys the block's rows may see (the rest are masked by causality).
    keys: usize,
}

impl FusedAttention {
    fn blocks(&self, pairs: usize, group_rows: usize) -> Vec<AttnBlock> {
        let past = self.mask.k_len - self.q_len;
        let mut out = vec![];
        for pair in 0..pairs {
            for head0 in (0..group_rows).step_by(self.q_len) {
                for q0 in (0..self.q_len).step_by(ATTN_BLOCK) {
                    let rows = ATTN_BLOCK.min(self.q_len - q0);
                    out.push(AttnBlock { pair, row0: head0 + q0, rows, keys: past + q0 + rows });
                }
            }
        }
        out
    }

    /// The block's probabilities [rows, keys] (softmax of scale · q kᵀ + mask).
    fn probs(&self, blk: AttnBlock, groups: usize, q: &[f32], k: &[f32], hd: usize, group_rows: usize) -> Vec<f32> {
        let (kl, n) = (self.mask.k_len, blk.keys);
        let qo = (blk.pair * group_rows + blk.row0) * hd;
        let ko = blk.pair * kl * hd;
        let mut s = vec![0f32; blk.rows * n];
        // SAFETY: the views stay inside q [rows, hd], k [n, hd] and s [rows, n].
        unsafe { sgemm(blk.rows, n, hd, s.as_mut_ptr(), n, false, q[qo..].as_ptr(), hd, 1, k[ko..].as_ptr(), 1, hd, self.scale) };
        let b = blk.pair / groups;
        for (i, row) in s.chunks_mut(n).enumerate() {
            let qpos = (blk.row0 + i) % self.q_len;
            let m = &self.mask.data[(b * self.q_len + qpos) * kl..(b * self.q_len + qpos) * kl + n];
            let mut max = f32::NEG_INFINITY;
            for (x, mj) in row.iter_mut().zip(m) {
                *x += mj;
                max = max.max(*x);
            }
            let inv = 1.0 / exp_shift_sum(row, max);
            row.iter_mut().for_each(|x| *x *= inv);
        }
        s
    }
}

fn dims4(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    match l.dims() {
        &[a, b, c, d] => Ok((a, b, c, d)),
        d => bail!("fused attention: expected a rank-4 tensor, got {d:?}"),
    }
}

impl candle_core::CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "collm-fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (b, g, r, hd) = dims4(l1)?;
        let (_, _, kl, _) = dims4(l2)?;
        if kl != self.mask.k_len || r % self.q_len != 0 || b != self.mask.batch {
            bail!(
                "fused attention: q {:?} / k {:?} do not match the mask [{}, {}, {}]",
                l1.dims(),
                l2.dims(),
                self.mask.batch,
                self.q_len,
                kl
            );
        }
        let blocks = self.blocks(b * g, r);
        let outs: Vec<Vec<f32>> = blocks
            .par_iter()
            .map(|&blk| {
                let p = self.probs(blk, g, q, k, hd, r);
                let mut o = vec![0f32; blk.rows * hd];
                let vo = blk.pair * kl * hd;
                // SAFETY: p [rows, keys], v [keys, hd], o [rows, hd].
                unsafe { sgemm(blk.rows, hd, blk.keys, o.as_mut_ptr(), hd, false, p.as_ptr(), blk.keys, 1, v[vo..].as_ptr(), hd, 1, 1.0) };
                o
            })
            .collect();
        let mut out = vec![0f32; b * g * r * hd];
        for (blk, o) in blocks.iter().zip(outs) {
            let at = (blk.pair * r + blk.row0) * hd;
            out[at..at + o.len()].copy_from_slice(&o);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, g, r, hd) = q.dims4()?;
        let kl = k.dim(2)?;
        let blocks = self.blocks(b * g, r);
        let (dq, dk, dv) = with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(grad, |go| {
                        // Each block: its dq rows, and partial dk, dv over the keys it sees.
                        let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = blocks
                            .par_iter()
                            .map(|&blk| {
                                let n = blk.keys;
                                let mut p = self.probs(blk, g, q, k, hd, r);
                                let qo = (blk.pair * r + blk.row0) * hd;
                                let ko = blk.pair * kl * hd;
                                let mut dp = vec![0f32; blk.rows * n];
                                let mut dq = vec![0f32; blk.rows * hd];
                                let mut dk = vec![0f32; n * hd];
                                let mut dv = vec![0f32; n * hd];
                                // SAFETY (all calls): each view stays inside its buffer as sized here.
                                unsafe {
                                    // dV = Pᵀ dO
                                    sgemm(n, hd, blk.rows, dv.as_mut_ptr(), hd, false, p.as_ptr(), 1, n, go[qo..].as_ptr(), hd, 1, 1.0);
                                    // dP = dO Vᵀ
                                    sgemm(
                                        blk.rows,
                                        n,
                                        hd,
                                        dp.as_mut_ptr(),
                                        n,
                                        false,
                                        go[qo..].as_ptr(),
                                        hd,
                                        1,
                                        v[ko..].as_ptr(),
                                        1,
                                        hd,
                                        1.0,
                                    );
                                }
                                // dS = P ⊙ (dP − rowsum(P ⊙ dP)), kept in p.
                                for (pr, dpr) in p.chunks_mut(n).zip(dp.chunks(n)) {
                                    let dot: f32 = pr.iter().zip(dpr).map(|(a, b)| a * b).sum();
                                    pr.iter_mut().zip(dpr).for_each(|(a, b)| *a *= b - dot);
                                }
                                unsafe {
                                    // dQ = scale · dS K ;  dK = scale · dSᵀ Q
                                    sgemm(
                                        blk.rows,
                                        hd,
                                        n,
                                        dq.as_mut_ptr(),
                                        hd,
                                        false,
                                        p.as_ptr(),
                                        n,
                                        1,
                                        k[ko..].as_ptr(),
                                        hd,
                                        1,
                                        self.scale,
                                    );
                                    sgemm(
                                        n,
                                        hd,
                                        blk.rows,
                                        dk.as_mut_ptr(),
                                        hd,
                                        false,
                                        p.as_ptr(),
                                        1,
                                        n,
                                        q[qo..].as_ptr(),
                                        hd,
                                        1,
                                        self.scale,
                                    );
                                }
                                (dq, dk, dv)
                            })
                            .collect();
                        // Sum the partials in block order, so the result does not depend on scheduling.
                        let mut dq = vec![0f32; b * g * r * hd];
                        let mut dk = vec![0f32; b * g * kl * hd];
                        let mut dv = vec![0f32; b * g * kl * hd];
                        for (blk, (pq, pk, pv)) in blocks.iter().zip(parts) {
                            let at = (blk.pair * r + blk.row0) * hd;
                            dq[at..at + pq.len()].copy_from_slice(&pq);
                            let ko = blk.pair * kl * hd;
                            dk[ko..ko + pk.len()].iter_mut().zip(&pk).for_each(|(a, b)| *a += b);
                            dv[ko..ko + pv.len()].iter_mut().zip(&pv).for_each(|(a, b)| *a += b);
                        }
                        (dq, dk, dv)
                    })
                })
            })
        })????;
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), q.device())?),
            Some(Tensor::from_vec(dk, k.shape(), k.device())?),
            Some(Tensor::from_vec(dv, v.shape(), v.device())?),
        ))
    }
}

/// softmax(scale · q kᵀ + mask) v for q [b, groups, n_rep · q_len, hd] (the query heads that
/// share a key/value head, stacked) and k, v [b, groups, k_len, hd]. On CPU in f32 this is the
/// fused, memory-lean op above; on a CUDA device with the attention kernel switched on, its
/// kernel ([`crate::cuda`]); elsewhere the plain composition.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor> {
    if fused(q) {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        return q.apply_op3(&k, &v, FusedAttention { mask: mask.clone(), scale, q_len: mask.q_len });
    }
    if let Some(o) = crate::cuda::attention(q, k, v, mask, scale)? {
        return Ok(o);
    }
    attention_unfused(q, k, v, mask, scale)
}

/// The same attention through separate ops (scores, masked softmax, weighted sum).
pub fn attention_unfused(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor> {
    let scores = q.matmul(&k.t()?)?;
    attn_softmax(&scores, mask, scale)?.matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bf16 model's projection on AMX tiles (from AMX_MIN_ROWS rows) against candle's bf16
    /// matmul (the generic path): the output and both gradients agree to bf16's rounding (both
    /// sum exact products in f32, in different orders, then round to bf16), and an input that
    /// tracks no graph gets no gradient.
    #[test]
    fn a_bf16_projection_on_amx_tiles_equals_candles_bf16_matmul() {
        if !crate::amx::available() {
            eprintln!("this CPU or OS has no AMX bf16 tiles: a bf16 model's projections take candle's matmul here");
            return;
        }
        let dev = candle_core::Device::Cpu;
        let val = |i: usize, s: usize| (((i * 7919 + s * 104729) % 2003) as f32 / 1001.0) - 1.0;
        let (rows, in_f, out_f) = (70, 96, 40);
        let x = candle_core::Var::from_vec((0..rows * in_f).map(|i| half::bf16::from_f32(val(i, 1))).collect(), (2, rows / 2, in_f), &dev)
            .unwrap();
        let w = candle_core::Var::from_vec((0..out_f * in_f).map(|i| half::bf16::from_f32(val(i, 2) * 0.1)).collect(), (out_f, in_f), &dev)
            .unwrap();
        let r = Tensor::from_vec((0..rows * out_f).map(|i| half::bf16::from_f32(val(i, 3))).collect(), (2, rows / 2, out_f), &dev).unwrap();
        let run = || {
            let y = linear_nt(x.as_tensor(), w.as_tensor()).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (f(&y), f(g.get(x.as_tensor()).unwrap()), f(g.get(w.as_tensor()).unwrap()))
        };
        let (y, dx, dw) = run();
        let (y0, dx0, dw0) = with_generic_ops(run);
        for (what, got, want) in [("y", &y, &y0), ("dx", &dx, &dx0), ("dw", &dw, &dw0)] {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (g, e)) in got.iter().zip(want.iter()).enumerate() {
                assert!((g - e).abs() <= 2f32.powi(-7) * e.abs() + 1e-3 * scale, "{what}[{i}]: {g} vs {e}");
            }
        }
        // A frozen weight (no graph) gets no gradient; x still does.
        let wf = w.as_tensor().detach();
        let y = linear_nt(x.as_tensor(), &wf).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some() && g.get(&wf).is_none());
    }

    /// A bf16 weight's products, widened a block of rows at a time, against the f32 products on
    /// the widened weight: the forward x·Wᵀ (written and accumulated) and the backward dy·W over
    /// several blocks and a ragged last one, and the small-row products' blocks; no rows, one row
    /// (decoding), and a count of rows in the broadcast kernel's range.
    #[test]
    fn bf16_weight_products_equal_the_f32_ones_on_its_values() {
        let val = |i: usize, s: usize| ((i * 37 + s * 101) % 97) as f32 / 48.0 - 1.0;
        let shapes = [
            (3, 40, 2 * widen_rows(40) + 77),
            (9, 17, widen_rows(17)),
            (2, 5, 3),
            (0, 40, 100),
            (1, 576, 2 * widen_rows(576) + 5),
            (13, 33, 70),
        ];
        for (m, k, n) in shapes {
            let wb: Vec<half::bf16> = (0..n * k).map(|i| half::bf16::from_f32(val(i, 1))).collect();
            let wf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let x: Vec<f32> = (0..m * k).map(|i| val(i, 2)).collect();
            let dy: Vec<f32> = (0..m * n).map(|i| val(i, 3)).collect();
            let close = |a: &[f32], b: &[f32], what: &str| {
                assert_eq!(a.len(), b.len(), "{what}");
                // Relative to the largest value (at least 1): dy·W over tens of thousands of rows
                // sums the blocks' products in another order than one GEMM, and at k = 576 the
                // sums are large enough that 1e-5 is under one f32 step.
                let scale = b.iter().fold(1f32, |s, v| s.max(v.abs()));
                let d = a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
                assert!(d < 1e-5, "{what} ({m}x{k}, {n} rows): differs by {d} (relative)");
            };
            close(&matmul_nt_w(&x, m, k, Weight::Bf16(&wb), n), &matmul_nt(&x, m, k, &wf, n), "x·Wᵀ");
            let mut acc = dy.clone();
            xwt_into(&mut acc, &x, m, k, Weight::Bf16(&wb), n, true);
            let want: Vec<f32> = matmul_nt(&x, m, k, &wf, n).iter().zip(&dy).map(|(a, b)| a + b).collect();
            close(&acc, &want, "C + x·Wᵀ");
            close(&matmul_nn_w(&dy, m, n, Weight::Bf16(&wb), k), &matmul_nn_w(&dy, m, n, Weight::F32(&wf), k), "dy·W");
            let small = matmul_nt_small_many(&x, m, k, &[(Weight::Bf16(&wb), n), (Weight::F32(&wf), n)]).unwrap();
            close(&small[0], &small[1], "small-row x·Wᵀ");
        }
    }

    /// The small-row products (decoding's projections) against f64 sums: every path of the
    /// kernels (pairs of rows, the odd row's four-row dots, the leftover weight rows, k around
    /// the 8- and 16-wide steps) and several weights in one dispatch.
    #[test]
    fn small_row_products_match_f64() {
        let val = |i: usize, s: usize| ((i * 37 + s * 101) % 97) as f32 / 48.0 - 1.0;
        // Rows of A: one (batch-1 decoding), the two-row kernel's pairs and remainder, and the
        // broadcast kernel's range (12 to 16 rows on a CPU with AVX-512F).
        // Depths: ragged vector tails, and the broadcast kernel's blocks of 64 (whole and ragged).
        for m in [1, 2, 3, 5, 12, 13, 16] {
            for k in [1, 7, 8, 15, 16, 17, 33, 100, 576] {
                let a: Vec<f32> = (0..m * k).map(|i| val(i, 1)).collect();
                // 70 and 134: rows past the broadcast kernel's groups of 8 that the 4-row dot
                // kernel takes, then single rows.
                let ns = [1usize, 3, 4, 5, 64, 65, 70, 130, 134];
                let ws: Vec<Vec<f32>> = ns.iter().enumerate().map(|(w, &n)| (0..n * k).map(|i| val(i, w + 2)).collect()).collect();
                let pairs: Vec<(Weight, usize)> = ws.iter().zip(ns).map(|(w, n)| (Weight::F32(&w[..]), n)).collect();
                let got = matmul_nt_small_many(&a, m, k, &pairs).unwrap();
                for ((c, w), n) in got.iter().zip(&ws).zip(ns) {
                    assert_eq!(c.len(), m * n);
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..k).map(|x| a[i * k + x] as f64 * w[j * k + x] as f64).sum();
                            let d = (c[i * n + j] as f64 - want).abs();
                            assert!(
                                d <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                                "m {m} k {k} n {n}: C[{i},{j}] {} vs {want}",
                                c[i * n + j]
                            );
                        }
                    }
                }
                assert_eq!(matmul_nt_small(&a, m, k, &ws[4], 64).unwrap(), got[4]);
                // The dot-product kernel alone, where the broadcast one takes these rows.
                let dots = matmul_nt_small_with(false, &a, m, k, &ws[7], 130).unwrap();
                for (x, y) in dots.iter().zip(&got[7]) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()) * (k as f32).sqrt(), "m {m} k {k}: dot {x} vs {y}");
                }
                // The thin product X Aᵀ is the transpose of A Xᵀ.
                let thin = matmul_nt_thin(&ws[7], 130, k, &a, m).unwrap();
                assert_eq!(thin, transpose(&got[7], m, 130), "thin product, m {m} k {k}");
            }
        }
        // No depth: zeros, whichever kernel the rows would take.
        for m in [1, 12, 16] {
            assert_eq!(matmul_nt_small(&[], m, 0, &[], 5).unwrap(), vec![0.0; m * 5]);
        }
        assert!(matmul_nt_small_many(&[1.0; 6], 2, 3, &[(Weight::F32(&[1.0; 5]), 2)]).is_err());
        assert!(matmul_nt_thin(&[1.0; 6], 2, 3, &[1.0; 5], 2).is_err());
    }

    /// The dot kernels' summation order, in scalar code: eight lanes of fused multiply-adds in
    /// steps of 8 (with `two`, the steps of 16 split over two accumulators, a last step of 8
    /// into the first, then the two added), the lanes reduced as `hsum8` does (upper half plus
    /// lower, then pairwise), the last k mod 8 products added one by one.
    #[cfg(target_arch = "x86_64")]
    fn dot_in_kernel_order<T: WElem>(a: &[f32], w: &[T], two: bool) -> f32 {
        let k = a.len();
        let (mut acc0, mut acc1) = ([0f32; 8], [0f32; 8]);
        let mut i = 0;
        while i + if two { 16 } else { 8 } <= k {
            for l in 0..8 {
                acc0[l] = a[i + l].mul_add(w[i + l].f32(), acc0[l]);
            }
            if two {
                for l in 0..8 {
                    acc1[l] = a[i + 8 + l].mul_add(w[i + 8 + l].f32(), acc1[l]);
                }
                i += 8;
            }
            i += 8;
        }
        if two && i + 8 <= k {
            for l in 0..8 {
                acc0[l] = a[i + l].mul_add(w[i + l].f32(), acc0[l]);
            }
            i += 8;
        }
        let v: Vec<f32> = (0..8).map(|l| if two { acc0[l] + acc1[l] } else { acc0[l] }).collect();
        let h: Vec<f32> = (0..4).map(|j| v[j + 4] + v[j]).collect();
        let mut out = (h[0] + h[1]) + (h[2] + h[3]);
        for x in i..k {
            out += a[x] * w[x].f32();
        }
        out
    }

    /// The small-row dot kernels (decoding's projections, the rows of W in address order) give
    /// each product in the order `dot_in_kernel_order` spells out, to the bit: the pairs of rows
    /// of A one accumulator each, the odd last row two; f32 and bf16 weights, 1 to 9 rows (both
    /// the row-order kernels and the interleaved ones), k around the 8- and 16-wide steps, from a
    /// first row of W past 0. The interleaved kernels are the ones decoding always had, so the
    /// row-order kernels give the tokens it gave.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_dot_kernels_sum_in_the_order_they_document() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        let val = |i: usize, s: usize| ((i * 37 + s * 101) % 97) as f32 / 48.0 - 1.0;
        for m in 1..=9 {
            for k in [1, 7, 8, 15, 16, 17, 24, 33, 576] {
                // Rows 1..9 of W: two groups of four for the interleaved kernels.
                let n = 9;
                let a: Vec<f32> = (0..m * k).map(|i| val(i, 1)).collect();
                let w: Vec<f32> = (0..n * k).map(|i| val(i, 2) * 1.37).collect();
                let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
                let want = |wr: &dyn Fn(usize) -> f32, j: usize, i: usize| {
                    let two = m % 2 == 1 && i == m - 1;
                    let row: Vec<f32> = (0..k).map(|x| wr(j * k + x)).collect();
                    dot_in_kernel_order(&a[i * k..(i + 1) * k], &row, two)
                };
                let (mut got, mut got_b) = (vec![f32::NAN; n * m], vec![f32::NAN; n * m]);
                assert_eq!(dot_rows(&a, m, k, &w, &mut got, 1), n);
                assert_eq!(dot_rows(&a, m, k, &wb, &mut got_b, 1), n);
                for j in 0..n {
                    for i in 0..m {
                        let (g, gb) = (got[j * m + i], got_b[j * m + i]);
                        if j == 0 {
                            assert!(g.is_nan() && gb.is_nan(), "row 0 of W was not asked for");
                            continue;
                        }
                        let (x, xb) = (want(&|x| w[x], j, i), want(&|x| wb[x].to_f32(), j, i));
                        assert_eq!(g.to_bits(), x.to_bits(), "f32, m {m} k {k}: out[{j}, {i}] {g} vs {x}");
                        assert_eq!(gb.to_bits(), xb.to_bits(), "bf16, m {m} k {k}: out[{j}, {i}] {gb} vs {xb}");
                    }
                }
            }
        }
    }

    /// The vectorized exp against f64's, relative error, over the range the softmaxes meet (and
    /// the masked −inf and underflow, which must be exactly 0).
    #[test]
    fn the_row_exp_is_within_a_few_ulp_of_f64() {
        let xs: Vec<f32> = (0..20_001).map(|i| -87.0 + 175.0 * i as f32 / 20_000.0).chain([0.0, -0.0, 1e-8, -1e-8]).collect();
        let mut got = xs.clone();
        exp_shift_sum(&mut got, 0.0);
        for (&x, &g) in xs.iter().zip(&got) {
            let w = (x as f64).exp();
            assert!(((g as f64 - w) / w).abs() < 4.0 * f32::EPSILON as f64, "exp({x}) = {g}, want {w}");
        }
        // The sum, over a row as long as a vocabulary, shifted by its max as the softmaxes do.
        let row: Vec<f32> = (0..49_157).map(|i| ((i * 7919) % 4001) as f32 / 100.0 - 20.0).collect();
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let want: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
        for sum in [sum_exp_shift(&row, max), exp_shift_sum(&mut row.clone(), max)] {
            assert!(((sum as f64 - want) / want).abs() < 1e-5, "{sum} vs {want}");
        }
        let mut edge = [f32::NEG_INFINITY, -1e30, -88.5, -200.0, 5.0, 3.0, 1.0, 0.5, 0.25];
        let s = exp_shift_sum(&mut edge, 5.0);
        assert_eq!(&edge[..4], &[0.0; 4]);
        assert_eq!(edge[4], 1.0);
        assert!((s - (1.0 + (-2f32).exp() + (-4f32).exp() + (-4.5f32).exp() + (-4.75f32).exp())).abs() < 1e-6);
        let mut out = [0f32; 9];
        exp_shift_scaled(&[f32::NEG_INFINITY, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 1.0, -2.0, &mut out);
        assert_eq!(out[0], 0.0);
        assert!((out[2] + 2.0).abs() < 1e-6 && (out[8] + 2.0 * 6f32.exp()).abs() < 1e-3, "{out:?}");
        assert!((sum_exp_shift(&[1.0, 2.0, 3.0], 3.0) - (1.0 + (-1f32).exp() + (-2f32).exp())).abs() < 1e-6);
    }
}
