//! Gradients and the optimizer: accumulation over micro-batches, global-norm clipping, and a
//! fused in-place AdamW (one pass over each parameter, no temporaries).

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor, Var};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

/// Named gradients, summed over the micro-batches added so far.
#[derive(Default)]
pub struct Grads {
    /// The sums by parameter name. [`Grads::backward`] adds into them in place: a clone taken
    /// between micro-batches changes with the next one.
    pub map: BTreeMap<String, Tensor>,
    /// Multiplier applied when the optimizer reads the gradients (set by clipping).
    pub scale: f32,
    pub micro_batches: usize,
    /// Contributions that [`Grads::backward`] took through the gradient sink (added in place,
    /// never through candle's store), over every micro-batch.
    pub sunk: usize,
}

impl Grads {
    pub fn new() -> Self {
        Self { map: BTreeMap::new(), scale: 1.0, micro_batches: 0, sunk: 0 }
    }

    /// Adds the gradients of `params` found in `store` (from one `loss.backward()`).
    pub fn accumulate<'a>(&mut self, store: &GradStore, params: impl IntoIterator<Item = (&'a String, &'a Var)>) -> Result<()> {
        for (name, var) in params {
            if let Some(g) = store.get(var.as_tensor()) {
                // Summed in f32 whatever the parameter's precision.
                let g = g.detach().to_dtype(DType::F32)?;
                let sum = match self.map.remove(name) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                self.map.insert(name.clone(), sum);
            }
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// Runs `loss.backward()` and adds the gradients of `params` to the sums, as
    /// [`Grads::accumulate`] does with the store it returns. On the CPU in f32 the weights'
    /// gradients skip candle's gradient store: collm's projections and embedding add their
    /// contribution straight into the sum kept here ([`weight_grad`]), the first contribution of a
    /// step becoming the sum itself. candle would zero-fill a buffer the size of each weight, add
    /// the contribution into a second, and [`Grads::accumulate`] add that into a third: about 2 GB
    /// of memory traffic per SmolLM2-135M backward pass, and the store's copy of every weight
    /// gradient held at once beside the sums.
    ///
    /// A backward that fails leaves sums it had added into half done: the sums are then cleared
    /// (no parameter has a gradient) and the error returned. Any other backward run on this
    /// thread while this one runs (a nested `loss.backward()`) would feed its weight gradients
    /// into these sums: every training backward goes through here.
    pub fn backward<'a>(&mut self, loss: &Tensor, params: impl IntoIterator<Item = (&'a String, &'a Var)>) -> Result<()> {
        let params: Vec<(&String, &Var)> = params.into_iter().collect();
        let mut slots = HashMap::new();
        for (name, var) in &params {
            if crate::ops::fused(var.as_tensor()) && var.is_contiguous() {
                let prev = self.map.remove(*name).map(|g| g.contiguous()).transpose()?;
                if slots.insert(var.id(), prev).is_some() {
                    bail!("Grads::backward: parameter '{name}' is listed twice (or shares its tensor with another name)");
                }
            }
        }
        let (store, mut slots, sunk) = with_sink(slots, || loss.backward());
        self.sunk += sunk;
        let store = match store {
            Ok(store) => store,
            Err(e) => {
                self.map.clear();
                return Err(e.into());
            }
        };
        for (name, var) in params {
            let prev = match slots.remove(&var.id()) {
                Some(sunk) => sunk,
                None => self.map.remove(name),
            };
            let g = store.get(var.as_tensor()).map(|g| g.detach().to_dtype(DType::F32)).transpose()?;
            let sum = match (prev, g) {
                (Some(p), Some(g)) => Some((p + g)?),
                (p, g) => p.or(g),
            };
            if let Some(sum) = sum {
                self.map.insert(name.clone(), sum);
            }
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// √(Σ g²) over every gradient (before the scale).
    pub fn global_norm(&self) -> Result<f32> {
        let mut sq = 0f64;
        for g in self.map.values() {
            sq += if crate::ops::fused(g) {
                crate::ops::with_f32(g, sum_squares)?
            } else {
                // On the gradient's device; one scalar comes back.
                g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?
            };
        }
        Ok(sq.sqrt() as f32)
    }

    /// Scales the gradients so their global norm is at most `max_norm`; returns the norm before.
    pub fn clip_norm(&mut self, max_norm: f32) -> Result<f32> {
        let norm = self.global_norm()? * self.scale;
        if !norm.is_finite() {
            bail!("gradient norm is {norm}: the loss produced NaN or infinite gradients");
        }
        if max_norm > 0.0 && norm > max_norm {
            self.scale *= max_norm / (norm + 1e-6);
        }
        Ok(norm)
    }
}

// ---------------------------------------------------------------------------------------------
// The gradient sink: during a [`Grads::backward`], the sums of the weights' gradients by tensor
// id (None until a weight's first contribution of the step).

type Slots = HashMap<candle_core::TensorId, Option<Tensor>>;

/// An op's contribution to a weight's gradient (see [`weight_grad`]).
pub(crate) type Contribution<'a> = &'a dyn Fn(Option<&mut [f32]>) -> candle_core::Result<Option<Vec<f32>>>;

thread_local! {
    /// The sinks of the backward passes running on this thread, innermost last, each with the
    /// number of contributions it took. A stack: a thread of rayon's pool that waits inside one
    /// backward pass (for the other half of a parallel product) may run another job meanwhile,
    /// another trainer's backward pass included, which must find its own sink and leave the
    /// first one as it was.
    static SINK: RefCell<Vec<(Slots, usize)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `slots` as this thread's innermost sink; returns f's result, the slots after it
/// and the number of contributions they took.
fn with_sink<R>(slots: Slots, f: impl FnOnce() -> R) -> (R, Slots, usize) {
    /// Pops the sink when `f` panics.
    struct Pop(bool);
    impl Drop for Pop {
        fn drop(&mut self) {
            if self.0 {
                SINK.with(|s| s.borrow_mut().pop());
            }
        }
    }
    SINK.with(|s| s.borrow_mut().push((slots, 0)));
    let mut guard = Pop(true);
    let r = f();
    guard.0 = false;
    let (slots, n) = SINK.with(|s| s.borrow_mut().pop()).expect("the gradient sink pushed above is on the stack");
    (r, slots, n)
}

/// One op's contribution to the gradient of the weight `w`: `add(None)` returns it as a new
/// [w's shape] buffer, `add(Some(sum))` adds it into `sum` and returns None. Where
/// [`Grads::backward`] collects w's gradient on this thread it goes into w's sum there (the
/// first contribution of the step becoming the sum) and None is returned; elsewhere it is a new
/// tensor, which the op hands to candle's backward as usual.
pub(crate) fn weight_grad(w: &Tensor, add: Contribution) -> candle_core::Result<Option<Tensor>> {
    if add_to_sink(w, add)? {
        return Ok(None);
    }
    new_grad(w, add).map(Some)
}

/// The contribution `add` as a new tensor of w's shape.
fn new_grad(w: &Tensor, add: Contribution) -> candle_core::Result<Tensor> {
    match add(None)? {
        Some(v) if v.len() == w.elem_count() => Tensor::from_vec(v, w.shape(), w.device()),
        _ => Err(candle_core::Error::Msg(format!("gradient sink: a contribution of the wrong size to a {:?} weight", w.dims()))),
    }
}

/// [`weight_grad`] into w's sum in the sink; false, having called nothing, where no sink on this
/// thread collects w's gradient.
fn add_to_sink(w: &Tensor, add: Contribution) -> candle_core::Result<bool> {
    let Some(slot) = SINK.with(|s| s.borrow_mut().last_mut().and_then(|(m, _)| m.get_mut(&w.id()).map(Option::take))) else {
        return Ok(false);
    };
    // The slot is empty while `add` runs; what it holds after is put back whatever happens.
    let (done, sum) = match slot {
        None => match new_grad(w, add) {
            Ok(t) => (Ok(()), Some(t)),
            Err(e) => (Err(e), None),
        },
        Some(sum) => (sum.inplace_op1(&SinkAdd(add)), Some(sum)),
    };
    SINK.with(|s| {
        if let Some((m, n)) = s.borrow_mut().last_mut() {
            m.insert(w.id(), sum);
            *n += 1;
        }
    });
    done.map(|_| true)
}

/// Adds a contribution into a gradient sum in place.
struct SinkAdd<'a>(Contribution<'a>);

impl candle_core::InplaceOp1 for SinkAdd<'_> {
    fn name(&self) -> &'static str {
        "collm-gradient-sink"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(v) = s else { candle_core::bail!("gradient sink: the sum is not f32") };
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("gradient sink: the sum is not contiguous") };
        (self.0)(Some(&mut v[a..b])).map(|_| ())
    }
}

