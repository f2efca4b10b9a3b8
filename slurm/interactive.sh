#!/usr/bin/env bash
# slurm/interactive.sh CONFIG [--section.key=value ...] - run the trainer on the CURRENT
# allocation, one task per GPU, exactly as the sbatch templates do (same launcher: mesh check,
# rank env, per-rank logs, container), but in the foreground and without requeueing.
#
#   salloc --nodes=1 --ntasks-per-node=8 --gpus-per-node=8 --time=1:00:00      # get nodes
#   bash slurm/interactive.sh configs/gptoss_120b.toml --model.n_layers=2 --training.steps=20
#   DEBUG_RANK=3 bash slurm/interactive.sh configs/debugmodel.toml           # rank 3 under debugpy
#   RANK_LOGS=0 bash slurm/interactive.sh ...                                  # all ranks on this terminal
#
# Inside `srun --pty bash` on a node of the allocation it works too (it starts another step:
# srun --overlap is added when needed). See slurm/README.md for the debugging recipes.
set -uo pipefail
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "slurm/interactive.sh: no allocation; first: salloc --nodes=1 --ntasks-per-node=8 --gpus-per-node=8" >&2
  exit 2
fi
if (( $# < 1 )); then
  echo "usage: bash slurm/interactive.sh CONFIG [--section.key=value ...]" >&2
  exit 2
fi
CONFIG=$1; shift
export CONFIG
RUNTIME_ROOT=${RUNTIME_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export RUNTIME_ROOT
export GPTOSS_INTERACTIVE=1
export RANK_LOGS=${RANK_LOGS:-0}
# Inside a step (srun --pty bash) a new step must be allowed to share the resources.
if [[ -n "${SLURM_STEP_ID:-}" ]]; then export EXTRA_SRUN_ARGS="--overlap ${EXTRA_SRUN_ARGS:-}"; fi
# The allocation's SLURM_NTASKS, if salloc was given no task count, defaults to one per node:
# use one per GPU instead.
if [[ -z "${SLURM_NTASKS_PER_NODE:-}" && -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
  export SLURM_NTASKS=$(( SLURM_GPUS_ON_NODE * SLURM_JOB_NUM_NODES ))
  export SLURM_NTASKS_PER_NODE=$SLURM_GPUS_ON_NODE
fi
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$RUNTIME_ROOT/slurm/common.sh"
gptoss_main "$@"
