//! collm's CUDA kernels and the switch in front of them.
//!
//! On a CUDA device each op takes candle's generic path (the reference) unless its kernel is
//! switched on. A kernel is switched on by `COLLM_CUDA_KERNELS` (`all`, or a comma list of
//! [`Kernel`] names; unset or `off`: none) until `scripts/gpu-check.sh` has checked it against the
//! generic path on a real GPU; [`with_kernels`] overrides the variable on one thread (the checks
//! run each kernel both ways). The kernels themselves (src/cuda/kernels.cu, launched from
//! src/cuda/ops.rs) exist only in a `--features cuda` build.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::cell::Cell;
use std::sync::OnceLock;

#[cfg(feature = "cuda")]
pub(crate) mod ops;

/// The ops that have a CUDA kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Attention forward and backward without a [q, k] matrix (head_dim a multiple of 32, ≤ 128).
    Attention,
    RmsNorm,
    Rope,
    /// log-softmax + gather over the output head's logits.
    TokenLogprobs,
    AdamW,
}

impl Kernel {
    pub const ALL: [Kernel; 5] = [Kernel::Attention, Kernel::RmsNorm, Kernel::Rope, Kernel::TokenLogprobs, Kernel::AdamW];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Attention => "attention",
            Kernel::RmsNorm => "rms_norm",
            Kernel::Rope => "rope",
            Kernel::TokenLogprobs => "token_logprobs",
            Kernel::AdamW => "adamw",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of kernels switched on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelSet(u8);

impl KernelSet {
    pub const NONE: KernelSet = KernelSet(0);
    pub const ALL: KernelSet = KernelSet(0b1_1111);

    pub fn only(k: Kernel) -> Self {
        KernelSet(k.bit())
    }

    pub fn contains(self, k: Kernel) -> bool {
        self.0 & k.bit() != 0
    }

    /// Parses `COLLM_CUDA_KERNELS`' value: `all`, `off` (or empty), or a comma list of names.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        match s {
            "" | "off" | "none" => return Ok(KernelSet::NONE),
            "all" | "on" => return Ok(KernelSet::ALL),
            _ => {}
        }
        let mut set = KernelSet::NONE;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match Kernel::ALL.iter().find(|k| k.name() == part) {
                Some(k) => set.0 |= k.bit(),
                None => bail!(
                    "COLLM_CUDA_KERNELS: unknown kernel \"{part}\" (use \"all\", \"off\", or a comma list of {})",
                    Kernel::ALL.map(Kernel::name).join(", ")
                ),
            }
        }
        Ok(set)
    }

    /// The names in this set, for logs.
    pub fn names(self) -> Vec<&'static str> {
        Kernel::ALL.into_iter().filter(|k| self.contains(*k)).map(Kernel::name).collect()
    }
}

thread_local! {
    static OVERRIDE: Cell<Option<KernelSet>> = const { Cell::new(None) };
}

/// The kernels `COLLM_CUDA_KERNELS` switches on (read once per process). A value that does not
/// parse is an error here, which `collm` reports at start ([`check_env`]).
pub fn from_env() -> Result<KernelSet> {
    static ENV: OnceLock<std::result::Result<KernelSet, String>> = OnceLock::new();
    ENV.get_or_init(|| KernelSet::parse(&std::env::var("COLLM_CUDA_KERNELS").unwrap_or_default()).map_err(|e| e.to_string()))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Checks `COLLM_CUDA_KERNELS` once, so that a typo stops a run before anything loads.
pub fn check_env() -> Result<()> {
    from_env().map(|_| ())
}

/// The kernels switched on for this thread: [`with_kernels`]' set inside it, else the variable's.
pub fn enabled() -> KernelSet {
    OVERRIDE.with(|o| o.get()).unwrap_or_else(|| from_env().unwrap_or(KernelSet::NONE))
}

/// Runs `f` with exactly `set` switched on for this thread, whatever the variable says (restored
/// afterwards, also when `f` panics).
pub fn with_kernels<R>(set: KernelSet, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<KernelSet>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|o| o.replace(Some(set))));
    f()
}

/// Whether kernel `k` serves `t`: a CUDA build, `t` on a CUDA device in f32 or bf16, and `k`
/// switched on. The caller checks the shapes the kernel takes.
/// An empty tensor takes the generic path (a kernel launch needs at least one block).
pub fn serves(k: Kernel, t: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && t.device().is_cuda()
        && matches!(t.dtype(), DType::F32 | DType::BF16)
        && t.elem_count() > 0
        && enabled().contains(k)
}

// The ops through their kernels, where the kernel serves the input (None: take the generic path).
// Inputs arrive contiguous from `crate::ops`.

pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Option<Tensor>> {
    if !serves(Kernel::RmsNorm, x) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return Ok(Some(ops::rms_norm(x, &w.to_dtype(x.dtype())?.contiguous()?, eps as f32)?));
    #[cfg(not(feature = "cuda"))]
    unreachable!("{w:?} {eps}")
}

