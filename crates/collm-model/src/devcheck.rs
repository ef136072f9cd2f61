//! Checks of a device against the CPU: every op collm has, run through the generic path on the
//! device, against the fused CPU kernel on the same inputs (forward and every input gradient),
//! each CUDA kernel against the generic path on the same device (f32 and bf16), and random-init
//! models of real shapes built straight on a device. `collm bench gpu` prints these; the CPU
//! tests run the same checks with the generic path forced.

use crate::cuda::{self, with_kernels, Kernel, KernelSet};
use crate::model::{expected_tensors, Transformer};
use crate::ops::{self, with_generic_ops, AttnMask, RopeTable};
use crate::ModelConfig;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::BTreeMap;

/// One op's agreement: the largest output difference and the largest gradient difference, each
/// relative to the reference's largest magnitude (at least 1).
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpCheck {
    pub op: &'static str,
    pub output: f32,
    pub gradient: f32,
}

impl OpCheck {
    /// Within 1e-4 (f32).
    pub fn passed(&self) -> bool {
        self.output <= 1e-4 && self.gradient <= 1e-4
    }
}

fn seeded(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    Ok(Tensor::from_vec((0..n).map(|_| crate::model::normal(&mut rng)).collect::<Vec<f32>>(), shape, &Device::Cpu)?)
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn rel_diff(reference: &Tensor, other: &Tensor) -> Result<f32> {
    let o = other.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    Ok(max_abs(&(reference - o)?)? / max_abs(reference)?.max(1.0))
}

type OpFn = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// Runs `op` on `inputs` (host tensors) placed on `device`; returns the output and the gradient
/// of Σ out · w with respect to each input, on the host.
fn run_op(op: &OpFn, inputs: &[Tensor], device: &Device) -> Result<(Tensor, Vec<Tensor>)> {
    run_op_in(op, inputs, device, DType::F32)
}

/// [`run_op`] with the inputs in `dtype`.
fn run_op_in(op: &OpFn, inputs: &[Tensor], device: &Device, dtype: DType) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = inputs.iter().map(|t| Var::from_tensor(&t.to_device(device)?.to_dtype(dtype)?)).collect::<candle_core::Result<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = op(&ts)?;
    let w = seeded(out.dims(), 99)?.to_device(device)?;
    let store = (out.to_dtype(DType::F32)? * w)?.sum_all()?.backward()?;
    let grads = vars
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let g = store.get(v.as_tensor()).with_context(|| format!("input {i} got no gradient on {device:?}"))?;
            Ok(g.to_device(&Device::Cpu)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((out.to_device(&Device::Cpu)?, grads))
}

/// Every op through the generic path on `device` (forced on a CPU; no CUDA kernel switched on)
/// against the fused CPU kernel.
pub fn check_ops(device: &Device) -> Result<Vec<OpCheck>> {
    with_kernels(KernelSet::NONE, || check_ops_generic(device))
}

fn check_ops_generic(device: &Device) -> Result<Vec<OpCheck>> {
    let valid: Vec<Vec<bool>> = (0..2).map(|r| (0..40).map(|j| r == 0 || !(j < 3 || (20..23).contains(&j))).collect()).collect();
    let mask = AttnMask::causal(&valid, 8, 32);
    let long = AttnMask::causal(&(0..2).map(|r| (0..140).map(|j| r == 0 || j >= 5).collect()).collect::<Vec<_>>(), 10, 130);
    let positions: Vec<u32> = (0..2 * 5).map(|i| (i * 7 % 13) as u32).collect();
    let table = RopeTable::new(&positions, 8, 10000.0);
    let frozen = seeded(&[10, 16], 7)?;
    let (m1, m2, t) = (mask.clone(), long.clone(), table.clone());
    let cases: Vec<(&'static str, Vec<Vec<usize>>, OpFn)> = vec![
        ("attn_softmax", vec![vec![2, 3, 32, 40]], Box::new(move |x| Ok(ops::attn_softmax(&x[0], &m1, 0.3)?))),
        ("rms_norm", vec![vec![2, 5, 24], vec![24]], Box::new(|x| Ok(ops::rms_norm(&x[0], &x[1], 1e-5)?))),
        ("rope", vec![vec![2, 5, 3, 8]], Box::new(move |x| Ok(ops::rope(&x[0], &t)?))),
        ("token_logprobs", vec![vec![6, 50]], Box::new(|x| Ok(ops::token_logprobs(&x[0], &[0, 7, 49, 3, 3, 21])?))),
        ("frozen_linear", vec![vec![3, 4, 16]], Box::new(move |x| Ok(ops::frozen_linear(&x[0], &frozen.to_device(x[0].device())?)?))),
        ("linear", vec![vec![3, 4, 16], vec![10, 16]], Box::new(|x| Ok(ops::linear_nt(&x[0], &x[1])?))),
        (
            "attention",
            vec![vec![2, 2, 96, 8], vec![2, 2, 40, 8], vec![2, 2, 40, 8]],
            Box::new(move |x| Ok(ops::attention(&x[0], &x[1], &x[2], &mask, 0.35)?)),
        ),
        (
            "attention (long)",
            vec![vec![2, 1, 260, 8], vec![2, 1, 140, 8], vec![2, 1, 140, 8]],
            Box::new(move |x| Ok(ops::attention(&x[0], &x[1], &x[2], &m2, 0.35)?)),
        ),
    ];
    let mut out = vec![];
    for (i, (name, shapes, op)) in cases.iter().enumerate() {
        let inputs = shapes.iter().enumerate().map(|(j, s)| seeded(s, 10 * i as u64 + j as u64)).collect::<Result<Vec<_>>>()?;
        let (want, want_g) = run_op(op, &inputs, &Device::Cpu)?;
        let (got, got_g) = if device.is_cpu() { with_generic_ops(|| run_op(op, &inputs, device))? } else { run_op(op, &inputs, device)? };
        let mut gradient = 0f32;
        for (a, b) in want_g.iter().zip(&got_g) {
            gradient = gradient.max(rel_diff(a, b)?);
        }
        out.push(OpCheck { op: name, output: rel_diff(&want, &got)?, gradient });
    }
    Ok(out)
}

/// One CUDA kernel against the generic path on the same device and inputs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelCheck {
    pub kernel: &'static str,
    pub case: &'static str,
    pub dtype: String,
    /// Largest output and gradient differences, relative to the generic path's largest magnitude.
    pub output: f32,
    pub gradient: f32,
    /// Whether the kernel ran (else the op fell back to the generic path, and nothing was compared).
    pub ran: bool,
    pub tolerance: f32,
}

