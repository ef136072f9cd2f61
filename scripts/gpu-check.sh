#!/usr/bin/env bash
# The prepared check for a machine with one H100 or H200 (at most 8 minutes). It needs only the
# repo and the CUDA binary that scripts/build-cuda.sh makes elsewhere (target/cuda/release/collm,
# carried here): no model weights, no network. It prints:
#   - every op's generic path on the GPU against the fused CPU kernel: forward and gradients;
#   - each of collm's CUDA kernels against the generic path on the GPU (f32 and bf16), and one
#     Qwen3-1.7B layer's attention memory at 1,024 and 4,096 tokens, generic against the kernel;
#   - a SmolLM2-135M-shaped model's log-probs on the GPU (f32, bf16) against the CPU;
#   - decode tokens/s at batch 1 and 32 (SmolLM2-135M and Qwen3-1.7B shapes, bf16);
#   - one bf16 train step of a Qwen3-1.7B-shaped model at 4 x 1024 tokens, with its MFU (the
#     generic path, then the kernels that passed their check);
#   - `collm bench train --algo cc` on tldr_like.json (a random-init SmolLM2-135M shape);
#   - the peak GPU memory of each.
# Usage: bash scripts/gpu-check.sh [WORKLOAD.json]   (default ../shared/bench/tldr_like.json,
#        else target/gpu-carry/tldr_like.json)
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${COLLM_BIN:-target/cuda/release/collm}
[ -x "$bin" ] || { echo "gpu-check: no $bin (build it with scripts/build-cuda.sh and bring it)" >&2; exit 1; }
workload=${1:-../shared/bench/tldr_like.json}
[ -f "$workload" ] || workload=target/gpu-carry/tldr_like.json

# The CUDA 13 libraries the binary loads at run time (cuBLAS, cuRAND, NVRTC): a pip torch's
# nvidia/cu13/lib, or COLLM_CUDA_LIB.
lib=${COLLM_CUDA_LIB:-$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)}
export LD_LIBRARY_PATH="${lib:-}:${LD_LIBRARY_PATH:-}"
echo "gpu-check: $(date -u +%FT%TZ), CUDA libraries from ${lib:-the system}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
start=$(date +%s)
status=0
timeout 330 "$bin" bench gpu --device cuda:0 || status=$?
echo "gpu-check: bench gpu exit $status after $(( $(date +%s) - start )) s"
if [ -f "$workload" ]; then
    t=$(date +%s)
    timeout 120 "$bin" bench train --workload "$workload" --algo cc --model random:smollm2-135m --device cuda:0 --dtype bf16 --json \
        || status=$?
    echo "gpu-check: bench train exit $status after $(( $(date +%s) - t )) s"
else
    echo "gpu-check: no workload at $workload: bench train skipped" >&2
    status=1
fi
echo "gpu-check: done in $(( $(date +%s) - start )) s, status $status"
exit $status
