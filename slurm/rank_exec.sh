#!/usr/bin/env bash
# slurm/rank_exec.sh PYTHON ARGS... - the per-rank wrapper srun starts (inside the container,
# if any). It records where this rank runs, runs the command and records its exit code.
#
# Under the launcher (GPTOSS_JOB_LOG_DIR set, srun --kill-on-bad-exit=1), the command runs as a
# child and this wrapper exits:
#   0   when the rank ended cleanly: 0 (done), 75 (checkpointed, requeue) or 130/138/143
#       (stopped on SIGINT/SIGUSR1/SIGTERM, runtime/train/faults.py). These ranks leave only after the trainer's final barrier, so the
#       others are done with every collective; srun must not kill them for it (a kill mid-save
#       would lose the checkpoint).
#   the rank's code otherwise (a crash): srun kills the whole step at once, instead of leaving
#       the other ranks blocked in a collective for the NCCL timeout.
# Either way the rank's record "<code> <epoch seconds> <host>" is in $GPTOSS_JOB_LOG_DIR/exit/rank-N,
# timed the moment the child ended: slurm/common.sh reports the earliest crash as the root
# cause (as torchrun's error files do), not the collateral exits of ranks that lost a peer. Slurm signals every process of the task (USR1, TERM), the trainer included:
# this wrapper only has to survive them.
#
#   DEBUG_RANK=N   rank N runs under debugpy, listening on DEBUG_PORT (5678) and waiting for a
#                  client before it starts (the other ranks block in the first collective).
#                  Attach from your workstation through an ssh tunnel to that node, see README.
#   PYSPY_RANK=N   rank N runs under `py-spy record` (flame graph in the job's log folder).
set -uo pipefail
rank=${SLURM_PROCID:-${RANK:-0}}
cmd=("$@")
if [[ -n "${DEBUG_RANK:-}" && "$rank" == "$DEBUG_RANK" ]]; then
  port=${DEBUG_PORT:-5678}
  echo "[rank_exec] rank $rank on $(hostname): debugpy listening on 0.0.0.0:$port, waiting for a client" >&2
  cmd=("$1" -m debugpy --listen "0.0.0.0:$port" --wait-for-client "${@:2}")
elif [[ -n "${PYSPY_RANK:-}" && "$rank" == "$PYSPY_RANK" ]]; then
  out="${GPTOSS_JOB_LOG_DIR:-.}/pyspy-rank$rank-${SLURM_RESTART_COUNT:-0}.svg"
  echo "[rank_exec] rank $rank under py-spy record -> $out" >&2
  cmd=(py-spy record --subprocesses -o "$out" -- "$@")
fi
if [[ -z "${GPTOSS_JOB_LOG_DIR:-}" ]]; then exec "${cmd[@]}"; fi

# Slurm's signals reach the child directly; a no-op trap (not '', which children would
# inherit as "ignored") keeps this shell alive and makes `wait` return early: wait again.
trap ':' USR1 TERM INT
"${cmd[@]}" &
child=$!
host=$(hostname)
mkdir -p "$GPTOSS_JOB_LOG_DIR/pids" "$GPTOSS_JOB_LOG_DIR/exit" 2>/dev/null || true
# "<host> <pid> <program>": `srun --overlap --jobid=J -w <host> py-spy dump --pid <pid>` attaches
echo "$host $child $(command -v "$1" || echo "$1")" > "$GPTOSS_JOB_LOG_DIR/pids/rank-$rank" 2>/dev/null || true
while true; do
  wait "$child"; rc=$?
  ended=${EPOCHREALTIME:-}   # bash >= 5: no fork, so the time is taken before anything else runs
  kill -0 "$child" 2>/dev/null || break
done
ended=${ended:-$(date +%s.%N)}
ended=${ended/,/.}   # a locale may write EPOCHREALTIME's decimal point as ','
record="$GPTOSS_JOB_LOG_DIR/exit/rank-$rank"
# tmp + mv: the launcher never reads half a record
echo "$rc $ended $host" > "$record.tmp" 2>/dev/null && mv -f "$record.tmp" "$record" 2>/dev/null || true
case "$rc" in
  0|75|130|138|143) exit 0 ;;   # done, requeue, stopped on SIGINT/SIGUSR1/SIGTERM (faults.py)
esac
echo "[rank_exec] rank $rank on $host exited $rc: stopping the step" >&2
exit "$rc"
