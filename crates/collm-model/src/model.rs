//! The decoder-only transformer shared by the Llama, Qwen2 and Qwen3 families.
//!
//! One forward serves both sampling and training: with `grad = false` every weight is read
//! detached (no graph is built), with `grad = true` trainable weights are read as variables and
//! frozen ones through [`ops::frozen_linear`], so backward never computes their gradient.
//! Weights use Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...).

use crate::config::ModelConfig;
use crate::ops::{self, AttnMask, RopeTable};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Attention-matrix elements (batch · heads · queries · keys, per layer) above which the fused
/// attention is used: 256K f32 = 1 MiB per layer. Measured on 2 cores, 2026-12-01:
/// `cargo bench -p collm-model --bench kernels -- attention` (forward + backward at SmolLM2's
/// shape, 2×9 heads): fused 16.7 ms against 26.9 ms for the plain ops at 256 tokens, 192 against
/// 394 ms at 1024. `collm bench model` in one session, 4×256-token train step: 9.30 and 9.36 s
/// with this threshold against 10.11 s with 32 MiB; peak RSS 4.6 against 5.1 GB. Tiny models
/// (the synthetic tasks, a few thousand elements per layer) stay on the plain ops, which are
/// faster there.
pub const FUSED_ATTENTION_MIN: usize = 1 << 18;

/// A weight and whether the optimizer updates it.
pub struct Param {
    pub var: Var,
    pub trainable: bool,
}

/// LoRA adapter settings: `W x + (alpha / rank) B A x` on the target modules.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Module names such as `q_proj`, `v_proj`, `gate_proj`.
    pub targets: Vec<String>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

pub struct Transformer {
    pub cfg: ModelConfig,
    pub params: BTreeMap<String, Param>,
    pub lora: Option<LoraConfig>,
    pub device: Device,
    /// The arithmetic this model's passes have done ([`crate::flops`]).
    pub flops: crate::flops::FlopCounter,
    /// The weight bytes this model's passes without a graph (sampling's prefill and decode
    /// steps, scoring) must read at the least: every layer weight once a pass, the output head
    /// once a call of [`Transformer::logits`]. A decode step is bound by these reads.
    pub weight_reads: crate::flops::ByteCounter,
    /// The part of [`Self::flops`] and [`Self::weight_reads`] from passes without a graph over
    /// at most [`crate::ops::SMALL_ROWS`] rows (decode steps, the output head over the rows that
    /// sample): the small-row kernels stream each weight once for them, so they are bound by the
    /// memory's bandwidth, where larger passes (prefill) are bound by the arithmetic.
    pub small_passes: SmallPasses,
}

/// [`Transformer::small_passes`]: their FLOPs and weight bytes.
#[derive(Clone, Default, Debug)]
pub struct SmallPasses {
    pub flops: crate::flops::FlopCounter,
    pub weight_reads: crate::flops::ByteCounter,
}

impl SmallPasses {
    /// Counts a pass without a graph of `rows` rows (a small one only).
    fn add(&self, rows: usize, flops: u64, bytes: u64) {
        if rows <= crate::ops::SMALL_ROWS {
            self.flops.add(flops);
            self.weight_reads.add(bytes);
        }
    }
}

/// The bytes a parameter's values take in memory.
fn param_bytes(p: &Param) -> u64 {
    (p.var.elem_count() * p.var.dtype().size_in_bytes()) as u64
}

/// Keys and values of the tokens seen so far, per layer, for a batch of sequences.
#[derive(Clone)]
pub struct KvCache {
    /// Per layer: keys and values, each [batch, kv_heads, slots, head_dim].
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// Per row: which slots hold real tokens (false = padding).
    pub valid: Vec<Vec<bool>>,
    /// Per row: the position the next real token takes.
    pub next_pos: Vec<u32>,
    /// Per layer: buffers with room for more slots, of which `layers` holds views (and the id
    /// of the key view placed there). A pass without a graph writes its keys and values into
    /// the room in place instead of copying the whole cache with `Tensor::cat` every step (which
    /// copies quadratically over a generation); when the room is full it doubles. A clone shares
    /// the buffers, so a cache whose buffers are shared (or whose `layers` someone replaced)
    /// appends by copying into new ones.
    room: Vec<Option<(Arc<(Tensor, Tensor)>, candle_core::TensorId)>>,
}

