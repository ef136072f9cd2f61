#!/usr/bin/env bash
# Builds collm with CUDA (`--features cuda`) on a machine that has no GPU and no CUDA toolkit.
#
#   bash scripts/build-cuda.sh           # target/cuda/release/collm
#   bash scripts/build-cuda.sh --check   # cargo check of the cuda feature only (what CI runs)
#
# - nvcc and the CUDA headers come from pinned PyPI wheels (CUDA 13.0: newer nvcc emits PTX that
#   the H100/H200 driver 580 rejects), installed once into target/cuda-toolkit.
# - Kernels are built for compute capability 90 (H100/H200).
# - candle-core asks cudarc to link the CUDA libraries at build time; a patched copy of it (made
#   here under target/cuda-patch, never committed) asks cudarc to load them at run time instead,
#   so the binary builds without libcuda and runs where the driver and the CUDA 13 libraries are:
#     LD_LIBRARY_PATH=<site-packages>/nvidia/cu13/lib target/cuda/release/collm ...
#   (a pip-installed torch for CUDA 13 carries them there).
# Cargo.lock is left as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=build
[ "${1:-}" = "--check" ] && mode=check

kit="$PWD/target/cuda-toolkit"
pins=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88
      nvidia-nvvm==13.0.88 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35)
if [ "$(cat "$kit/.pins" 2>/dev/null)" != "${pins[*]}" ]; then
    echo "build-cuda: installing nvcc and the CUDA headers from PyPI into $kit"
    rm -rf "$kit"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$kit" "${pins[@]}"
    echo "${pins[*]}" > "$kit/.pins"
fi
root="$kit/nvidia/cu13"
export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_TOOLKIT_ROOT_DIR="$root"
export PATH="$root/bin:$PATH"
export LD_LIBRARY_PATH="$root/lib:$root/nvvm/lib64:${LD_LIBRARY_PATH:-}"
# nvcc's own tools (cicc) and headers: the wheels split them across nvvm/ and include/cccl.
export NVCC_PREPEND_FLAGS="-I$root/include/cccl ${NVCC_PREPEND_FLAGS:-}"
export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
# candle-kernels compiles its kernels with half the cores by default; nvcc is most of the time.
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
# candle-kernels links its static kernels against -lcudart: the wheel has only the versioned
# libcudart.so.13, so the linker gets an unversioned name beside it (the binary then needs
# libcudart.so.13 at run time).
mkdir -p "$kit/link"
ln -sf "$root/lib/libcudart.so.13" "$kit/link/libcudart.so"
export LIBRARY_PATH="$kit/link:${LIBRARY_PATH:-}"
nvcc --version | tail -1

# The patched candle-core: the registry's copy with cudarc's dynamic-linking swapped for
# dynamic-loading.
candle=$(cargo metadata --format-version 1 --locked | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "candle-core"))')
patch="$PWD/target/cuda-patch"
rm -rf "$patch/candle-core"
mkdir -p "$patch"
cp -r "$(dirname "$candle")" "$patch/candle-core"
chmod -R u+w "$patch/candle-core"
grep -q '"dynamic-linking"' "$patch/candle-core/Cargo.toml" || { echo "build-cuda: candle-core no longer names dynamic-linking; update this script" >&2; exit 1; }
sed -i 's/"dynamic-linking"/"dynamic-loading"/' "$patch/candle-core/Cargo.toml"

cp Cargo.lock "$patch/Cargo.lock.orig"
trap 'cp "$patch/Cargo.lock.orig" Cargo.lock' EXIT
start=$(date +%s)
if [ "$mode" = check ]; then
    cargo check --release -p collm-cli --features cuda --target-dir target/cuda \
        --config "patch.crates-io.candle-core.path=\"$patch/candle-core\""
else
    cargo build --release -p collm-cli --features cuda --target-dir target/cuda \
        --config "patch.crates-io.candle-core.path=\"$patch/candle-core\""
    bin=target/cuda/release/collm
    echo "build-cuda: $bin ($(du -h "$bin" | cut -f1)), built in $(( $(date +%s) - start )) s"
    echo "build-cuda: it links to: $(ldd "$bin" | awk '{print $1}' | tr '\n' ' ')"
    exit 0
fi
echo "build-cuda: cuda feature checked in $(( $(date +%s) - start )) s"
