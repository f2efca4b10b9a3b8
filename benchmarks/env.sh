# shellcheck shell=bash
# Sourced by the benchmark launchers (gpu_check.sh, run_all.sh): run from the repository root
# with it importable, unbuffered logs, and the CUDA allocator setting the benchmarks assume.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
