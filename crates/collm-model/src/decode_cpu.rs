//! The decode step on the CPU: one new token per row, no graph, f32, every layer computed on the
//! weights' own slices. It is the arithmetic of `Transformer::forward` (the same RMSNorm, RoPE
//! table, masked softmax and projections, LoRA adapters and biases included) without the
//! ~25 candle ops per layer that the general pass builds, each of which allocated its output and
//! woke candle's thread pool: at batch 1 those ops, not the weights' bytes, bounded a step. Here
//! a layer makes four parallel dispatches (q/k/v, o, gate/up, down), all of them the streaming
//! dot products of [`ops::matmul_nt_small_many`], and the rest runs on the calling thread.
//! Checked against the general pass in `tests/tiny.rs`.

use crate::model::{KvCache, Transformer};
use crate::ops::{self, RopeTable, Weight};
use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;
use std::cell::Cell;
use std::ops::Deref;

/// A tensor's storage, read-locked (candle's lock guard).
type Guard<'a> = Box<dyn Deref<Target = Storage> + 'a>;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(true) };
}

/// Runs `f` with this path off on this thread: every decode step takes the general pass (the
/// reference this one is tested against).
pub fn without_fast_decode<R>(f: impl FnOnce() -> R) -> R {
    ops::with_switch(&ON, false, f)
}

thread_local! {
    static STEPS: Cell<u64> = const { Cell::new(0) };
}

/// Decode steps this thread has taken on this path (what the tests check it is used by).
pub fn steps_on_this_thread() -> u64 {
    STEPS.with(|s| s.get())
}

/// `COLLM_FAST_DECODE=0` turns this path off for the whole process (to time it against the
/// general pass).
fn enabled_by_env() -> bool {
    static ON_ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON_ENV.get_or_init(|| std::env::var("COLLM_FAST_DECODE").map_or(true, |v| v != "0"))
}

/// Whether a pass of `rows` rows × `t` new tokens may take this path.
pub(crate) fn applies(m: &Transformer, rows: usize, t: usize, grad: bool) -> bool {
    !grad
        && t == 1
        && rows <= ops::SMALL_ROWS
        && m.device.is_cpu()
        && m.dtype() == DType::F32
        && ops::fused_ops_on()
        && ON.with(|s| s.get())
        && enabled_by_env()
}

/// A weight's storage, read-locked while a step uses it.
struct Held<'a> {
    guard: Guard<'a>,
    range: (usize, usize),
}

/// The f32 values of a locked CPU storage.
fn cpu_f32<'g>(guard: &'g Guard, what: &str) -> Result<&'g [f32]> {
    match &***guard {
        Storage::Cpu(c) => Ok(c.as_slice::<f32>()?),
        _ => bail!("decode step: {what} is not on the CPU"),
    }
}

impl Held<'_> {
    fn data(&self) -> Result<&[f32]> {
        Ok(&cpu_f32(&self.guard, "a weight")?[self.range.0..self.range.1])
    }

    /// A weight matrix as held: f32, or bf16 (a LoRA run's frozen base), which the products
    /// widen a block at a time.
    fn weight(&self) -> Result<Weight<'_>> {
        let r = self.range.0..self.range.1;
        Ok(match &**self.guard {
            Storage::Cpu(CpuStorage::BF16(w)) => Weight::Bf16(&w[r]),
            _ => Weight::F32(&cpu_f32(&self.guard, "a weight")?[r]),
        })
    }
}

fn hold<'a>(m: &'a Transformer, name: &str) -> Result<Held<'a>> {
    let p = m.params.get(name).with_context(|| format!("model has no tensor '{name}'"))?;
    let (guard, layout) = p.var.as_tensor().storage_and_layout();
    let range = layout.contiguous_offsets().with_context(|| format!("decode step: '{name}' is not contiguous"))?;
    Ok(Held { guard: Box::new(guard), range })
}