impl KvCache {
    pub fn new(batch: usize, num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers], valid: vec![Vec::new(); batch], next_pos: vec![0; batch], room: vec![None; num_layers] }
    }

    /// Appends one layer's new keys and values [batch, kv_heads, new, head_dim] (contiguous) to
    /// layer `l`; returns the layer's whole keys and values. With `in_place` (a pass without a
    /// graph) they go into the layer's room; otherwise (a graph may hold the old tensors) the
    /// layer is concatenated anew.
    pub(crate) fn append(&mut self, l: usize, k: Tensor, v: Tensor, in_place: bool) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.layers[l].take() {
            None => (k, v),
            Some((pk, pv)) if !in_place => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            Some((pk, pv)) => {
                let (past, len) = (pk.dim(2)?, pk.dim(2)? + k.dim(2)?);
                let fits = match &self.room[l] {
                    Some((buf, id)) => *id == pk.id() && Arc::strong_count(buf) == 1 && buf.0.dim(2)? >= len,
                    None => false,
                };
                let buf = if fits {
                    self.room[l].take().expect("checked above").0
                } else {
                    let (b, h, _, d) = k.dims4()?;
                    let cap = (2 * len).max(len + 64);
                    let (bk, bv) =
                        (Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?, Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?);
                    bk.slice_set(&pk.contiguous()?, 2, 0)?;
                    bv.slice_set(&pv.contiguous()?, 2, 0)?;
                    Arc::new((bk, bv))
                };
                buf.0.slice_set(&k, 2, past)?;
                buf.1.slice_set(&v, 2, past)?;
                let (nk, nv) = (buf.0.narrow(2, 0, len)?, buf.1.narrow(2, 0, len)?);
                self.room[l] = Some((buf, nk.id()));
                (nk, nv)
            }
        };
        self.layers[l] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
    pub fn batch(&self) -> usize {
        self.valid.len()
    }
    pub fn slots(&self) -> usize {
        self.valid.first().map_or(0, |v| v.len())
    }
    /// A cache holding the rows `rows` of this one (rows may repeat: K samples share a prompt).
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), &Device::Cpu)?;
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => {
                    let idx = idx.to_device(k.device())?;
                    Ok(Some((k.contiguous()?.index_select(&idx, 0)?, v.contiguous()?.index_select(&idx, 0)?)))
                }
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            room: vec![None; layers.len()],
            layers,
            valid: rows.iter().map(|&r| self.valid[r].clone()).collect(),
            next_pos: rows.iter().map(|&r| self.next_pos[r]).collect(),
        })
    }
}

/// The memory this process may still allocate: the machine's available memory, or less under an
/// address-space limit (None where neither can be read).
pub fn available_memory() -> Option<u64> {
    let meminfo = crate::devcheck::kb_field("/proc/meminfo", "MemAvailable:");
    let limit = std::fs::read_to_string("/proc/self/limits").ok().and_then(|l| {
        let line = l.lines().find(|l| l.starts_with("Max address space"))?;
        let cap = line.split_whitespace().nth(3)?.parse::<u64>().ok()?;
        Some(cap.saturating_sub(crate::devcheck::kb_field("/proc/self/status", "VmSize:")?))
    });
    match (meminfo, limit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Names and shapes of every tensor a model of this config has.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (qd, kvd) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, h])];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![h]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![qd, h]));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![kvd, h]));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![kvd, h]));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, qd]));
        if cfg.qkv_bias {
            v.push((format!("{p}.self_attn.q_proj.bias"), vec![qd]));
            v.push((format!("{p}.self_attn.k_proj.bias"), vec![kvd]));
            v.push((format!("{p}.self_attn.v_proj.bias"), vec![kvd]));
        }
        if cfg.qk_norm {
            v.push((format!("{p}.self_attn.q_norm.weight"), vec![d]));
            v.push((format!("{p}.self_attn.k_norm.weight"), vec![d]));
        }
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
    }
    v.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    v
}

/// The block a LoRA target module lives in, and its fan-in and fan-out (A is [rank, fan_in], B [fan_out, rank]).
fn lora_shapes(cfg: &ModelConfig, module: &str) -> Result<(String, usize, usize)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    Ok(match module {
        "q_proj" => ("self_attn".into(), h, qd),
        "k_proj" => ("self_attn".into(), h, kvd),
        "v_proj" => ("self_attn".into(), h, kvd),
        "o_proj" => ("self_attn".into(), qd, h),
        "gate_proj" => ("mlp".into(), h, i),
        "up_proj" => ("mlp".into(), h, i),
        "down_proj" => ("mlp".into(), i, h),
        other => bail!("unknown LoRA target module '{other}' (use q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"),
    })
}

