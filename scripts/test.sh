#!/usr/bin/env bash
# Set up and run the test suite (CPU; GPU tests skip without CUDA, Slurm tests need
# ../shared/tools/local_slurm.sh and root).
#   bash scripts/test.sh              everything (.ci/run), on 2 pytest-xdist workers
#   bash scripts/test.sh --quick      the edit-test loop (< 3 min on 2 cores): unit tests and one
#                                     parity case per parallelism (pytest -m quick; the list is
#                                     in tests/conftest.py); more pytest arguments may follow
#   bash scripts/test.sh ARGS...      pytest ARGS in one process, e.g. tests/data/test_data.py -k hf
#   TEST_WORKERS=N                    workers (default: CPUs, at most 2; 0 = no xdist)
# Workers take tests one at a time (--dist loadgroup); tests that share one resource carry an
# xdist_group (conftest.py): all Slurm tests run on one worker, one after the other, as they
# share the one local slurmctld.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
cpus=$(nproc 2>/dev/null || echo 1)
workers=${TEST_WORKERS:-$(( cpus < 2 ? 0 : 2 ))}
parallel=(-n "$workers" --dist loadgroup)
if (( workers == 0 )); then parallel=(); fi
if [[ ${1:-} == --quick ]]; then
  shift
  exec .venv/bin/python -m pytest -q "${parallel[@]}" -m quick "$@"
fi
if (( $# )); then exec .venv/bin/python -m pytest -q "$@"; fi
exec .venv/bin/python -m pytest -q "${parallel[@]}"