/// A projection's weights: the base W [out, in], its bias, and its LoRA adapter (A, B, scale).
struct Proj<'a> {
    w: Held<'a>,
    out: usize,
    bias: Option<Held<'a>>,
    lora: Option<(Held<'a>, Held<'a>, f32)>,
}

fn proj<'a>(m: &'a Transformer, prefix: &str, out: usize) -> Result<Proj<'a>> {
    let opt = |n: String| if m.params.contains_key(&n) { hold(m, &n).map(Some) } else { Ok(None) };
    let lora = match (&m.lora, opt(format!("{prefix}.lora_A.weight"))?, opt(format!("{prefix}.lora_B.weight"))?) {
        (Some(l), Some(a), Some(b)) => Some((a, b, l.scale() as f32)),
        _ => None,
    };
    Ok(Proj { w: hold(m, &format!("{prefix}.weight"))?, out, bias: opt(format!("{prefix}.bias"))?, lora })
}

/// y_i = x W_iᵀ (+ b_i) (+ s·(x A_iᵀ) B_iᵀ) for several projections of the same rows x [m, k]:
/// the base products and the adapters' x A_iᵀ in one parallel dispatch, the thin (x A_iᵀ) B_iᵀ
/// (rank-wide rows) on the calling thread.
fn project(x: &[f32], m: usize, k: usize, ps: &[&Proj]) -> Result<Vec<Vec<f32>>> {
    let mut ws: Vec<(Weight, usize)> = ps.iter().map(|p| Ok((p.w.weight()?, p.out))).collect::<Result<_>>()?;
    for p in ps {
        if let Some((a, _, _)) = &p.lora {
            let a = a.data()?;
            ws.push((Weight::F32(a), a.len() / k));
        }
    }
    let mut ys = ops::matmul_nt_small_many(x, m, k, &ws)?;
    let mut xas = ys.split_off(ps.len()).into_iter();
    for (y, p) in ys.iter_mut().zip(ps) {
        if let Some(b) = &p.bias {
            for row in y.chunks_mut(p.out) {
                row.iter_mut().zip(b.data()?).for_each(|(v, b)| *v += b);
            }
        }
        if let Some((_, b, s)) = &p.lora {
            let (xa, b) = (xas.next().expect("one x·Aᵀ per adapter"), b.data()?);
            let r = b.len() / p.out;
            for (yr, xr) in y.chunks_mut(p.out).zip(xa.chunks(r)) {
                for (v, br) in yr.iter_mut().zip(b.chunks(r)) {
                    *v += s * br.iter().zip(xr).map(|(b, x)| b * x).sum::<f32>();
                }
            }
        }
    }
    Ok(ys)
}

/// RMSNorm of each row of `x` (rows of `w.len()`), the fused op's arithmetic.
fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (o, x) in out.chunks_mut(w.len()).zip(x.chunks(w.len())) {
        ops::rms_norm_row(x, w, eps, o);
    }
    out
}

/// Rotates each row's heads by its position's angles (the table has one row per row).
fn rope(x: &[f32], table: &RopeTable, heads: usize) -> Vec<f32> {
    let hd = 2 * table.half;
    let mut out = vec![0f32; x.len()];
    for (r, (o, x)) in out.chunks_mut(heads * hd).zip(x.chunks(heads * hd)).enumerate() {
        for (o, x) in o.chunks_mut(hd).zip(x.chunks(hd)) {
            ops::rope_row(x, o, table, r, false);
        }
    }
    out
}

/// A [batch, kv_heads, slots, head_dim] cache tensor's data and strides (the last one 1).
struct Strided<'a> {
    guard: Guard<'a>,
    offset: usize,
    stride: [usize; 3],
}

fn strided(t: &Tensor) -> Result<Strided<'_>> {
    let (guard, l) = t.storage_and_layout();
    let st = l.stride();
    if st.len() != 4 || st[3] != 1 {
        bail!("decode step: a cache tensor of strides {st:?}");
    }
    Ok(Strided { offset: l.start_offset(), stride: [st[0], st[1], st[2]], guard: Box::new(guard) })
}