impl Transformer {
    /// Builds a model from named tensors, checking that every tensor is there with its shape.
    pub fn from_tensors(cfg: ModelConfig, mut tensors: BTreeMap<String, Tensor>, source: &str) -> Result<Self> {
        pin_thread_count();
        cfg.validate().with_context(|| format!("{source}: invalid model config"))?;
        let mut params = BTreeMap::new();
        let device = tensors.values().next().map(|t| t.device().clone()).unwrap_or(Device::Cpu);
        for (name, shape) in expected_tensors(&cfg) {
            let t = tensors.remove(&name).with_context(|| format!("{source}: missing tensor '{name}'"))?;
            if t.dims() != shape.as_slice() {
                bail!("{source}: tensor '{name}' has shape {:?}, expected {:?}", t.dims(), shape);
            }
            let t = t.to_dtype(DType::F32)?;
            params.insert(name, Param { var: Var::from_tensor(&t)?, trainable: true });
        }
        let model = Self {
            cfg,
            params,
            lora: None,
            device,
            flops: Default::default(),
            weight_reads: Default::default(),
            small_passes: Default::default(),
        };
        model.back_with_huge_pages();
        Ok(model)
    }

    /// A randomly initialised model: N(0, 0.02) matrices, unit norms, zero biases. A config whose
    /// weights alone would not fit in the memory this process may use is an error, not an abort.
    pub fn random(cfg: ModelConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let need = cfg.param_count().saturating_mul(4);
        if let Some(have) = available_memory() {
            if need > have {
                bail!(
                    "a model of this size has {} weights ({:.1} GiB in f32) but only {:.1} GiB of memory is available",
                    cfg.param_count(),
                    need as f64 / (1u64 << 30) as f64,
                    have as f64 / (1u64 << 30) as f64
                );
            }
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        for (name, shape) in expected_tensors(&cfg) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                (0..n).map(|_| rng.random_range(-0.02..0.02)).collect()
            } else {
                (0..n).map(|_| normal(&mut rng) * 0.02).collect()
            };
            tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Self::from_tensors(cfg, tensors, "random init")
    }

    /// Adds LoRA adapters (A ~ N(0, 0.02), B = 0) and freezes every other weight.
    pub fn add_lora(&mut self, lora: LoraConfig, seed: u64) -> Result<()> {
        if self.lora.is_some() {
            bail!("the model already has LoRA adapters");
        }
        if lora.rank == 0 {
            bail!("LoRA rank must be at least 1");
        }
        let mut rng = StdRng::seed_from_u64(seed);
        for p in self.params.values_mut() {
            p.trainable = false;
        }
        for l in 0..self.cfg.num_layers {
            for m in &lora.targets {
                let (block, fan_in, fan_out) = lora_shapes(&self.cfg, m)?;
                let p = format!("model.layers.{l}.{block}.{m}");
                let a: Vec<f32> = (0..lora.rank * fan_in).map(|_| normal(&mut rng) * 0.02).collect();
                let a = Tensor::from_vec(a, (lora.rank, fan_in), &self.device)?;
                let b = Tensor::zeros((fan_out, lora.rank), DType::F32, &self.device)?;
                self.params.insert(format!("{p}.lora_A.weight"), Param { var: Var::from_tensor(&a)?, trainable: true });
                self.params.insert(format!("{p}.lora_B.weight"), Param { var: Var::from_tensor(&b)?, trainable: true });
            }
        }
        self.lora = Some(lora);
        Ok(())
    }

    /// Folds the LoRA adapters into the base weights (W += scale · B A) and removes them.
    pub fn merge_lora(&mut self) -> Result<()> {
        if self.lora.is_none() {
            return Ok(());
        }
        // Every weight trains after the merge: a frozen base held in bf16 comes back to the
        // model's dtype first, so the sums below and the optimizer see it as the rest.
        self.hold_frozen_in(self.dtype())?;
        let Some(lora) = self.lora.take() else { return Ok(()) };
        let names: Vec<String> = self.params.keys().filter(|k| k.ends_with(".lora_A.weight")).cloned().collect();
        for a_name in names {
            let prefix = a_name.trim_end_matches(".lora_A.weight").to_string();
            let a = self.params.remove(&a_name).unwrap().var.as_detached_tensor();
            let b = self.params.remove(&format!("{prefix}.lora_B.weight")).unwrap().var.as_detached_tensor();
            let w = &self.params[&format!("{prefix}.weight")].var;
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let merged = (f32(&w.as_detached_tensor())? + (f32(&b)?.matmul(&f32(&a)?)? * lora.scale())?)?;
            w.set(&merged.to_dtype(w.dtype())?)?;
        }
        for p in self.params.values_mut() {
            p.trainable = true;
        }
        Ok(())
    }

