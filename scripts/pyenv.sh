#!/usr/bin/env bash
# The Python packages the export and serve tests compare collm against, from PyPI, in
# target/pyenv (made once; later runs reuse it): torch + transformers (the HF export's logits),
# peft (the adapter export), llama-cpp-python (built from source: the GGUF export's greedy
# tokens) and the openai client (collm serve). About 6 GB; the first run takes several minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=target/pyenv
PINS="torch==2.15.0 transformers==5.24.0 peft==0.21.2 numpy llama-cpp-python==0.3.36 openai==1.*"
# llama-cpp-python compiles llama.cpp. Not with -march=native: on Intel CPUs with AMX (Sapphire
# Rapids) that compiles llama.cpp's AMX kernels, which crash on some such machines
# (ggml-org/llama.cpp#20824; seen here: a segfault in the first Q8_0 decode). An AVX2 build runs
# alike on every x86-64 machine collm is tested on.
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
# Two jobs on this machine's two cores.
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
STAMP="$ENV/collm-pins.txt"
WANT="$PINS | llama.cpp: $CMAKE_ARGS"
if [ -x "$ENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  exit 0
fi
LLAMA=$(tr ' ' '\n' <<< "$PINS" | grep '^llama-cpp-python==')
if [ -x "$ENV/bin/python" ] && [[ "$(cat "$STAMP" 2>/dev/null)" == "$PINS"* ]]; then
  # The same pins, llama.cpp built otherwise: rebuild only it (no cached wheel).
  echo "scripts/pyenv.sh: rebuilding $LLAMA in $ENV ($CMAKE_ARGS)" >&2
  "$ENV/bin/pip" install --quiet --retries 10 --timeout 120 --no-deps --no-cache-dir --force-reinstall "$LLAMA"
  echo "$WANT" > "$STAMP"
  exit 0
fi
echo "scripts/pyenv.sh: installing $PINS into $ENV (once)" >&2
rm -rf "$ENV"
python3 -m venv "$ENV"
# pip unpacks the wheels (torch and its CUDA libraries: several GB) and builds llama.cpp in its
# temporary folder: keep that beside the environment, on the checkout's disk, not in /tmp, which
# may be a small tmpfs (a CI run failed with "No space left on device" here).
export TMPDIR="$PWD/target/pyenv-tmp"
rm -rf "$TMPDIR" && mkdir -p "$TMPDIR"
trap 'rm -rf "$TMPDIR"' EXIT
for try in 1 2 3; do
  if "$ENV/bin/pip" install --quiet --retries 10 --timeout 120 --no-cache-dir $PINS; then
    echo "$WANT" > "$STAMP"
    exit 0
  fi
  echo "scripts/pyenv.sh: pip failed (try $try of 3); free space: $(df -h --output=avail "$ENV" "$TMPDIR" 2>/dev/null | tail -n +2 | tr -s ' \n' ' ')" >&2
  rm -rf "${TMPDIR:?}"/* 2>/dev/null || true
  sleep 10
done
echo "scripts/pyenv.sh: could not install $PINS from PyPI" >&2
exit 1
