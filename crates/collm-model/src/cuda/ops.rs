//! Launches of collm's CUDA kernels (kernels.cu, built to PTX by build.rs) as candle ops with
//! their backward: each forward is a custom op, each backward launches its kernels and wraps
//! their buffers as tensors. Inputs are made contiguous by the callers in `crate::cuda`.

use super::{count, Kernel};
use crate::ops::AttnMask;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, InplaceOp3, Layout, Result, Shape, Storage, Tensor,
};
use half::bf16;
use std::sync::Arc;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/collm_kernels.ptx"));
const MODULE: &str = "collm_kernels";
/// Threads per block of the row kernels.
const BLOCK: u32 = 256;
/// Warps (query or key rows) per attention block.
const ATTN_WARPS: usize = 8;
/// The largest head dimension the attention kernels take (each lane holds hd / 32 columns).
pub(crate) const ATTN_MAX_HD: usize = 128;

/// The attention kernels' dynamic shared memory at the largest head dimension stays within the
/// 48 KiB a block gets without asking for more (the backward's dK/dV kernel takes the most).
const _: () = assert!((64 * (ATTN_MAX_HD + 1) + 2 * ATTN_WARPS * ATTN_MAX_HD + 64) * 4 <= 48 * 1024);

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("collm CUDA kernel {what}: {e:?}"))
}

/// Loads `name` (once per device) and launches it with the arguments given, in order.
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let name: &str = $name;
        let f = $dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let mut b = f.builder();
        $( b.arg($arg); )+
        // SAFETY: the argument list matches the kernel's signature in kernels.cu, and every
        // buffer is at least as long as the indices the kernel computes from the sizes passed.
        unsafe { b.launch($cfg) }.map(|_| ()).map_err(|e| cuda_err(name, e))
    }};
}

fn sfx(dt: DType) -> Result<&'static str> {
    match dt {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => bail!("collm CUDA kernels take f32 or bf16, not {other:?}"),
    }
}

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("collm CUDA kernel: expected a contiguous tensor"),
    }
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn flat_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 1 << 16);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn tensor<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())), shape, BackpropOp::none(), false)
}

