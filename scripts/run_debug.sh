#!/usr/bin/env bash
# The main job on a fresh machine: set up, then train the debug model on the embedded corpus
# and tokenizer (GPU if present, else CPU). Extra arguments are config overrides, e.g.
#   bash scripts/run_debug.sh --training.steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m runtime.train --config configs/debugmodel.toml "$@"
