//! Gradients and the optimizer: accumulation over micro-batches, global-norm clipping, and a
//! fused in-place AdamW (one pass over each parameter, no temporaries).

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, Var};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

/// Named gradients, summed over the micro-batches added so far.
#[derive(Default)]
pub struct Grads {
    pub map: BTreeMap<String, Tensor>,
    /// Multiplier applied when the optimizer reads the gradients (set by clipping).
    pub scale: f32,
    pub micro_batches: usize,
}

impl Grads {
    pub fn new() -> Self {
        Self { map: BTreeMap::new(), scale: 1.0, micro_batches: 0 }
    }

    /// Adds the gradients of `params` found in `store` (from one `loss.backward()`).
    pub fn accumulate<'a>(&mut self, store: &GradStore, params: impl IntoIterator<Item = (&'a String, &'a Var)>) -> Result<()> {
        for (name, var) in params {
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.detach();
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

    /// √(Σ g²) over every gradient (before the scale).
    pub fn global_norm(&self) -> Result<f32> {
        let mut sq = 0f64;
        for g in self.map.values() {
            sq += crate::ops::with_f32(g, |d| d.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())?;
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
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Updates taken (calls of `step`), for logs.
    pub t: u64,
    /// Per parameter: its first and second moments and its own step count.
    pub state: HashMap<String, ParamState>,
}

/// One parameter's AdamW state.
#[derive(Clone, Debug, Default)]
pub struct ParamState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Steps this parameter has taken.
    pub t: u64,
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
        let (b1, b2, eps, lr, decay, bc1, bc2, gscale) = (self.b1, self.b2, self.eps, self.lr, self.decay, self.bc1, self.bc2, self.gscale);
        const CHUNK: usize = 1 << 14;
        p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK))).for_each(
            |((p, g), (m, v))| {
                for i in 0..p.len() {
                    let gi = g[i] * gscale;
                    m[i] = b1 * m[i] + (1.0 - b1) * gi;
                    v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                    let mh = m[i] / bc1;
                    let vh = v[i] / bc2;
                    p[i] = p[i] * decay - lr * mh / (vh.sqrt() + eps);
                }
            },
        );
        Ok(())
    }
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        Self { cfg, t: 0, state: HashMap::new() }
    }

    /// One update of every parameter that has a gradient in `grads`.
    pub fn step<'a>(&mut self, params: impl IntoIterator<Item = (&'a String, &'a Var)>, grads: &Grads) -> Result<()> {
        self.t += 1;
        let c = &self.cfg;
        for (name, var) in params {
            let Some(g) = grads.map.get(name) else { continue };
            if g.dims() != var.dims() {
                bail!("gradient of '{name}' has shape {:?}, parameter {:?}", g.dims(), var.dims());
            }
            let n = var.elem_count();
            let st = self.state.entry(name.clone()).or_insert_with(|| ParamState { m: vec![0.0; n], v: vec![0.0; n], t: 0 });
            if st.m.len() != n || st.v.len() != n {
                bail!("AdamW state of '{name}' holds {} values, the parameter {n}", st.m.len());
            }
            st.t += 1;
            let bc1 = 1.0 - c.beta1.powf(st.t as f64);
            let bc2 = 1.0 - c.beta2.powf(st.t as f64);
            let op = AdamWUpdate {
                m: RefCell::new(&mut st.m),
                v: RefCell::new(&mut st.v),
                lr: c.lr as f32,
                b1: c.beta1 as f32,
                b2: c.beta2 as f32,
                eps: c.eps as f32,
                decay: (1.0 - c.lr * c.weight_decay) as f32,
                bc1: bc1 as f32,
                bc2: bc2 as f32,
                gscale: grads.scale,
            };
            let g = g.contiguous()?;
            var.as_tensor().inplace_op2(&g, &op).with_context(|| format!("AdamW update of '{name}'"))?;
        }
        Ok(())
    }

    /// The moments as tensors, for checkpoints (the step counts: `param_steps`).
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (k, st) in &self.state {
            out.insert(format!("{k}.exp_avg"), Tensor::from_slice(&st.m, st.m.len(), &candle_core::Device::Cpu)?);
            out.insert(format!("{k}.exp_avg_sq"), Tensor::from_slice(&st.v, st.v.len(), &candle_core::Device::Cpu)?);
        }
        Ok(out)
    }

    /// Each parameter's step count, for checkpoints.
    pub fn param_steps(&self) -> BTreeMap<String, u64> {
        self.state.iter().map(|(k, st)| (k.clone(), st.t)).collect()
    }

    /// Restores the state: `t` updates taken, the moments, and each parameter's step count from
    /// `steps` (a parameter missing there, as in checkpoints written before per-parameter counts,
    /// takes `t`).
    pub fn load_state_tensors(&mut self, t: u64, steps: &BTreeMap<String, u64>, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        self.t = t;
        self.state.clear();
        for (k, m) in tensors {
            if let Some(name) = k.strip_suffix(".exp_avg") {
                let v =
                    tensors.get(&format!("{name}.exp_avg_sq")).with_context(|| format!("optimizer state: '{name}.exp_avg_sq' missing"))?;
                let st = ParamState { m: m.to_vec1()?, v: v.to_vec1()?, t: steps.get(name).copied().unwrap_or(t) };
                if st.m.len() != st.v.len() {
                    bail!("optimizer state: '{name}' has {} first and {} second moments", st.m.len(), st.v.len());
                }
                self.state.insert(name.to_string(), st);
            }
        }
        Ok(())
    }
}
