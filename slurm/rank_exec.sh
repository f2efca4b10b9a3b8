#!/usr/bin/env bash
# slurm/rank_exec.sh PYTHON ARGS... - the per-rank wrapper srun starts (inside the container,
# if any). It records where this rank runs, then EXECs the command, so the trainer keeps this
# PID and receives Slurm's signals (USR1/TERM) directly.
#
#   DEBUG_RANK=N   rank N runs under debugpy, listening on DEBUG_PORT (5678) and waiting for a
#                  client before it starts (the other ranks block in the first collective).
#                  Attach from your workstation through an ssh tunnel to that node, see README.
#   PYSPY_RANK=N   rank N runs under `py-spy record` (flame graph in the job's log folder).
set -euo pipefail
rank=${SLURM_PROCID:-${RANK:-0}}
if [[ -n "${GPTOSS_JOB_LOG_DIR:-}" ]]; then
  mkdir -p "$GPTOSS_JOB_LOG_DIR/pids" 2>/dev/null || true
  # "<host> <pid> <program>": `srun --overlap --jobid=J -w <host> py-spy dump --pid <pid>` attaches
  echo "$(hostname) $$ $(command -v "$1" || echo "$1")" > "$GPTOSS_JOB_LOG_DIR/pids/rank-$rank" 2>/dev/null || true
fi
if [[ -n "${DEBUG_RANK:-}" && "$rank" == "$DEBUG_RANK" ]]; then
  port=${DEBUG_PORT:-5678}
  echo "[rank_exec] rank $rank on $(hostname): debugpy listening on 0.0.0.0:$port, waiting for a client" >&2
  exec "$1" -m debugpy --listen "0.0.0.0:$port" --wait-for-client "${@:2}"
fi
if [[ -n "${PYSPY_RANK:-}" && "$rank" == "$PYSPY_RANK" ]]; then
  out="${GPTOSS_JOB_LOG_DIR:-.}/pyspy-rank$rank-${SLURM_RESTART_COUNT:-0}.svg"
  echo "[rank_exec] rank $rank under py-spy record -> $out" >&2
  exec py-spy record --subprocesses -o "$out" -- "$@"
fi
exec "$@"
