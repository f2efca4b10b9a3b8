#!/usr/bin/env bash
# scripts/test_in_image.sh IMAGE [PYTEST ARGS...] - the checkpoint, resume and safe-load tests on
# an image's own Python: what a checkpoint writes (DCP's pickled .metadata, torch.save'd optimizer
# extras) depends on the Python and torch that write it (issue 28: CPython 3.11.0-3.11.4 pickle
# enums by name). The checkout is mounted read-only; pytest is installed in the throwaway
# container from the index.
#
#   bash containers/build_offline.sh                                   # bookworm: Python 3.11.2
#   bash scripts/test_in_image.sh localhost/gptoss-runtime:offline
#   SUITE=trixie WORK_DIR=/tmp/gptoss-offline-trixie bash containers/build_offline.sh offline-trixie
#   bash scripts/test_in_image.sh localhost/gptoss-runtime:offline-trixie     # Python 3.13
#
# Needs podman (bash ../shared/tools/local_slurm.sh containers) and root.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=${1:?usage: scripts/test_in_image.sh IMAGE [PYTEST ARGS...]}
shift
tests=("$@")
if (( ${#tests[@]} == 0 )); then
  tests=(tests/checkpoint/test_checkpoint_pickle_forms.py tests/checkpoint/test_checkpoint_safety.py
         tests/checkpoint/test_checkpoint_resume.py tests/checkpoint/test_checkpoint_integrity.py
         tests/checkpoint/test_checkpoint_lock.py tests/checkpoint/test_checkpoint_distributed.py)
fi
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# pytest is not the container's PID 1 (bash would exec a last command): the lock tests look
# at their parent process.
exec podman run --rm --network=host --user 0 --entrypoint bash \
  -v "$ca:$ca:ro" -e "PIP_CERT=$ca" -e PYTHONDONTWRITEBYTECODE=1 -e OMP_NUM_THREADS=1 \
  -v "$root:/src:ro" -w /src "$image" -c '
    set -e
    pip install -q --root-user-action=ignore "pytest>=8" "pytest-timeout>=2.3" >/dev/null
    python -c "import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__)"
    python -m pytest -q -p no:cacheprovider "$@" || exit $?
    exit 0' bash "${tests[@]}"