/// n zeros written into fresh memory. `vec![0.0; n]` takes untouched pages from the kernel
/// without writing them; the first read of each then maps the shared zero page, and the first
/// write after it is a copy-on-write fault that flushes the page from every core's TLB (an
/// interprocessor interrupt, costly under a hypervisor). A buffer that is read before it is written
/// (the AdamW moments, a gradient sum that GEMMs add into) is written here first, one plain
/// fault per page. On the Xeon (KVM), `collm bench train --algo cc` under `perf`: copy-on-write
/// faults 7.7% of the run's samples before, 2.2% after; the flushes' interrupts 3.4%, then 0.3%.
pub(crate) fn written_zeros(n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    // Filled through the spare capacity on all threads: a plain resize after with_capacity is
    // turned back into calloc by the compiler.
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut().par_chunks_mut(1 << 16).for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the loop above initialised all n values.
    unsafe { v.set_len(n) };
    v
}

/// Σ x² in f64, on all threads. One running f64 sum is a chain of dependent adds (about 0.15 s
/// over SmolLM2-135M's gradients, once per optimizer step); here fixed blocks are each summed in
/// eight lanes and the blocks' sums added in order, so the result does not depend on how rayon
/// schedules the blocks.
pub fn sum_squares(xs: &[f32]) -> f64 {
    use rayon::prelude::*;
    #[inline(always)]
    fn body(xs: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let mut chunks = xs.chunks_exact(8);
        for c in &mut chunks {
            for i in 0..8 {
                acc[i] += c[i] as f64 * c[i] as f64;
            }
        }
        let tail: f64 = chunks.remainder().iter().map(|&x| x as f64 * x as f64).sum();
        acc.iter().sum::<f64>() + tail
    }
    fn block(xs: &[f32]) -> f64 {
        crate::ops::avx2_fma!(body(xs: &[f32]) -> f64)
    }
    const BLOCK: usize = 1 << 16;
    let partials: Vec<f64> = xs.par_chunks(BLOCK).map(block).collect();
    partials.iter().sum()
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// AdamW with decoupled weight decay and bias correction, as in PyTorch:
/// p ← p·(1 − lr·wd) − lr · m̂ / (√v̂ + eps). As in PyTorch, each parameter counts its own
/// steps: a parameter that had no gradient in an update (a frozen backbone during a value-head
/// warm-up) is not stepped, and its bias correction starts at its own first step.
///
/// The moments are f32. A parameter held in a lower precision (bf16) is updated through an f32
/// master copy kept here; the parameter then takes the master's rounding. On the CPU in f32 the
/// update is one fused in-place pass; elsewhere it is composed of tensor ops on the parameter's
/// device.
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Updates taken (calls of `step`), for logs.
    pub t: u64,
    /// Per parameter: its moments, master copy and own step count.
    pub state: HashMap<String, ParamState>,
}