impl Strided<'_> {
    fn data(&self) -> Result<&[f32]> {
        cpu_f32(&self.guard, "the cache")
    }
}

/// Rows of a cached key or value head: row j at `base + j·stride`, head_dim values each.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    base: usize,
    stride: usize,
}

impl Rows<'_> {
    fn row(&self, j: usize, hd: usize) -> &[f32] {
        &self.data[self.base + j * self.stride..self.base + j * self.stride + hd]
    }
}

/// One row's query heads of one key/value group ([n_rep, hd] in `qs`) against the cached slots
/// in `seen`: `out` [n_rep, hd] gets each head's softmax-weighted sum of the values. Each cached
/// key and value is read once for all the group's heads, while it is in cache. In AVX2 registers
/// where the CPU has them (the same operations in the same order as the baseline build).
fn attend(out: &mut [f32], qs: &[f32], keys: Rows, values: Rows, seen: &[usize], hd: usize, scale: f32) {
    #[inline(always)]
    fn body(out: &mut [f32], qs: &[f32], keys: Rows, values: Rows, seen: &[usize], hd: usize, scale: f32) {
        let (n_rep, n) = (qs.len() / hd, seen.len());
        // Scores [n_rep, n]: head i's row against every seen key.
        let mut sc = vec![0f32; n_rep * n];
        for (c, &j) in seen.iter().enumerate() {
            let kj = keys.row(j, hd);
            for (i, qh) in qs.chunks_exact(hd).enumerate() {
                sc[i * n + c] = ops::dot(qh, kj) * scale;
            }
        }
        // Each head's probabilities (seen holds at least the new slot: n ≥ 1).
        for row in sc.chunks_mut(n) {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let inv = 1.0 / ops::exp_shift_sum(row, max);
            row.iter_mut().for_each(|p| *p *= inv);
        }
        for (c, &j) in seen.iter().enumerate() {
            let vj = values.row(j, hd);
            for (i, oh) in out.chunks_exact_mut(hd).enumerate() {
                let w = sc[i * n + c];
                oh.iter_mut().zip(vj).for_each(|(o, v)| *o += w * v);
            }
        }
    }
    ops::avx2_fma!(body(out: &mut [f32], qs: &[f32], keys: Rows, values: Rows, seen: &[usize], hd: usize, scale: f32) -> ())
}

