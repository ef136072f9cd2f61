//! Where a model lives and in what precision: `device = "cpu" | "cuda" | "cuda:N"` and
//! `dtype = "f32" | "bf16"`, as configs name them.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The precision a model's weights and activations are held in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 everywhere.
    #[default]
    F32,
    /// bf16 weights and activations in forward and backward; f32 master weights and AdamW
    /// moments, f32 log-softmax, losses and value heads.
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// A device as a config names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda` (GPU 0) or `cuda:N`. A CUDA device asked of a binary built without
    /// CUDA is an error here, before anything loads.
    pub fn parse(s: &str) -> Result<Self> {
        let spec = match s.trim() {
            "cpu" => DeviceSpec::Cpu,
            "cuda" => DeviceSpec::Cuda(0),
            other => match other.strip_prefix("cuda:").map(|n| n.parse::<usize>()) {
                Some(Ok(n)) => DeviceSpec::Cuda(n),
                _ => bail!("unknown device \"{s}\" (use \"cpu\", \"cuda\" or \"cuda:N\")"),
            },
        };
        if matches!(spec, DeviceSpec::Cuda(_)) && !cfg!(feature = "cuda") {
            bail!("device \"{s}\": this collm was built without CUDA (build it with scripts/build-cuda.sh, or use \"cpu\")");
        }
        Ok(spec)
    }

    /// The device, opened once per process: every model on `cuda:N` shares one handle, so their
    /// tensors may meet.
    pub fn open(self) -> Result<Device> {
        static OPEN: OnceLock<Mutex<HashMap<DeviceSpec, Device>>> = OnceLock::new();
        if self == DeviceSpec::Cpu {
            return Ok(Device::Cpu);
        }
        let mut open = OPEN.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = open.get(&self) {
            return Ok(d.clone());
        }
        let DeviceSpec::Cuda(n) = self else { unreachable!() };
        // cudarc panics when it cannot load the driver library (no GPU driver on this machine):
        // that becomes an error here, not an abort.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let opened = std::panic::catch_unwind(|| Device::new_cuda(n));
        std::panic::set_hook(hook);
        let d = match opened {
            Ok(r) => r.with_context(|| format!("opening CUDA device {n} (is there a GPU {n}?)"))?,
            Err(p) => {
                let why =
                    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                let why = why.split(" - searched for").next().unwrap_or("").to_string();
                bail!("opening CUDA device {n}: {why} (is the NVIDIA driver installed, and the CUDA 13 libraries on LD_LIBRARY_PATH?)");
            }
        };
        open.insert(self, d.clone());
        Ok(d)
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_or_say_what_is_allowed() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert!(DeviceSpec::parse("cpu").unwrap().open().unwrap().is_cpu());
        for bad in ["gpu", "cuda:x", "cuda:-1", "", "CPU"] {
            let e = DeviceSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("use \"cpu\""), "{bad}: {e}");
        }
        let cuda = DeviceSpec::parse("cuda:1");
        if cfg!(feature = "cuda") {
            assert_eq!(cuda.unwrap(), DeviceSpec::Cuda(1));
        } else {
            let e = cuda.unwrap_err().to_string();
            assert!(e.contains("built without CUDA") && e.contains("scripts/build-cuda.sh"), "{e}");
        }
    }
}