/// One parameter's AdamW state. A clone shares the device tensors (the CUDA kernel updates the
/// moments and master in place): copy them for a snapshot, as `state_tensors` does.
#[derive(Clone, Debug)]
pub struct ParamState {
    moments: Moments,
    /// The f32 master weights of a parameter held in a lower precision.
    master: Option<Tensor>,
    /// Steps this parameter has taken.
    pub t: u64,
}

/// First and second moments: host vectors for the fused CPU update, tensors on the parameter's
/// device for the generic one.
#[derive(Clone, Debug)]
enum Moments {
    Host { m: Vec<f32>, v: Vec<f32> },
    Device { m: Tensor, v: Tensor },
}

impl Moments {
    fn len(&self) -> usize {
        match self {
            Moments::Host { m, .. } => m.len(),
            Moments::Device { m, .. } => m.elem_count(),
        }
    }

    /// The moments in the form the update at hand needs (host for the fused path, on `like`'s
    /// device and shape otherwise).
    fn into_form(self, host: bool, like: &Tensor) -> Result<Self> {
        Ok(match (self, host) {
            (Moments::Device { m, v }, true) => Moments::Host {
                m: m.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?,
                v: v.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?,
            },
            (Moments::Host { m, v }, false) => Moments::Device {
                m: Tensor::from_vec(m, like.shape(), like.device())?,
                v: Tensor::from_vec(v, like.shape(), like.device())?,
            },
            (Moments::Device { m, v }, false) => Moments::Device {
                m: m.reshape(like.shape())?.to_device(like.device())?,
                v: v.reshape(like.shape())?.to_device(like.device())?,
            },
            (same, true) => same,
        })
    }

