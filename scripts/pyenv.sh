#!/usr/bin/env bash
# The Python packages the export and serve tests compare collm against, from PyPI, in
# target/pyenv (made once; later runs reuse it): torch + transformers (the HF export's logits),
# peft (the adapter export), llama-cpp-python (built from source: the GGUF export's greedy
# tokens) and the openai client (collm serve). About 6 GB; the first run takes several minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=target/pyenv
PINS="torch==2.15.0 transformers==5.24.0 peft==0.21.2 numpy llama-cpp-python==0.3.36 openai==1.*"
STAMP="$ENV/collm-pins.txt"
if [ -x "$ENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$PINS" ]; then
  exit 0
fi
echo "scripts/pyenv.sh: installing $PINS into $ENV (once)" >&2
rm -rf "$ENV"
python3 -m venv "$ENV"
# llama-cpp-python compiles llama.cpp: two jobs on this machine's two cores.
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
for try in 1 2 3; do
  if "$ENV/bin/pip" install --quiet --retries 10 --timeout 120 $PINS; then
    echo "$PINS" > "$STAMP"
    exit 0
  fi
  echo "scripts/pyenv.sh: pip failed (try $try of 3)" >&2
  sleep 10
done
echo "scripts/pyenv.sh: could not install $PINS from PyPI" >&2
exit 1
