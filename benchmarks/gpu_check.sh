#!/usr/bin/env bash
# First contact with a GPU in one command (issue 15): correctness of every CUDA path, the
# reference config's numbers, one profiled step with a host-sync audit, the block benchmark --
# each step in its own process and time budget, <= 8 minutes on one H200 in all.
#
#   bash benchmarks/gpu_check.sh                      # results in benchmarks/results/
#   RESULTS_DIR=$OUT bash benchmarks/gpu_check.sh     # on the lent GPU machine ($OUT comes back)
#   bash benchmarks/gpu_check.sh --cpu-smoke          # the same steps, tiny shapes, CPU (CI)
#   bash benchmarks/gpu_check.sh --parts correctness,block --total-budget 300
#
# Writes gpu_check-<stamp>.jsonl, .md and .log under $RESULTS_DIR; exit 1 if a correctness
# check failed. Budgets, parts and records: benchmarks/gpu_check.py and benchmarks/README.md.
set -uo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
