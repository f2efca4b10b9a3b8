#!/usr/bin/env bash
# Create/refresh .venv with the runtime installed (idempotent; used by run_debug.sh and test.sh).
# --system-site-packages: a GPU image's preinstalled CUDA torch is reused as is. Where no torch
# is importable we install the pinned CPU-friendly torch==2.13.0 first, so pip never resolves
# an unpinned `torch` to several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv --system-site-packages .venv
fi
py=.venv/bin/python
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install --quiet "torch==2.13.0"
fi
"$py" -m pip install --quiet -e ".${extras:+[$extras]}"