/// The device buffers of contiguous CUDA tensors, read-locked while `f` runs. The tensors must
/// not share storage (each takes its own read lock, which is not re-entrant).
fn with_views<T: CudaDType, R>(ts: &[&Tensor], f: impl FnOnce(&CudaDevice, &[CudaView<'_, T>]) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(ts.len());
    let mut dev = None;
    for (s, l) in &guards {
        let Storage::Cuda(c) = &**s else { bail!("collm CUDA kernel: a tensor is not on a CUDA device") };
        dev.get_or_insert_with(|| c.device.clone());
        views.push(view::<T>(c, l)?);
    }
    f(&dev.expect("at least one tensor"), &views)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "collm-cuda-rms-norm"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("collm-cuda-rms-norm runs on CUDA devices only")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        fn go<T: CudaDType + DeviceRepr>(
            op: &RmsNorm,
            xs: &CudaStorage,
            xl: &Layout,
            ws: &CudaStorage,
            wl: &Layout,
        ) -> Result<CudaStorage> {
            let (x, w) = (view::<T>(xs, xl)?, view::<T>(ws, wl)?);
            let (d, n) = (wl.shape().elem_count(), xl.shape().elem_count());
            let dev = &xs.device;
            // SAFETY: written whole by the kernel.
            let y = unsafe { dev.alloc::<T>(n)? };
            let (di, eps) = (d as i32, op.eps);
            launch!(dev, &format!("rms_norm_fwd_{}", sfx(xs.dtype())?), rows_cfg(n / d), &x, &w, &y, &di, &eps)?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        if xl.dims().last() != Some(&wl.shape().elem_count()) || xs.dtype() != ws.dtype() {
            bail!("rms_norm: x {:?} and weight {:?} do not match", xl.dims(), wl.dims());
        }
        count(Kernel::RmsNorm);
        let s = match xs.dtype() {
            DType::BF16 => go::<bf16>(self, xs, xl, ws, wl)?,
            _ => go::<f32>(self, xs, xl, ws, wl)?,
        };
        Ok((s, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn go<T: CudaDType + DeviceRepr>(eps: f32, x: &Tensor, w: &Tensor, g: &Tensor, want_w: bool) -> Result<(Tensor, Option<Tensor>)> {
            let d = w.elem_count();
            let rows = x.elem_count() / d;
            let sx = sfx(x.dtype())?;
            with_views::<T, _>(&[x, w, g], |dev, v| {
                // SAFETY: written whole by the kernels.
                let dx = unsafe { dev.alloc::<T>(rows * d)? };
                let rinv = unsafe { dev.alloc::<f32>(rows)? };
                let (di, ri) = (d as i32, rows as i32);
                launch!(dev, &format!("rms_norm_bwd_dx_{sx}"), rows_cfg(rows), &v[0], &v[1], &v[2], &dx, &rinv, &di, &eps)?;
                let dw = if want_w {
                    // Partial sums over chunks of rows (64, more where the grid's second
                    // dimension would pass 65,535), summed in order afterwards.
                    let chunk = 64usize.max(rows.div_ceil(65_535));
                    let chunks = rows.div_ceil(chunk);
                    let part = unsafe { dev.alloc::<f32>(chunks * d)? };
                    let cfg = LaunchConfig {
                        grid_dim: (d.div_ceil(BLOCK as usize) as u32, chunks as u32, 1),
                        block_dim: (BLOCK, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let ci = chunk as i32;
                    launch!(dev, &format!("rms_norm_bwd_dw_{sx}"), cfg, &v[0], &v[2], &rinv, &part, &ri, &di, &ci)?;
                    Some(tensor(part, dev, (chunks, d)).sum(0)?.to_dtype(w.dtype())?.reshape(w.shape())?)
                } else {
                    None
                };
                Ok((tensor(dx, dev, x.shape()), dw))
            })
        }
        let g = grad.contiguous()?;
        let (dx, dw) = match x.dtype() {
            DType::BF16 => go::<bf16>(self.eps, x, w, &g, w.track_op())?,
            _ => go::<f32>(self.eps, x, w, &g, w.track_op())?,
        };
        Ok((Some(dx), dw))
    }
}

pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    x.apply_op2(w, RmsNorm { eps })
}

// ---------------------------------------------------------------------------------------------
// RoPE

struct Rope {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    half: usize,
    heads: usize,
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "collm-cuda-rope"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("collm-cuda-rope runs on CUDA devices only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn go<T: CudaDType + DeviceRepr>(op: &Rope, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
            let x = view::<T>(s, l)?;
            let n = l.shape().elem_count();
            let tokens = op.cos.len() / op.half;
            if n != tokens * op.heads * 2 * op.half {
                bail!("rope: tensor of {n} values does not match the table ({tokens} tokens × {} heads)", op.heads);
            }
            let dev = &s.device;
            let (cs, sn) = (dev.clone_htod(&op.cos[..])?, dev.clone_htod(&op.sin[..])?);
            // SAFETY: written whole by the kernel.
            let y = unsafe { dev.alloc::<T>(n)? };
            let (ti, hi, fi) = (tokens as i32, op.heads as i32, op.half as i32);
            let sign: f32 = if op.inverse { -1.0 } else { 1.0 };
            launch!(dev, &format!("rope_{}", sfx(s.dtype())?), flat_cfg(n / 2), &x, &cs, &sn, &y, &ti, &hi, &fi, &sign)?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        count(Kernel::Rope);
        let out = match s.dtype() {
            DType::BF16 => go::<bf16>(self, s, l)?,
            _ => go::<f32>(self, s, l)?,
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The rotation's transpose is the rotation by the opposite angles.
        let inv = Rope { cos: self.cos.clone(), sin: self.sin.clone(), half: self.half, heads: self.heads, inverse: !self.inverse };
        Ok(Some(grad.contiguous()?.apply_op1(inv)?))
    }
}

pub(crate) fn rope(x: &Tensor, table: &crate::ops::RopeTable, heads: usize) -> Result<Tensor> {
    x.apply_op1(Rope { cos: table.cos.clone(), sin: table.sin.clone(), half: table.half, heads, inverse: false })
}

// ---------------------------------------------------------------------------------------------
// Token log-probabilities (f32 logits)

struct TokenLogprobs {
    targets: Arc<Vec<u32>>,
}

impl CustomOp1 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "collm-cuda-token-logprobs"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("collm-cuda-token-logprobs runs on CUDA devices only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let x = view::<f32>(s, l)?;
        let vocab = *l.dims().last().unwrap_or(&1);
        let n = l.shape().elem_count() / vocab;
        if n != self.targets.len() {
            bail!("token_logprobs: {n} rows but {} targets", self.targets.len());
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= vocab) {
            bail!("token_logprobs: target {t} outside the vocabulary of {vocab}");
        }
        count(Kernel::TokenLogprobs);
        let dev = &s.device;
        let targets = dev.clone_htod(&self.targets[..])?;
        // SAFETY: written whole by the kernel.
        let out = unsafe { dev.alloc::<f32>(n)? };
        let vi = vocab as i32;
        launch!(dev, "token_logprobs_fwd_f32", rows_cfg(n), &x, &targets, &out, &vi)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let vocab = arg.dim(candle_core::D::Minus1)?;
        let n = arg.elem_count() / vocab;
        let g = grad.contiguous()?;
        let dx = with_views::<f32, _>(&[arg, &g], |dev, v| {
            let targets = dev.clone_htod(&self.targets[..])?;
            // SAFETY: written whole by the kernel.
            let dx = unsafe { dev.alloc::<f32>(n * vocab)? };
            let vi = vocab as i32;
            launch!(dev, "token_logprobs_bwd_f32", rows_cfg(n), &v[0], &targets, &v[1], &dx, &vi)?;
            Ok(tensor(dx, dev, arg.shape()))
        })?;
        Ok(Some(dx))
    }
}

pub(crate) fn token_logprobs(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    logits.apply_op1(TokenLogprobs { targets: Arc::new(targets.to_vec()) })
}

// ---------------------------------------------------------------------------------------------
// Attention

struct Attention {
    /// Per batch row and key slot: whether the key is a real token (not padding).
    valid: Arc<Vec<u8>>,
    q_len: usize,
    scale: f32,
}

struct AttnDims {
    groups: usize,
    pairs: usize,
    rows: usize,
    kl: usize,
    hd: usize,
}

impl Attention {
    fn dims(&self, q: &[usize], k: &[usize]) -> Result<AttnDims> {
        let (&[b, g, r, hd], &[kb, kg, kl, khd]) = (q, k) else { bail!("attention: expected rank-4 q and k, got {q:?} and {k:?}") };
        if (kb, kg, khd) != (b, g, hd) || r % self.q_len != 0 || kl < self.q_len || self.valid.len() != b * kl {
            bail!("attention: q {q:?} / k {k:?} do not match the mask ({} query positions)", self.q_len);
        }
        if hd % 32 != 0 || hd > ATTN_MAX_HD {
            bail!("attention kernel: head_dim {hd} is not a multiple of 32 up to {ATTN_MAX_HD}");
        }
        Ok(AttnDims { groups: g, pairs: b * g, rows: r, kl, hd })
    }

    fn cfg(blocks: usize, pairs: usize, floats: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks as u32, pairs as u32, 1),
            block_dim: (32 * ATTN_WARPS as u32, 1, 1),
            shared_mem_bytes: (floats * 4) as u32,
        }
    }

    fn ints(&self, d: &AttnDims) -> [i32; 5] {
        [d.groups as i32, d.rows as i32, self.q_len as i32, d.kl as i32, d.hd as i32]
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "collm-cuda-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("collm-cuda-attention runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn go<T: CudaDType + DeviceRepr>(
            op: &Attention,
            d: &AttnDims,
            (qs, ql): (&CudaStorage, &Layout),
            (ks, kl): (&CudaStorage, &Layout),
            (vs, vl): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let (q, k, v) = (view::<T>(qs, ql)?, view::<T>(ks, kl)?, view::<T>(vs, vl)?);
            let dev = &qs.device;
            let valid = dev.clone_htod(&op.valid[..])?;
            // SAFETY: written whole by the kernel (every row of every pair).
            let out = unsafe { dev.alloc::<T>(d.pairs * d.rows * d.hd)? };
            let [gi, ri, qi, ki, hi] = op.ints(d);
            let scale = op.scale;
            let floats = 32 * (d.hd + 1) + 32 * d.hd + ATTN_WARPS * d.hd;
            let cfg = Attention::cfg(d.rows.div_ceil(ATTN_WARPS), d.pairs, floats);
            launch!(dev, &format!("attn_fwd_{}", sfx(qs.dtype())?), cfg, &q, &k, &v, &valid, &out, &gi, &ri, &qi, &ki, &hi, &scale)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        let d = self.dims(ql.dims(), kl.dims())?;
        if vl.dims() != kl.dims() || qs.dtype() != ks.dtype() || qs.dtype() != vs.dtype() {
            bail!("attention: v {:?} does not match k {:?}, or the dtypes differ", vl.dims(), kl.dims());
        }
        count(Kernel::Attention);
        let s = match qs.dtype() {
            DType::BF16 => go::<bf16>(self, &d, (qs, ql), (ks, kl), (vs, vl))?,
            _ => go::<f32>(self, &d, (qs, ql), (ks, kl), (vs, vl))?,
        };
        Ok((s, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn go<T: CudaDType + DeviceRepr>(op: &Attention, d: &AttnDims, ts: [&Tensor; 5]) -> Result<(Tensor, Tensor, Tensor)> {
            let sx = sfx(ts[0].dtype())?;
            with_views::<T, _>(&ts, |dev, x| {
                let (q, k, v, o, go) = (&x[0], &x[1], &x[2], &x[3], &x[4]);
                let valid = dev.clone_htod(&op.valid[..])?;
                let nrows = d.pairs * d.rows;
                let nkeys = d.pairs * d.kl;
                // SAFETY (all four): written whole by the kernels.
                let lse = unsafe { dev.alloc::<f32>(nrows)? };
                let dsum = unsafe { dev.alloc::<f32>(nrows)? };
                let dq = unsafe { dev.alloc::<T>(nrows * d.hd)? };
                let (dk, dv) = unsafe { (dev.alloc::<T>(nkeys * d.hd)?, dev.alloc::<T>(nkeys * d.hd)?) };
                let [gi, ri, qi, ki, hi] = op.ints(d);
                let scale = op.scale;
                let (hd, w) = (d.hd, ATTN_WARPS);
                let row_blocks = d.rows.div_ceil(w);
                launch!(
                    dev,
                    &format!("attn_bwd_prep_{sx}"),
                    Attention::cfg(row_blocks, d.pairs, 32 * (hd + 1) + w * hd),
                    q,
                    k,
                    o,
                    go,
                    &valid,
                    &lse,
                    &dsum,
                    &gi,
                    &ri,
                    &qi,
                    &ki,
                    &hi,
                    &scale
                )?;
                launch!(
                    dev,
                    &format!("attn_bwd_dq_{sx}"),
                    Attention::cfg(row_blocks, d.pairs, 64 * (hd + 1) + 2 * w * hd),
                    q,
                    k,
                    v,
                    go,
                    &valid,
                    &lse,
                    &dsum,
                    &dq,
                    &gi,
                    &ri,
                    &qi,
                    &ki,
                    &hi,
                    &scale
                )?;
                let key_blocks = d.kl.div_ceil(w);
                launch!(
                    dev,
                    &format!("attn_bwd_dkv_{sx}"),
                    Attention::cfg(key_blocks, d.pairs, 64 * (hd + 1) + 2 * w * hd + 64),
                    q,
                    k,
                    v,
                    go,
                    &valid,
                    &lse,
                    &dsum,
                    &dk,
                    &dv,
                    &gi,
                    &ri,
                    &qi,
                    &ki,
                    &hi,
                    &scale
                )?;
                Ok((tensor(dq, dev, ts[0].shape()), tensor(dk, dev, ts[1].shape()), tensor(dv, dev, ts[2].shape())))
            })
        }
        let d = self.dims(q.dims(), k.dims())?;
        let (res, grad) = (res.contiguous()?, grad.contiguous()?);
        let ts = [q, k, v, &res, &grad];
        let (dq, dk, dv) = match q.dtype() {
            DType::BF16 => go::<bf16>(self, &d, ts)?,
            _ => go::<f32>(self, &d, ts)?,
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor> {
    let op = Attention { valid: Arc::new(mask.key_validity()), q_len: mask.q_len, scale };
    q.apply_op3(k, v, op)
}

// ---------------------------------------------------------------------------------------------
// AdamW (f32, in place)

struct Moment {
    beta: f32,
    gscale: f32,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "collm-cuda-adamw-moment"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("collm-cuda-adamw-moment runs on CUDA devices only")
    }

    fn cuda_fwd(&self, ms: &mut CudaStorage, ml: &Layout, gs: &CudaStorage, gl: &Layout) -> Result<()> {
        let (Some((m0, m1)), Some(_)) = (ml.contiguous_offsets(), gl.contiguous_offsets()) else { bail!("adamw: non-contiguous tensors") };
        let n = m1 - m0;
        if gl.shape().elem_count() != n {
            bail!("adamw: {n} moments but {} gradients", gl.shape().elem_count());
        }
        let dev = ms.device.clone();
        let g = view::<f32>(gs, gl)?;
        let mut m = ms.as_cuda_slice_mut::<f32>()?.slice_mut(m0..m1);
        let (beta, gscale, square) = (self.beta, self.gscale, self.square as i32);
        launch!(&dev, "adamw_moment_f32", flat_cfg(n), &mut m, &g, &n, &beta, &gscale, &square)
    }
}

struct ParamUpdate {
    lr: f32,
    decay: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "collm-cuda-adamw-param"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("collm-cuda-adamw-param runs on CUDA devices only")
    }

    fn cuda_fwd(&self, ps: &mut CudaStorage, pl: &Layout, ms: &CudaStorage, ml: &Layout, vs: &CudaStorage, vl: &Layout) -> Result<()> {
        let Some((p0, p1)) = pl.contiguous_offsets() else { bail!("adamw: non-contiguous parameter") };
        let n = p1 - p0;
        if ml.shape().elem_count() != n || vl.shape().elem_count() != n {
            bail!("adamw: {n} parameters but {} / {} moments", ml.shape().elem_count(), vl.shape().elem_count());
        }
        let dev = ps.device.clone();
        let (m, v) = (view::<f32>(ms, ml)?, view::<f32>(vs, vl)?);
        let mut p = ps.as_cuda_slice_mut::<f32>()?.slice_mut(p0..p1);
        let (lr, decay, bc1, bc2, eps) = (self.lr, self.decay, self.bc1, self.bc2, self.eps);
        launch!(&dev, "adamw_param_f32", flat_cfg(n), &mut p, &m, &v, &n, &lr, &decay, &bc1, &bc2, &eps)
    }
}

/// One AdamW step of `p` (f32, in place) with gradient `g` (f32) and moments `m`, `v` (f32, in
/// place). `scalars` = (lr, beta1, beta2, eps, decay factor, bc1, bc2, gradient scale).
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    lr: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    decay: f32,
    bc1: f32,
    bc2: f32,
    gscale: f32,
) -> Result<()> {
    count(Kernel::AdamW);
    m.inplace_op2(g, &Moment { beta: b1, gscale, square: false })?;
    v.inplace_op2(g, &Moment { beta: b2, gscale, square: true })?;
    p.inplace_op3(m, v, &ParamUpdate { lr, decay, bc1, bc2, eps })
}