/// `x` [batch, seq, heads, head_dim], contiguous.
pub(crate) fn rope(x: &Tensor, table: &crate::ops::RopeTable, heads: usize) -> candle_core::Result<Option<Tensor>> {
    if !serves(Kernel::Rope, x) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return Ok(Some(ops::rope(x, table, heads)?));
    #[cfg(not(feature = "cuda"))]
    unreachable!("{} {heads}", table.half)
}

/// `logits` [n, vocab] in f32, contiguous.
pub(crate) fn token_logprobs(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Option<Tensor>> {
    if !serves(Kernel::TokenLogprobs, logits) || logits.dtype() != DType::F32 {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return Ok(Some(ops::token_logprobs(logits, targets)?));
    #[cfg(not(feature = "cuda"))]
    unreachable!("{targets:?}")
}

/// q [b, groups, n_rep · q_len, hd], k and v [b, groups, k_len, hd]; the kernel takes head_dim a
/// multiple of 32 up to 128.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &crate::ops::AttnMask,
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    let hd = q.dims().last().copied().unwrap_or(0);
    if !serves(Kernel::Attention, q) || hd % 32 != 0 || hd > 128 || k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return Ok(Some(ops::attention(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, mask, scale)?));
    #[cfg(not(feature = "cuda"))]
    unreachable!("{v:?} {} {scale}", mask.q_len)
}

/// AdamW's step for an f32 parameter (or master) `p` with gradient `g` and moments `m`, `v`, all
/// f32 on the same CUDA device, updated in place; false where the kernel does not serve them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    cfg: &crate::optim::AdamWConfig,
    bc1: f64,
    bc2: f64,
    gscale: f32,
) -> candle_core::Result<bool> {
    let f32s = [p, g, m, v].iter().all(|t| t.dtype() == DType::F32 && t.is_contiguous());
    if !serves(Kernel::AdamW, p) || !f32s {
        return Ok(false);
    }
    #[cfg(feature = "cuda")]
    {
        let decay = (1.0 - cfg.lr * cfg.weight_decay) as f32;
        let (lr, b1, b2, eps) = (cfg.lr as f32, cfg.beta1 as f32, cfg.beta2 as f32, cfg.eps as f32);
        ops::adamw(p, g, m, v, lr, b1, b2, eps, decay, bc1 as f32, bc2 as f32, gscale)?;
        Ok(true)
    }
    #[cfg(not(feature = "cuda"))]
    unreachable!("{g:?} {m:?} {v:?} {cfg:?} {bc1} {bc2} {gscale}")
}

/// How many times each kernel has run in this process (attention counts its forward), so that a
/// check can tell a kernel it compared from the generic path it fell back to.
pub fn launches(k: Kernel) -> u64 {
    LAUNCHES[k as usize].load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn count(k: Kernel) {
    LAUNCHES[k as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

static LAUNCHES: [std::sync::atomic::AtomicU64; 5] = [const { std::sync::atomic::AtomicU64::new(0) }; 5];

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_switch_parses_names_and_says_what_is_allowed() {
        assert_eq!(KernelSet::parse("").unwrap(), KernelSet::NONE);
        assert_eq!(KernelSet::parse(" off ").unwrap(), KernelSet::NONE);
        assert_eq!(KernelSet::parse("all").unwrap(), KernelSet::ALL);
        assert_eq!(KernelSet::parse("all").unwrap().names().len(), Kernel::ALL.len());
        let two = KernelSet::parse("rope, attention").unwrap();
        assert!(two.contains(Kernel::Rope) && two.contains(Kernel::Attention));
        assert!(!two.contains(Kernel::RmsNorm) && !two.contains(Kernel::AdamW) && !two.contains(Kernel::TokenLogprobs));
        assert_eq!(two.names(), vec!["attention", "rope"]);
        for k in Kernel::ALL {
            assert_eq!(KernelSet::parse(k.name()).unwrap(), KernelSet::only(k));
        }
        let e = KernelSet::parse("rope,flash").unwrap_err().to_string();
        assert!(e.contains("COLLM_CUDA_KERNELS") && e.contains("\"flash\"") && e.contains("rms_norm"), "{e}");
    }

    #[test]
    fn the_override_holds_on_its_thread_only_and_is_restored() {
        let outside = enabled();
        with_kernels(KernelSet::only(Kernel::Rope), || {
            assert_eq!(enabled(), KernelSet::only(Kernel::Rope));
            let other = std::thread::spawn(enabled).join().unwrap();
            assert_eq!(other, outside);
            with_kernels(KernelSet::ALL, || assert_eq!(enabled(), KernelSet::ALL));
            assert_eq!(enabled(), KernelSet::only(Kernel::Rope));
        });
        assert_eq!(enabled(), outside);
        let r = std::panic::catch_unwind(|| with_kernels(KernelSet::ALL, || panic!("inside")));
        assert!(r.is_err());
        assert_eq!(enabled(), outside);
    }

    #[test]
    fn no_kernel_serves_a_cpu_tensor() {
        let t = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        with_kernels(KernelSet::ALL, || {
            for k in Kernel::ALL {
                assert!(!serves(k, &t), "{k:?}");
            }
        });
    }
}