    fn to_host(&self) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Moments::Host { m, v } => (Tensor::from_slice(m, m.len(), &Device::Cpu)?, Tensor::from_slice(v, v.len(), &Device::Cpu)?),
            Moments::Device { m, v } => {
                (m.flatten_all()?.to_device(&Device::Cpu)?.copy()?, v.flatten_all()?.to_device(&Device::Cpu)?.copy()?)
            }
        })
    }
}

struct AdamWUpdate<'a> {
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
    lr: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    decay: f32,
    bc1: f32,
    bc2: f32,
    gscale: f32,
}

impl InplaceOp2 for AdamWUpdate<'_> {
    fn name(&self) -> &'static str {
        "collm-adamw"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("adamw: parameters and gradients must be f32");
        };
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("adamw: non-contiguous tensors");
        };
        let p = &mut p[p0..p1];
        let g = &g[g0..g1];
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        use rayon::prelude::*;
        let k = [self.b1, self.b2, self.eps, self.lr, self.decay, self.bc1, self.bc2, self.gscale];
        const CHUNK: usize = 1 << 14;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| adamw_chunk(p, g, m, v, k));
        Ok(())
    }
}

/// AdamW on one chunk, k = [β1, β2, ε, lr, 1 − lr·decay, 1 − β1ᵗ, 1 − β2ᵗ, gradient scale]; in
/// AVX2 registers where the CPU has them (the same IEEE operations in the same order, so the
/// same bits: Rust never fuses a multiply and an add on its own). Compiled for the baseline
/// x86-64 it ran four lanes at a time, 3% of a cc update step in `perf` on the Xeon.
fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: [f32; 8]) {
    #[inline(always)]
    fn body(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: [f32; 8]) {
        let [b1, b2, eps, lr, decay, bc1, bc2, gscale] = k;
        let n = p.len().min(g.len()).min(m.len()).min(v.len());
        let (p, g, m, v) = (&mut p[..n], &g[..n], &mut m[..n], &mut v[..n]);
        for i in 0..n {
            let gi = g[i] * gscale;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let mh = m[i] / bc1;
            let vh = v[i] / bc2;
            p[i] = p[i] * decay - lr * mh / (vh.sqrt() + eps);
        }
    }
    crate::ops::avx2_fma!(body(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: [f32; 8]) -> ())
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        Self { cfg, t: 0, state: HashMap::new() }
    }

    /// One update of every parameter that has a gradient in `grads`.
    pub fn step<'a>(&mut self, params: impl IntoIterator<Item = (&'a String, &'a Var)>, grads: &Grads) -> Result<()> {
        self.t += 1;
        let c = self.cfg.clone();
        for (name, var) in params {
            let Some(g) = grads.map.get(name) else { continue };
            if g.dims() != var.dims() {
                bail!("gradient of '{name}' has shape {:?}, parameter {:?}", g.dims(), var.dims());
            }
            let n = var.elem_count();
            let st = self.state.entry(name.clone()).or_insert_with(|| ParamState {
                moments: Moments::Host { m: written_zeros(n), v: written_zeros(n) },
                master: None,
                t: 0,
            });
            if st.moments.len() != n {
                bail!("AdamW state of '{name}' holds {} values, the parameter {n}", st.moments.len());
            }
            // What the update applies to: the parameter itself in f32, else its f32 master.
            st.master = if var.dtype() == DType::F32 {
                None
            } else {
                Some(match st.master.take() {
                    Some(m) if m.elem_count() == n => m.reshape(var.shape())?.to_device(var.device())?,
                    _ => var.as_tensor().detach().to_dtype(DType::F32)?.copy()?,
                })
            };
            st.t += 1;
            let bc1 = 1.0 - c.beta1.powf(st.t as f64);
            let bc2 = 1.0 - c.beta2.powf(st.t as f64);
            let target = st.master.clone().unwrap_or_else(|| var.as_tensor().clone());
            let g = g.to_dtype(DType::F32)?.contiguous()?;
            let host = crate::ops::fused(&target) && crate::ops::fused(&g);
            let moments = std::mem::replace(&mut st.moments, Moments::Host { m: vec![], v: vec![] });
            st.moments = moments.into_form(host, &target)?;
            match &mut st.moments {
                Moments::Host { m, v } => {
                    let op = AdamWUpdate {
                        m: RefCell::new(m),
                        v: RefCell::new(v),
                        lr: c.lr as f32,
                        b1: c.beta1 as f32,
                        b2: c.beta2 as f32,
                        eps: c.eps as f32,
                        decay: (1.0 - c.lr * c.weight_decay) as f32,
                        bc1: bc1 as f32,
                        bc2: bc2 as f32,
                        gscale: grads.scale,
                    };
                    target.inplace_op2(&g, &op).with_context(|| format!("AdamW update of '{name}'"))?;
                }
                Moments::Device { m, v } if crate::cuda::adamw(&target, &g, m, v, &c, bc1, bc2, grads.scale)? => {
                    // Done in place by the CUDA kernel: the parameter, or its master copy.
                }
                Moments::Device { m, v } => {
                    // The same update as the fused kernel, in tensor ops on the parameter's device.
                    let g = (g * grads.scale as f64)?;
                    *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                    *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let step = ((&*m / bc1)? / ((&*v / bc2)?.sqrt()? + c.eps)?)?;
                    let p = ((&target * (1.0 - c.lr * c.weight_decay))? - (step * c.lr)?)?;
                    match &mut st.master {
                        Some(master) => *master = p,
                        None => var.set(&p).with_context(|| format!("AdamW update of '{name}'"))?,
                    }
                }
            }
            if let Some(master) = &st.master {
                var.set(&master.to_dtype(var.dtype())?).with_context(|| format!("AdamW update of '{name}'"))?;
            }
        }
        Ok(())
    }

    /// The moments (and master weights) as host tensors, for checkpoints (the step counts:
    /// `param_steps`).
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (k, st) in &self.state {
            let (m, v) = st.moments.to_host()?;
            out.insert(format!("{k}.exp_avg"), m);
            out.insert(format!("{k}.exp_avg_sq"), v);
            if let Some(master) = &st.master {
                // A copy: the master is updated in place, and the caller keeps this tensor.
                out.insert(format!("{k}.master"), master.flatten_all()?.to_device(&Device::Cpu)?.copy()?);
            }
        }
        Ok(out)
    }

    /// Each parameter's step count, for checkpoints.
    pub fn param_steps(&self) -> BTreeMap<String, u64> {
        self.state.iter().map(|(k, st)| (k.clone(), st.t)).collect()
    }

    /// Restores the state: `t` updates taken, the moments (and master weights), and each
    /// parameter's step count from `steps` (a parameter missing there, as in checkpoints written
    /// before per-parameter counts, takes `t`).
    pub fn load_state_tensors(&mut self, t: u64, steps: &BTreeMap<String, u64>, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        self.t = t;
        self.state.clear();
        for (k, m) in tensors {
            if let Some(name) = k.strip_suffix(".exp_avg") {
                let v =
                    tensors.get(&format!("{name}.exp_avg_sq")).with_context(|| format!("optimizer state: '{name}.exp_avg_sq' missing"))?;
                let (m, v): (Vec<f32>, Vec<f32>) = (m.to_dtype(DType::F32)?.to_vec1()?, v.to_dtype(DType::F32)?.to_vec1()?);
                if m.len() != v.len() {
                    bail!("optimizer state: '{name}' has {} first and {} second moments", m.len(), v.len());
                }
                // A copy: the master is updated in place, and the caller keeps its tensor.
                let master = tensors.get(&format!("{name}.master")).map(|t| t.to_dtype(DType::F32)?.copy()).transpose()?;
                let st = ParamState { moments: Moments::Host { m, v }, master, t: steps.get(name).copied().unwrap_or(t) };
                self.state.insert(name.to_string(), st);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel sum of squares against one running f64 sum, on lengths around the block and
    /// lane edges, and the same bits on every call.
    #[test]
    fn the_sum_of_squares_matches_a_running_sum_and_is_deterministic() {
        for n in [0usize, 1, 7, 8, 9, (1 << 16) - 1, 1 << 16, 3 * (1 << 16) + 5] {
            let xs: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3).collect();
            let want: f64 = xs.iter().map(|&x| x as f64 * x as f64).sum();
            let got = sum_squares(&xs);
            assert!((got - want).abs() <= 1e-12 * want.max(1.0), "n = {n}: {got} vs {want}");
            assert_eq!(got.to_bits(), sum_squares(&xs).to_bits(), "n = {n}: the sum changed between calls");
        }
    }

    /// Whether every page of `xs` is in memory (bit 63 of its /proc/self/pagemap entry): written
    /// pages are, pages the kernel handed over untouched are not.
    #[cfg(target_os = "linux")]
    fn resident(xs: &[f32]) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
        let (start, end) = (xs.as_ptr() as usize, xs.as_ptr() as usize + std::mem::size_of_val(xs));
        (start.div_ceil(4096)..end / 4096).all(|page| {
            f.seek(SeekFrom::Start(page as u64 * 8)).unwrap();
            let mut e = [0u8; 8];
            f.read_exact(&mut e).unwrap();
            u64::from_le_bytes(e) >> 63 == 1
        })
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn written_zeros_are_written_where_fresh_pages_stay_untouched() {
        // 64 MB. The control: fresh anonymous pages, which is what calloc hands over from the
        // kernel.
        let n = 16 << 20;
        // SAFETY: a private anonymous mapping of n floats, only read through the slice, unmapped
        // before the test ends.
        let lazy = unsafe {
            let p =
                libc::mmap(std::ptr::null_mut(), n * 4, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            assert_ne!(p, libc::MAP_FAILED);
            std::slice::from_raw_parts(p as *const f32, n)
        };
        let untouched = !resident(lazy);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(lazy.as_ptr() as *mut libc::c_void, n * 4) };
        assert!(untouched, "fresh pages were already in memory: the check cannot tell the two apart");
        let written = written_zeros(n);
        // Checked before anything reads it (a read maps untouched pages to the zero page).
        assert!(resident(&written), "written_zeros left pages untouched");
        assert!(written.iter().all(|&x| x == 0.0));
    }

    /// A [dims] tensor of fixed values in [-0.5, 0.5), different for each seed.
    fn seeded(dims: &[usize], seed: u64) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n as u64).map(|i| ((i * 7919 + seed * 104_729) % 997) as f32 / 997.0 - 0.5).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn the_vectorized_adamw_chunk_gives_the_scalar_formulas_bits() {
        // Lengths around the vector widths, values across magnitudes, a zero moment.
        let k = [0.9f32, 0.999, 1e-8, 5e-6, 1.0 - 5e-6 * 0.01, 1.0 - 0.9f32.powi(3), 1.0 - 0.999f32.powi(3), 0.37];
        for n in [1usize, 7, 8, 9, 31, 64, 1000] {
            let val = |i: usize, s: u64| ((i as u64 * 7919 + s * 104_729) % 997) as f32 / 997.0 - 0.5;
            let g: Vec<f32> = (0..n).map(|i| val(i, 1) * 10f32.powi(i as i32 % 7 - 3)).collect();
            let (mut p, mut m, mut v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                (0..n).map(|i| val(i, 2)).collect(),
                (0..n).map(|i| val(i, 3) * 1e-3).collect(),
                (0..n).map(|i| if i % 5 == 0 { 0.0 } else { val(i, 4).abs() * 1e-4 }).collect(),
            );
            let (mut pr, mut mr, mut vr) = (p.clone(), m.clone(), v.clone());
            let [b1, b2, eps, lr, decay, bc1, bc2, gscale] = k;
            for i in 0..n {
                let gi = g[i] * gscale;
                mr[i] = b1 * mr[i] + (1.0 - b1) * gi;
                vr[i] = b2 * vr[i] + (1.0 - b2) * gi * gi;
                pr[i] = pr[i] * decay - lr * (mr[i] / bc1) / ((vr[i] / bc2).sqrt() + eps);
            }
            adamw_chunk(&mut p, &g, &mut m, &mut v, k);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!((bits(&p), bits(&m), bits(&v)), (bits(&pr), bits(&mr), bits(&vr)), "n = {n}");
        }
    }

    #[test]
    fn a_weight_with_a_sunk_and_a_stored_gradient_gets_their_sum() {
        // W reaches the loss through a projection (its gradient sunk) and through a product
        // with a constant (candle's store): Grads::backward adds the two, over two micro-batches.
        let w = Var::from_tensor(&seeded(&[6, 5], 1)).unwrap();
        let c = seeded(&[6, 5], 2);
        let loss = |x: &Tensor| {
            let proj = crate::ops::linear_nt(x, w.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap();
            (proj + (w.as_tensor() * &c).unwrap().sum_all().unwrap()).unwrap()
        };
        let (x1, x2) = (seeded(&[3, 5], 3), seeded(&[4, 5], 4));
        let store = |x: &Tensor| loss(x).backward().unwrap().get(w.as_tensor()).unwrap().clone();
        let want = (store(&x1) + store(&x2)).unwrap();
        let name = "w".to_string();
        let mut grads = Grads::new();
        grads.backward(&loss(&x1), [(&name, &w)]).unwrap();
        grads.backward(&loss(&x2), [(&name, &w)]).unwrap();
        assert_eq!(grads.sunk, 2, "the projection's contributions went through the sink");
        let d = max_diff(&grads.map["w"], &want);
        assert!(d < 1e-5, "the sum differs from candle's by {d}");
        // Listing W twice is an error, not a lost sum.
        assert!(Grads::new().backward(&loss(&x1), [(&name, &w), (&"w2".to_string(), &w)]).is_err());
    }

    /// Passes its input through; its backward first runs a whole other backward pass on this
    /// thread (another trainer's, as a rayon thread waiting inside one pass may run meanwhile).
    struct Nest(std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>);

    impl candle_core::CustomOp1 for Nest {
        fn name(&self) -> &'static str {
            "test-nest"
        }

        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
            Ok((s.clone(), l.shape().clone()))
        }

        fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
            if let Some(f) = self.0.lock().unwrap().take() {
                f();
            }
            Ok(Some(grad.clone()))
        }
    }

    #[test]
    fn a_backward_pass_nested_inside_another_keeps_each_ones_sums() {
        let var = |dims: &[usize], seed: u64| Var::from_tensor(&seeded(dims, seed)).unwrap();
        let (w, x1, x2) = (var(&[6, 5], 1), var(&[3, 5], 2), var(&[4, 5], 3));
        let (w_inner, x_inner) = (var(&[6, 5], 4), var(&[2, 5], 5));
        let name = "w".to_string();
        let loss = |x: &Var, w: &Var| crate::ops::linear_nt(x.as_tensor(), w.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap();
        // What candle's store gives, for both passes.
        let expect = |x: &Var, w: &Var| loss(x, w).backward().unwrap().get(w.as_tensor()).unwrap().clone();
        let want = (expect(&x1, &w) + expect(&x2, &w)).unwrap();
        let want_inner = expect(&x_inner, &w_inner);

        let mut grads = Grads::new();
        grads.backward(&loss(&x1, &w), [(&name, &w)]).unwrap();
        // The second micro-batch's backward runs the inner pass before W's contribution.
        let inner = std::sync::Arc::new(std::sync::Mutex::new(None));
        let (inner_out, wi, xi) = (inner.clone(), w_inner.clone(), x_inner.clone());
        let nest = Nest(std::sync::Mutex::new(Some(Box::new(move || {
            let mut g = Grads::new();
            g.backward(&loss(&xi, &wi), [(&"w".to_string(), &wi)]).unwrap();
            *inner_out.lock().unwrap() = Some(g);
        }))));
        let y = crate::ops::linear_nt(x2.as_tensor(), w.as_tensor()).unwrap().apply_op1(nest).unwrap();
        grads.backward(&y.sqr().unwrap().sum_all().unwrap(), [(&name, &w)]).unwrap();

        let inner = inner.lock().unwrap().take().expect("the inner pass ran");
        assert_eq!((grads.sunk, inner.sunk), (2, 1), "contributions through the sinks (outer, inner)");
        let (outer_d, inner_d) = (max_diff(&grads.map["w"], &want), max_diff(&inner.map["w"], &want_inner));
        assert!(outer_d < 1e-5, "the outer sum lost a micro-batch: {outer_d}");
        assert!(inner_d < 1e-5, "the inner sum differs by {inner_d}");
    }
}