impl KernelCheck {
    pub fn passed(&self) -> bool {
        self.ran && self.output <= self.tolerance && self.gradient <= self.tolerance
    }
}

/// The tolerance of a kernel check: 1e-4 in f32 (as the fused CPU kernels), 3e-2 in bf16 (the
/// kernels round once where the generic path rounds after every op).
pub fn kernel_tolerance(dtype: DType) -> f32 {
    if dtype == DType::F32 {
        1e-4
    } else {
        3e-2
    }
}

/// Each CUDA kernel on `device` against the generic path on the same device, in f32 and bf16, on
/// shapes of the models collm trains (grouped-query attention with padding, a KV-cache past and
/// a decode step; head_dim 64 and 128). On a device no kernel serves (the CPU), every check
/// reports `ran: false` and none passes.
pub fn check_kernels(device: &Device) -> Result<Vec<KernelCheck>> {
    let pad = |rows: usize, kl: usize, skip: usize| -> Vec<Vec<bool>> {
        (0..rows).map(|r| (0..kl).map(|j| r == 0 || j >= skip).collect()).collect()
    };
    // GQA: 2 kv groups × 2 query heads, 48 new positions after 8 cached, padding at the start.
    let gqa = AttnMask::causal(&pad(2, 56, 5), 8, 48);
    // head_dim 128, 130 positions after 10 cached (tiles of 32 do not divide them).
    let long = AttnMask::causal(&pad(2, 140, 7), 10, 130);
    // One decode step over a 40-slot cache.
    let step = AttnMask::causal(&pad(2, 40, 3), 39, 1);
    let positions: Vec<u32> = (0..2 * 5).map(|i| (i * 7 % 13) as u32).collect();
    let table = RopeTable::new(&positions, 64, 10000.0);
    let targets: Vec<u32> = vec![0, 7, 999, 3, 3, 517];
    type Case = (Kernel, &'static str, Vec<Vec<usize>>, OpFn);
    let cases: Vec<Case> = vec![
        (Kernel::RmsNorm, "rows 21, hidden 576", vec![vec![3, 7, 576], vec![576]], Box::new(|x| Ok(ops::rms_norm(&x[0], &x[1], 1e-5)?))),
        (Kernel::Rope, "10 tokens, 3 heads of 64", vec![vec![2, 5, 3, 64]], Box::new(move |x| Ok(ops::rope(&x[0], &table)?))),
        (
            Kernel::TokenLogprobs,
            "6 rows, vocab 1000",
            vec![vec![6, 1000]],
            Box::new(move |x| Ok(ops::token_logprobs(&(&x[0] * 3.0)?, &targets)?)),
        ),
        (
            Kernel::Attention,
            "gqa 2x2 heads, 48 after 8, hd 64",
            vec![vec![2, 2, 96, 64], vec![2, 2, 56, 64], vec![2, 2, 56, 64]],
            Box::new(move |x| Ok(ops::attention(&x[0], &x[1], &x[2], &gqa, 0.125)?)),
        ),
        (
            Kernel::Attention,
            "130 after 10, hd 128",
            vec![vec![2, 1, 130, 128], vec![2, 1, 140, 128], vec![2, 1, 140, 128]],
            Box::new(move |x| Ok(ops::attention(&x[0], &x[1], &x[2], &long, 0.088)?)),
        ),
        (
            Kernel::Attention,
            "decode step, 3 heads per group, hd 64",
            vec![vec![2, 2, 3, 64], vec![2, 2, 40, 64], vec![2, 2, 40, 64]],
            Box::new(move |x| Ok(ops::attention(&x[0], &x[1], &x[2], &step, 0.125)?)),
        ),
    ];
    let mut out = vec![];
    for dtype in [DType::F32, DType::BF16] {
        for (i, (kernel, case, shapes, op)) in cases.iter().enumerate() {
            let inputs = shapes.iter().enumerate().map(|(j, s)| seeded(s, 100 + 10 * i as u64 + j as u64)).collect::<Result<Vec<_>>>()?;
            let generic = |f: &dyn Fn() -> Result<(Tensor, Vec<Tensor>)>| if device.is_cpu() { with_generic_ops(f) } else { f() };
            let (want, want_g) = with_kernels(KernelSet::NONE, || generic(&|| run_op_in(op, &inputs, device, dtype)))?;
            let before = cuda::launches(*kernel);
            let (got, got_g) = with_kernels(KernelSet::only(*kernel), || generic(&|| run_op_in(op, &inputs, device, dtype)))?;
            let ran = cuda::launches(*kernel) > before;
            let mut gradient = 0f32;
            for (a, b) in want_g.iter().zip(&got_g) {
                gradient = gradient.max(rel_diff(&a.to_dtype(DType::F32)?, b)?);
            }
            out.push(KernelCheck {
                kernel: kernel.name(),
                case,
                dtype: format!("{dtype:?}").to_lowercase(),
                output: rel_diff(&want.to_dtype(DType::F32)?, &got)?,
                gradient,
                ran,
                tolerance: kernel_tolerance(dtype),
            });
        }
    }
    out.push(check_adamw(device)?);
    Ok(out)
}

/// Two AdamW steps of an f32 parameter on `device` with the kernel against the generic update:
/// the parameter and both moments.
fn check_adamw(device: &Device) -> Result<KernelCheck> {
    let run = |set: KernelSet| -> Result<(Tensor, Vec<Tensor>)> {
        with_kernels(set, || {
            let p = Var::from_tensor(&seeded(&[37, 29], 5)?.to_device(device)?)?;
            let name = "w".to_string();
            let mut opt = crate::optim::AdamW::new(crate::optim::AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() });
            for s in 0..2u64 {
                let mut grads = crate::optim::Grads::new();
                grads.map.insert(name.clone(), seeded(&[37, 29], 50 + s)?.to_device(device)?);
                grads.scale = 0.5;
                let params = [(&name, &p)];
                let mut f = || opt.step(params.iter().map(|(n, v)| (*n, *v)), &grads);
                if device.is_cpu() {
                    with_generic_ops(f)?
                } else {
                    f()?
                }
            }
            let st = opt.state_tensors()?;
            Ok((p.as_tensor().to_device(&Device::Cpu)?, vec![st["w.exp_avg"].clone(), st["w.exp_avg_sq"].clone()]))
        })
    };
    let (want, want_m) = run(KernelSet::NONE)?;
    let before = cuda::launches(Kernel::AdamW);
    let (got, got_m) = run(KernelSet::only(Kernel::AdamW))?;
    let ran = cuda::launches(Kernel::AdamW) > before;
    let mut moments = 0f32;
    for (a, b) in want_m.iter().zip(&got_m) {
        moments = moments.max(rel_diff(a, b)?);
    }
    Ok(KernelCheck {
        kernel: Kernel::AdamW.name(),
        case: "2 steps of a [37, 29] parameter (output: the parameter; gradient: the moments)",
        dtype: "f32".into(),
        output: rel_diff(&want, &got)?,
        gradient: moments,
        ran,
        tolerance: kernel_tolerance(DType::F32),
    })
}