/// One decode step of `ids` (one token per row) after what `cache` holds, whose `valid` and
/// `next_pos` the caller has already advanced; `rope` has one row per row. Returns the hidden
/// states after the final norm, [batch, 1, hidden].
pub(crate) fn step(m: &Transformer, ids: &[u32], cache: &mut KvCache, rope_t: &RopeTable) -> Result<Tensor> {
    STEPS.with(|s| s.set(s.get() + 1));
    let cfg = &m.cfg;
    let (b, hs) = (ids.len(), cfg.hidden_size);
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let n_rep = nh / nkv;
    let eps = cfg.rms_norm_eps as f32;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut x = vec![0f32; b * hs];
    {
        let emb = hold(m, "model.embed_tokens.weight")?;
        let e = emb.weight()?;
        for (row, &id) in x.chunks_mut(hs).zip(ids) {
            match e {
                Weight::F32(e) => row.copy_from_slice(&e[id as usize * hs..(id as usize + 1) * hs]),
                Weight::Bf16(e) => row.iter_mut().zip(&e[id as usize * hs..(id as usize + 1) * hs]).for_each(|(x, v)| *x = v.to_f32()),
            }
        }
    }
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        // Attention.
        let (q, k, v) = {
            let norm = hold(m, &format!("{p}.input_layernorm.weight"))?;
            let h = rms_norm(&x, norm.data()?, eps);
            let pq = proj(m, &format!("{p}.self_attn.q_proj"), nh * hd)?;
            let pk = proj(m, &format!("{p}.self_attn.k_proj"), nkv * hd)?;
            let pv = proj(m, &format!("{p}.self_attn.v_proj"), nkv * hd)?;
            let mut ys = project(&h, b, hs, &[&pq, &pk, &pv])?.into_iter();
            let (mut q, mut k, v) = (ys.next().unwrap(), ys.next().unwrap(), ys.next().unwrap());
            if cfg.qk_norm {
                q = rms_norm(&q, hold(m, &format!("{p}.self_attn.q_norm.weight"))?.data()?, eps);
                k = rms_norm(&k, hold(m, &format!("{p}.self_attn.k_norm.weight"))?.data()?, eps);
            }
            (rope(&q, rope_t, nh), rope(&k, rope_t, nkv), v)
        };
        // One new slot per row: [b, 1, nkv, hd] is laid out as [b, nkv, 1, hd].
        let (kt, vt) =
            cache.append(l, Tensor::from_vec(k, (b, nkv, 1, hd), &m.device)?, Tensor::from_vec(v, (b, nkv, 1, hd), &m.device)?, true)?;
        let slots = kt.dim(2)?;
        if kt.dims4()? != (b, nkv, slots, hd) || vt.dims4()? != (b, nkv, slots, hd) || cache.valid.iter().any(|v| v.len() != slots) {
            bail!("decode step: layer {l}'s cache holds keys {:?} and values {:?} for {slots} slots of validity", kt.dims(), vt.dims());
        }
        let mut o = vec![0f32; b * nh * hd];
        {
            let (ks, vs) = (strided(&kt)?, strided(&vt)?);
            let (kd, vd) = (ks.data()?, vs.data()?);
            let valid = &cache.valid;
            // One task per row and key/value head: its n_rep query heads (contiguous in o) read
            // each cached key and value once, while it is in cache, instead of once per head.
            o.par_chunks_mut(n_rep * hd).enumerate().for_each(|(rg, out)| {
                let (r, g) = (rg / nkv, rg % nkv);
                let kbase = ks.offset + r * ks.stride[0] + g * ks.stride[1];
                let vbase = vs.offset + r * vs.stride[0] + g * vs.stride[1];
                // The new token (the last slot) sees every real key and itself.
                let seen: Vec<usize> = (0..slots).filter(|&j| valid[r][j] || j + 1 == slots).collect();
                let qs = &q[(r * nh + g * n_rep) * hd..(r * nh + (g + 1) * n_rep) * hd];
                let keys = Rows { data: kd, base: kbase, stride: ks.stride[2] };
                let values = Rows { data: vd, base: vbase, stride: vs.stride[2] };
                attend(out, qs, keys, values, &seen, hd, scale);
            });
        }
        let po = proj(m, &format!("{p}.self_attn.o_proj"), hs)?;
        let y = project(&o, b, nh * hd, &[&po])?.pop().unwrap();
        x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
        // MLP.
        let norm = hold(m, &format!("{p}.post_attention_layernorm.weight"))?;
        let h = rms_norm(&x, norm.data()?, eps);
        let inter = cfg.intermediate_size;
        let (pg, pu) = (proj(m, &format!("{p}.mlp.gate_proj"), inter)?, proj(m, &format!("{p}.mlp.up_proj"), inter)?);
        let mut gu = project(&h, b, hs, &[&pg, &pu])?.into_iter();
        let (gate, up) = (gu.next().unwrap(), gu.next().unwrap());
        let act = ops::swiglu_slices(&gate, &up);
        let pd = proj(m, &format!("{p}.mlp.down_proj"), hs)?;
        let y = project(&act, b, inter, &[&pd])?.pop().unwrap();
        x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
    }
    let norm = hold(m, "model.norm.weight")?;
    let out = rms_norm(&x, norm.data()?, eps);
    Ok(Tensor::from_vec(out, (b, 1, hs), &m.device)?)
}