    /// A copy with the LoRA adapters folded in, or None when the model has none (use it as it is):
    /// `let m = model.lora_merged()?; let m = m.as_ref().unwrap_or(model);`.
    pub fn lora_merged(&self) -> Result<Option<Transformer>> {
        if self.lora.is_none() {
            return Ok(None);
        }
        let mut c = self.deep_clone()?;
        c.merge_lora()?;
        Ok(Some(c))
    }

    /// The dtype the weights are held and computed in: F32, or BF16 (whose f32 master weights
    /// the optimizer keeps). A frozen base held apart ([`Self::hold_frozen_in`]) does not
    /// change it: this is the final norm's dtype.
    pub fn dtype(&self) -> DType {
        self.params.get("model.norm.weight").or_else(|| self.params.values().next()).map_or(DType::F32, |p| p.var.dtype())
    }

    /// Holds the frozen weight matrices (a LoRA run's base: the projections, the embedding and
    /// the output head) in `dtype`. BF16 on an f32 CPU model halves their memory and the bytes
    /// a decode step streams; the CPU kernels widen each block of rows to f32 inside the
    /// product (exact), so a pass computes in f32 on the bf16-rounded values. The model's own
    /// dtype brings them back. Trainable weights, norms and biases stay as they are.
    /// [`Self::place`] on the model's own device and dtype leaves a bf16 base as it is; placing
    /// it elsewhere, or merging the adapters, widens the base to the model's dtype again (its
    /// bf16-rounded values, not the ones loaded).
    pub fn hold_frozen_in(&mut self, dtype: DType) -> Result<()> {
        let own = self.dtype();
        if dtype != own {
            if dtype != DType::BF16 || own != DType::F32 || !self.device.is_cpu() {
                bail!("a frozen base is held in bf16 only under an f32 model on the CPU (this one is {own:?} on {:?})", self.device);
            }
            if !self.params.values().any(|p| !p.trainable && p.var.rank() == 2) {
                bail!("this model has no frozen weight matrix to hold in bf16 (add LoRA adapters first)");
            }
        }
        let mut changed = false;
        for (name, p) in self.params.iter_mut().filter(|(_, p)| !p.trainable && p.var.rank() == 2 && p.var.dtype() != dtype) {
            let t = p.var.as_detached_tensor().to_dtype(dtype).with_context(|| format!("holding '{name}' in {dtype:?}"))?;
            p.var = Var::from_tensor(&t)?;
            changed = true;
        }
        if changed {
            self.back_with_huge_pages();
        }
        Ok(())
    }

    /// The dtype the frozen weight matrices are held in ([`Self::hold_frozen_in`]), when the
    /// model has any.
    pub fn frozen_dtype(&self) -> Option<DType> {
        self.params.values().find(|p| !p.trainable && p.var.rank() == 2).map(|p| p.var.dtype())
    }