/// A random-init model of `cfg`'s shape made on `device` in `dtype` (N(0, 0.02) matrices, unit
/// norms), without a host copy: for benchmarks of shapes whose weights cannot be brought.
pub fn random_model_on(cfg: ModelConfig, device: &Device, dtype: DType) -> Result<Transformer> {
    let mut tensors = BTreeMap::new();
    for (name, shape) in expected_tensors(&cfg) {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, DType::F32, device)?
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape, DType::F32, device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, device)?
        };
        tensors.insert(name, t.to_dtype(dtype)?);
    }
    let mut m = Transformer::from_tensors(cfg, tensors, "random init")?;
    m.place(device, dtype)?;
    Ok(m)
}

/// The peak memory a device held while this watch ran, sampled every 5 ms (the CUDA driver's
/// used memory, all processes; on the CPU this process's peak RSS).
pub struct MemoryWatch {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    cpu: bool,
}

impl MemoryWatch {
    pub fn start(device: &Device) -> Result<Self> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let (peak, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let used = used_bytes(device)?;
        let thread = used.map(|_| {
            let (peak, stop, device) = (peak.clone(), stop.clone(), device.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(Some(u)) = used_bytes(&device) {
                        peak.fetch_max(u, Ordering::Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            })
        });
        Ok(Self { peak, stop, thread, cpu: device.is_cpu() })
    }

    /// The peak so far, in MiB.
    pub fn peak_mib(&self) -> f64 {
        if self.cpu {
            return peak_rss_bytes() as f64 / (1u64 << 20) as f64;
        }
        self.peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / (1u64 << 20) as f64
    }
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Used device memory in bytes (None on the CPU).
fn used_bytes(device: &Device) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let (free, total) = d.cuda_stream().context().mem_get_info().map_err(|e| anyhow::anyhow!("cuMemGetInfo: {e:?}"))?;
        return Ok(Some((total - free) as u64));
    }
    let _ = device;
    Ok(None)
}

