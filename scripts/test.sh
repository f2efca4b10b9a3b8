#!/usr/bin/env bash
# Set up and run the test suite (CPU; GPU tests skip without CUDA, Slurm tests need
# ../shared/tools/local_slurm.sh and root). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