    /// Puts every weight (LoRA adapters included) on `device` in `dtype` (F32 or BF16). Done
    /// once, before training: a model never moves in the hot loop.
    pub fn place(&mut self, device: &Device, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            bail!("a model is held in f32 or bf16, not {dtype:?}");
        }
        if self.dtype() == dtype && self.device.same_device(device) {
            return Ok(());
        }
        for (name, p) in self.params.iter_mut() {
            let t =
                p.var.as_detached_tensor().to_dtype(dtype)?.to_device(device).with_context(|| format!("moving '{name}' to {device:?}"))?;
            p.var = Var::from_tensor(&t)?;
        }
        self.device = device.clone();
        self.back_with_huge_pages();
        Ok(())
    }

    pub fn trainable(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.params.iter().filter(|(_, p)| p.trainable).map(|(n, p)| (n, &p.var))
    }

    pub fn num_params(&self) -> usize {
        self.params.values().map(|p| p.var.elem_count()).sum()
    }

    /// The weight `name`, as a graph variable when training and it is trainable, else detached.
    fn w(&self, name: &str, grad: bool) -> Result<Tensor> {
        let p = self.params.get(name).with_context(|| format!("model has no tensor '{name}'"))?;
        Ok(if grad && p.trainable { p.var.as_tensor().clone() } else { p.var.as_detached_tensor() })
    }

    /// A projection with its bias and LoRA adapter. The decode step (`decode_cpu::project`)
    /// repeats this epilogue on raw slices: a change here goes there too.
    fn linear(&self, x: &Tensor, prefix: &str, grad: bool) -> Result<Tensor> {
        let wname = format!("{prefix}.weight");
        let p = self.params.get(&wname).with_context(|| format!("model has no tensor '{wname}'"))?;
        let aname = format!("{prefix}.lora_A.weight");
        let adapter = match &self.lora {
            Some(lora) if self.params.contains_key(&aname) => {
                Some((lora.scale(), self.w(&aname, grad)?, self.w(&format!("{prefix}.lora_B.weight"), grad)?))
            }
            _ => None,
        };
        let mut y = match &adapter {
            // A frozen base with a LoRA adapter: one op for both.
            Some((scale, a, b)) if !p.trainable => ops::lora_linear(x, &p.var.as_detached_tensor(), a, b, *scale)?,
            _ if grad && p.trainable => ops::linear_nt(x, p.var.as_tensor())?,
            _ if grad => ops::frozen_linear(x, p.var.as_tensor())?,
            _ => ops::linear_nt(x, &p.var.as_detached_tensor())?,
        };
        let bname = format!("{prefix}.bias");
        if self.params.contains_key(&bname) {
            y = y.broadcast_add(&self.w(&bname, grad)?)?;
        }
        // A trainable base keeps its adapter as a separate term.
        if let (Some((scale, a, b)), true) = (&adapter, p.trainable) {
            let delta = ops::linear_nt(&ops::linear_nt(x, a)?, b)?;
            y = (y + (delta * *scale)?)?;
        }
        Ok(y)
    }

    /// Whether the projection `prefix` is its weight alone: no bias, no LoRA adapter.
    fn plain(&self, prefix: &str) -> bool {
        !self.params.contains_key(&format!("{prefix}.bias")) && !self.params.contains_key(&format!("{prefix}.lora_A.weight"))
    }

    /// res + the projection `prefix` of x. With a graph, a projection without bias or adapter
    /// is one op ([`ops::residual_linear`]): no separate output tensor kept for the backward, no
    /// add node.
    fn residual(&self, res: &Tensor, x: &Tensor, prefix: &str, grad: bool) -> Result<Tensor> {
        if grad && self.plain(prefix) {
            return Ok(ops::residual_linear(res, x, &self.w(&format!("{prefix}.weight"), grad)?)?);
        }
        Ok((res + self.linear(x, prefix, grad)?)?)
    }

    /// Runs `tokens` ([batch][new]) through the model after what `cache` holds, appending their
    /// keys and values. `valid[b][t]` is false for padding. Returns hidden states [batch, new, hidden]
    /// after the final norm.
    pub fn forward(&self, tokens: &[Vec<u32>], valid: &[Vec<bool>], cache: &mut KvCache, grad: bool) -> Result<Tensor> {
        let cfg = &self.cfg;
        let b = tokens.len();
        if b == 0 || b != cache.batch() || valid.len() != b {
            bail!("forward: batch of {b} rows, cache of {}, mask of {}", cache.batch(), valid.len());
        }
        let t = tokens[0].len();
        if tokens.iter().any(|r| r.len() != t) || valid.iter().any(|r| r.len() != t) {
            bail!("forward: rows must be padded to one length");
        }
        let ctx = cfg.max_position_embeddings;
        for r in 0..b {
            let n = cache.next_pos[r] as usize + valid[r].iter().filter(|&&v| v).count();
            if n > ctx {
                bail!(
                    "a sequence of {n} tokens is longer than the model's context of {ctx} tokens (max_position_embeddings): shorten the prompt or history, or lower max_new_tokens"
                );
            }
        }
        let past = cache.slots();
        let mut flat = Vec::with_capacity(b * t);
        let mut positions = Vec::with_capacity(b * t);
        for r in 0..b {
            for j in 0..t {
                let id = tokens[r][j];
                if id as usize >= cfg.vocab_size {
                    bail!("token id {id} is outside the vocabulary ({} tokens)", cfg.vocab_size);
                }
                flat.push(id);
                positions.push(cache.next_pos[r]);
                if valid[r][j] {
                    cache.next_pos[r] += 1;
                }
            }
            cache.valid[r].extend_from_slice(&valid[r]);
        }
        let flops = self.pass_flops(valid, &positions, grad);
        self.flops.add(flops);
        if !grad {
            let bytes = self.params.iter().filter(|(n, _)| n.starts_with("model.layers.")).map(|(_, p)| param_bytes(p)).sum();
            self.weight_reads.add(bytes);
            self.small_passes.add(b * t, flops, bytes);
        }
        let rope = RopeTable::new(&positions, cfg.head_dim, cfg.rope_theta);
        if crate::decode_cpu::applies(self, b, t, grad) {
            return crate::decode_cpu::step(self, &flat, cache, &rope);
        }
        let mask = AttnMask::causal(&cache.valid, past, t);
        let ids = Tensor::from_vec(flat, b * t, &self.device)?;
        let mut x = ops::embedding(&self.w("model.embed_tokens.weight", grad)?, &ids)?.reshape((b, t, cfg.hidden_size))?;
        if x.dtype() != self.dtype() {
            // Rows of a table held in bf16 under an f32 model.
            x = x.to_dtype(self.dtype())?;
        }
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let h = ops::rms_norm(&x, &self.w(&format!("{p}.input_layernorm.weight"), grad)?, cfg.rms_norm_eps)?;
            // Head-major, rotated: the query heads that share a key/value head grouped,
            // [b, nkv, n_rep * t, hd]; keys and values [b, nkv, t, hd]. With a graph, plain
            // projections go into heads in one op each (ops::linear_heads).
            let proj = |m: &str| format!("{p}.self_attn.{m}");
            let (qg, k, v) = if grad && !cfg.qk_norm && ["q_proj", "k_proj", "v_proj"].iter().all(|m| self.plain(&proj(m))) {
                let w = |m: &str| self.w(&format!("{}.weight", proj(m)), grad);
                (
                    ops::linear_heads(&h, &w("q_proj")?, Some(&rope), nh, nkv)?,
                    ops::linear_heads(&h, &w("k_proj")?, Some(&rope), nkv, nkv)?,
                    ops::linear_heads(&h, &w("v_proj")?, None, nkv, nkv)?,
                )
            } else {
                let mut q = self.linear(&h, &proj("q_proj"), grad)?; // [b, t, nh * hd]
                let mut k = self.linear(&h, &proj("k_proj"), grad)?;
                let v = self.linear(&h, &proj("v_proj"), grad)?;
                if cfg.qk_norm {
                    let (qw, kw) =
                        (self.w(&format!("{p}.self_attn.q_norm.weight"), grad)?, self.w(&format!("{p}.self_attn.k_norm.weight"), grad)?);
                    q = ops::rms_norm(&q.reshape((b, t, nh, hd))?, &qw, cfg.rms_norm_eps)?;
                    k = ops::rms_norm(&k.reshape((b, t, nkv, hd))?, &kw, cfg.rms_norm_eps)?;
                }
                (ops::to_heads(&q, Some(&rope), nh, nkv)?, ops::to_heads(&k, Some(&rope), nkv, nkv)?, ops::to_heads(&v, None, nkv, nkv)?)
            };
            let (k, v) = cache.append(l, k, v, !grad)?;
            // Long passes take the fused block-wise attention, which keeps no [t, k_len] matrix
            // per layer (it recomputes them in the backward); short ones the plain ops, faster
            // when the matrices are small.
            let o = if b * nh * t * mask.k_len > FUSED_ATTENTION_MIN {
                ops::attention(&qg, &k, &v, &mask, scale)?
            } else {
                ops::attention_unfused(&qg, &k, &v, &mask, scale)?
            };
            let o = ops::from_heads(&o, nh)?; // [b, t, nh * hd]
            x = self.residual(&x, &o, &format!("{p}.self_attn.o_proj"), grad)?;
            let h = ops::rms_norm(&x, &self.w(&format!("{p}.post_attention_layernorm.weight"), grad)?, cfg.rms_norm_eps)?;
            let gate = self.linear(&h, &format!("{p}.mlp.gate_proj"), grad)?;
            let up = self.linear(&h, &format!("{p}.mlp.up_proj"), grad)?;
            x = self.residual(&x, &ops::swiglu(&gate, &up)?, &format!("{p}.mlp.down_proj"), grad)?;
        }
        Ok(ops::rms_norm(&x, &self.w("model.norm.weight", grad)?, cfg.rms_norm_eps)?)
    }

    /// The FLOPs ([`crate::flops`]) of one pass of the layers over the real tokens of `valid`
    /// at `positions` (flattened row by row), the output head excluded.
    fn pass_flops(&self, valid: &[Vec<bool>], positions: &[u32], grad: bool) -> u64 {
        let real: Vec<u32> = valid.iter().flatten().zip(positions).filter(|(v, _)| **v).map(|(_, &p)| p).collect();
        let tokens = real.len() as u64;
        let mut n = 0;
        for (name, p) in &self.params {
            if p.var.rank() == 2 && name.starts_with("model.layers.") {
                n += crate::flops::linear(p.var.elem_count() as u64, tokens, grad, p.trainable);
            }
        }
        let keys_seen: u64 = real.iter().map(|&p| p as u64 + 1).sum();
        let cfg = &self.cfg;
        n + cfg.num_layers as u64 * crate::flops::attention(keys_seen, cfg.num_heads as u64, cfg.head_dim as u64, grad)
    }

    /// Output logits for hidden rows [n, hidden] → [n, vocab], in f32 whatever the model's dtype
    /// (log-softmax, sampling and the losses work in f32).
    pub fn logits(&self, hidden: &Tensor, grad: bool) -> Result<Tensor> {
        let name = if self.cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        let p = &self.params[name];
        let rows = (hidden.elem_count() / self.cfg.hidden_size.max(1)) as u64;
        let flops = crate::flops::linear(p.var.elem_count() as u64, rows, grad, p.trainable);
        self.flops.add(flops);
        if !grad {
            self.weight_reads.add(param_bytes(p));
            self.small_passes.add(rows as usize, flops, param_bytes(p));
        }
        let l = if grad && p.trainable {
            ops::linear_nt(hidden, p.var.as_tensor())?
        } else if grad {
            ops::frozen_linear(hidden, p.var.as_tensor())?
        } else {
            ops::linear_nt(hidden, &p.var.as_detached_tensor())?
        };
        Ok(l.to_dtype(DType::F32)?)
    }

    /// Every weight, detached, by name (LoRA tensors included), in f32 on the host whatever the
    /// model's dtype and device (bf16 widens exactly).
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        self.params
            .iter()
            .map(|(n, p)| Ok((n.clone(), p.var.as_detached_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
            .collect()
    }

    /// Puts this model's host weights on 2 MiB pages where the kernel allows
    /// ([`crate::hugepages`]); returns the bytes moved. The values stay as they are. Every
    /// constructor and every change of the weights' storage calls it.
    pub fn back_with_huge_pages(&self) -> u64 {
        use candle_core::{CpuStorage, Storage};
        let buffers: Vec<(usize, usize)> = self
            .params
            .values()
            .filter_map(|p| {
                let (s, _) = p.var.as_tensor().storage_and_layout();
                match &*s {
                    Storage::Cpu(CpuStorage::F32(v)) => Some(crate::hugepages::span(v)),
                    Storage::Cpu(CpuStorage::BF16(v)) => Some(crate::hugepages::span(v)),
                    _ => None,
                }
            })
            .collect();
        crate::hugepages::back_with_huge_pages(buffers)
    }

    /// A deep copy (own storage) of this model, e.g. to keep a reference policy.
    pub fn deep_clone(&self) -> Result<Self> {
        let mut params = BTreeMap::new();
        for (n, p) in &self.params {
            params.insert(n.clone(), Param { var: Var::from_tensor(&p.var.as_detached_tensor().copy()?)?, trainable: p.trainable });
        }
        let model = Self {
            cfg: self.cfg.clone(),
            params,
            lora: self.lora.clone(),
            device: self.device.clone(),
            flops: Default::default(),
            weight_reads: Default::default(),
            small_passes: Default::default(),
        };
        model.back_with_huge_pages();
        Ok(model)
    }
}

/// candle asks for its thread count on every matmul and, unless `RAYON_NUM_THREADS` is set,
/// re-reads /proc/cpuinfo each time (a tenth of decode time, measured with perf). Setting the
/// variable once, before the model runs, makes that a cheap lookup.
///
/// It also keeps glibc's malloc from handing each freed tensor back to the kernel. By default
/// a buffer above 128 KiB (raised as large ones are freed) is its own mmap, unmapped on free,
/// and the heap is trimmed as soon as 128 KiB lie free at its top, so the next pass's tensors
/// come back as fresh pages the kernel must fault in and zero one by one. Measured on SmolLM2-135M,
/// a 4×256-token LoRA backward on 2 cores (AMD EPYC, 2026-12-06): 4.0–4.4 s with 3.8 M page
/// faults by default, 2.8–2.9 s and 1.4 M faults with buffers up to 32 MiB (glibc's largest
/// mmap threshold) kept in the heap and no trimming. The peak resident memory does not grow:
/// what stays mapped is what the peak needed anyway. Buffers above 32 MiB (the output head's
/// logits and their gradient, [rows, vocab]) were still mmapped and unmapped each pass, and an
/// unmap on a multi-threaded process interrupts the other cores to flush their TLBs; with no
/// mmap at all they stay in the heap too. Measured on SmolLM2-135M, a full 4×256-token train
/// step on 2 cores (Intel Xeon, AVX-512, 2026-12-06): 3.7 M page faults and 6.40 s before,
/// 1.95 M and 6.18 s after, peak RSS unchanged (4.1 GB). Threads share one arena (unless
/// `MALLOC_ARENA_MAX` or a `glibc.malloc.arena_max` tunable says otherwise): `collm bench train
/// --algo cc` peaked at 6683 MB with glibc's default arenas, 6600 with two and 6546 with one, at
/// the same speed (Intel Xeon, 2026-12-06).
///
/// And it keeps candle's own worker threads from spinning on a core the GEMMs need. candle runs
/// its elementwise ops on a pool of threads pinned one per core, which after each op spin 25,000
/// times (`pause`, half a millisecond or more) waiting for the next one before they sleep; collm's
/// GEMMs run on rayon's threads, so after every candle op a GEMM shared a core with a spinning
/// thread. With the limit at [`BARRIER_POOL_SPIN_LIMIT`] (unless `CANDLE_BARRIER_POOL_SPIN_LIMIT`
/// is set) they sleep at once. Measured with `collm bench model` on SmolLM2-135M, 2 cores (AMD
/// EPYC, 2026-12-06), three runs each: a full 4×256-token train step 6.42–6.62 s with candle's
/// default, 5.69–5.84 s (one run 6.88) with 0 and 5.53–5.80 with 1000; LoRA 4.47–4.74 s, 3.94–4.42
/// and 4.26–4.60; decode at batch 1 and 8 unchanged within the noise.
pub fn pin_thread_count() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only sets allocator parameters; it is called once, before the model runs.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_MMAP_MAX, 0);
            // One heap for all threads: with nothing returned to the kernel, a buffer freed in
            // one thread's arena could not serve the next pass's allocation in another's.
            let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
            if std::env::var_os("MALLOC_ARENA_MAX").is_none() && !tunables.contains("arena_max") {
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
        }
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
            std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", BARRIER_POOL_SPIN_LIMIT.to_string());
        }
    });
}