/// This process's peak resident memory (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    status_bytes("VmHWM:")
}

/// This process's resident memory now (VmRSS), in bytes.
pub fn rss_bytes() -> u64 {
    status_bytes("VmRSS:")
}

/// A size in kB that /proc/self/status gives under `field`, in bytes; 0 where the OS does not say.
fn status_bytes(field: &str) -> u64 {
    kb_field("/proc/self/status", field).unwrap_or(0)
}

/// The size that a `/proc` file of `Field:  N kB` lines (status, meminfo) gives under `field`,
/// in bytes (None where the file or the field cannot be read).
pub(crate) fn kb_field(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    kb_line(text.lines().find(|l| l.starts_with(field))?)
}

/// The size on one `Field:  N kB` line, in bytes (None where it is not a number).
pub(crate) fn kb_line(line: &str) -> Option<u64> {
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Field: N kB` line is read as N·1024 bytes; a field or a file that is not there is None,
    /// never 0 (the memory budget tells "unknown" from "none left" by it).
    #[test]
    fn kb_fields_are_read_in_bytes_and_a_missing_one_is_none() {
        let dir = std::env::temp_dir().join(format!("collm-kb-field-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("status");
        std::fs::write(&f, "Name:\tcollm\nVmSize:\t  123456 kB\nVmRSS:\t 2048 kB\n").unwrap();
        let path = f.to_str().unwrap();
        assert_eq!(kb_field(path, "VmSize:"), Some(123456 * 1024));
        assert_eq!(kb_field(path, "VmRSS:"), Some(2048 * 1024));
        assert_eq!(kb_field(path, "VmHWM:"), None);
        assert_eq!(kb_field(path, "Name:"), None, "a field without a number");
        assert_eq!(kb_field(dir.join("absent").to_str().unwrap(), "VmSize:"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
