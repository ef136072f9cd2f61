//! With `--features cuda`: compiles collm's CUDA kernels (src/cuda/kernels.cu) to PTX with nvcc,
//! for the compute capability in CUDA_COMPUTE_CAP (default 90: H100/H200). scripts/build-cuda.sh
//! puts nvcc from PyPI wheels on the PATH. Without the feature this does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("collm_kernels.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
        .arg(format!("--gpu-architecture=sm_{cap}"))
        .arg("src/cuda/kernels.cu")
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("nvcc failed on src/cuda/kernels.cu ({s}); build the cuda feature with scripts/build-cuda.sh"),
        Err(e) => panic!("cannot run {nvcc} ({e}): build the cuda feature with scripts/build-cuda.sh, which installs nvcc"),
    }
}