/// Runs `f` on one of rayon's pool threads (at once when already on one), the caller waiting.
/// Every parallel product inside then splits its work between that thread and the pool's others;
/// called from outside the pool, each one handed all its work to the pool and put the calling
/// thread to sleep until done, two context switches per op. On the Xeon (2 cores) `collm bench
/// train --algo cc` updated in 36.0 and 36.8 s this way against 39.9 and 37.8 s, run in turn.
/// Thread-local switches set by the caller ([`crate::ops::with_generic_ops`],
/// [`crate::score::without_prefix_sharing`]) do not reach `f`.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

/// How many times candle's pool threads spin waiting for work before they sleep (see
/// [`pin_thread_count`]; candle's default is 25,000).
pub const BARRIER_POOL_SPIN_LIMIT: u32 = 0;

/// A standard normal sample (Box–Muller), so results do not depend on a distributions crate.
pub fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_pool_runs_on_a_pool_thread_and_stays_there_when_nested() {
        assert_eq!(rayon::current_thread_index(), None, "the test itself runs outside rayon's pool");
        let (outer, inner) = on_pool(|| (rayon::current_thread_index(), on_pool(rayon::current_thread_index)));
        assert!(outer.is_some(), "f ran on the calling thread");
        assert_eq!(inner, outer, "a nested call moved to another thread");
    }
}
