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
# Call it from the salloc shell. Inside a one-task step (`srun --pty --ntasks=1 --overlap bash`)
# it works too (it starts another step: srun --overlap is added). Inside a step of several tasks
# (`srun --pty bash -c '... interactive.sh'` in a 2-task allocation) every task would start its
# own launcher; it refuses that (exit 2). See slurm/README.md for the debugging recipes.
set -uo pipefail
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "slurm/interactive.sh: no allocation; first: salloc --nodes=1 --ntasks-per-node=8 --gpus-per-node=8" >&2
  exit 2
fi
if (( $# < 1 )); then
  echo "usage: bash slurm/interactive.sh CONFIG [--section.key=value ...]" >&2
  exit 2
fi
# srun ran this script once per task of its step: N launchers would each start N ranks.
if [[ -n "${SLURM_STEP_ID:-}" ]] && (( ${SLURM_STEP_NUM_TASKS:-1} > 1 )); then
  if [[ "${SLURM_PROCID:-0}" == 0 ]]; then
    echo "slurm/interactive.sh: started by srun in each of the ${SLURM_STEP_NUM_TASKS} tasks of step ${SLURM_JOB_ID}.${SLURM_STEP_ID}; it launches the ranks itself: run it from the salloc shell (bash slurm/interactive.sh ...) or from a one-task shell (srun --pty --ntasks=1 --overlap bash)" >&2
  fi
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
