# shellcheck shell=bash
# slurm/common.sh - the launcher shared by slurm/*.sbatch and slurm/interactive.sh (sourced).
#
# Launch model: ONE TASK PER GPU. `srun` starts WORLD_SIZE = SLURM_NTASKS plain
# `python -m runtime.train` processes; each one maps SLURM_PROCID/SLURM_LOCALID/... to
# RANK/LOCAL_RANK/... itself (runtime/train/slurm_env.py) and meets the others at
# MASTER_ADDR:MASTER_PORT (first node of the job, port derived from the job id). Every rank
# receives Slurm's signals directly: `--signal=USR1@<s>` makes each rank finish its step,
# save a checkpoint and exit 75 (EXIT_REQUEUE), and then this script requeues the job, which
# resumes from the latest complete checkpoint in job.dump_folder.
# (torchrun's agent would not forward SIGUSR1 to its workers, hence no torchrun here; set
#  LAUNCHER=torchrun for one torchrun per node anyway, see slurm/README.md.)
#
# Knobs (environment; `sbatch` exports the submitting shell's environment by default):
#   CONFIG            TOML config (relative to RUNTIME_ROOT or absolute)          [per template]
#   RUNTIME_ROOT      repository checkout used by the job      [dir of the submitted script/..]
#   PYTHON            python inside the job (host or container)             [python3]
#   LOG_DIR           root of the per-job log folders               [$RUNTIME_ROOT/logs]
#   DUMP_FOLDER       shorthand for --job.dump_folder=...                    [from config]
#   CONTAINER_IMAGE   pyxis/enroot image (registry#image:tag or a .sqsh) -> srun --container-*;
#                     a path ending in .sif -> `apptainer exec --nv` instead
#   SIF               Apptainer image (same as CONTAINER_IMAGE=*.sif)
#   CONTAINER_MOUNTS  extra SRC:DST[,SRC:DST...] (the checkout is always mounted at its path)
#   RANK_LOGS         1: one log file per rank in the job folder; 0: all ranks, labelled, in
#                     the batch log                                            [1]
#   MAX_REQUEUES      stop requeueing after this many restarts                 [50]
#   RANK_EXIT_GRACE_S srun --wait: once one rank exited, kill the others after this long [600]
#   SKIP_MESH_CHECK   1: do not run `python -m runtime.plan --check-only` first
#   LAUNCHER          srun (one task per GPU, default) | torchrun (one task per node)
#   DEBUG_RANK        run this rank under debugpy (waits for a client on DEBUG_PORT [5678])
#   EXTRA_SRUN_ARGS   appended to the training srun (word-split)

gptoss_log() { printf '[gptoss %s] %s\n' "$(date '+%F %T')" "$*"; }
gptoss_die() { gptoss_log "ERROR: $1" >&2; exit "${2:-1}"; }

# Where the checkout is: sbatch runs a *copy* of the script from slurmd's spool, so $0 is no
# help; ask slurmctld for the submitted path (Command=), else use the submission directory.
gptoss_find_root() {
  if [[ -n "${RUNTIME_ROOT:-}" ]]; then echo "$RUNTIME_ROOT"; return; fi
  local cmd
  cmd=$(scontrol show job "${SLURM_JOB_ID:-}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)
  if [[ -n "$cmd" && -f "$cmd" && -f "$(dirname "$cmd")/common.sh" ]]; then
    (cd "$(dirname "$cmd")/.." && pwd)
  else
    echo "${SLURM_SUBMIT_DIR:-$PWD}"
  fi
}

# Writes the container launch prefix into the arrays GPTOSS_SRUN_CONTAINER (pyxis srun options)
# and GPTOSS_EXEC_PREFIX (apptainer exec ... IMAGE).
gptoss_container_setup() {
  GPTOSS_SRUN_CONTAINER=()
  GPTOSS_EXEC_PREFIX=()
  local image=${CONTAINER_IMAGE:-}
  local sif=${SIF:-}
  if [[ -z "$sif" && "$image" == *.sif ]]; then sif=$image; image=""; fi
  local mounts="$RUNTIME_ROOT:$RUNTIME_ROOT"
  if [[ -n "${CONTAINER_MOUNTS:-}" ]]; then mounts+=",$CONTAINER_MOUNTS"; fi
  if [[ -n "$sif" ]]; then
    [[ -f "$sif" ]] || gptoss_die "Apptainer image $sif not found" 2
    # --nv binds the host's NVIDIA driver; the environment (SLURM_*, NCCL_*) passes through.
    GPTOSS_EXEC_PREFIX=(apptainer exec --nv --bind "$mounts" --pwd "$RUNTIME_ROOT" "$sif")
    gptoss_log "container: apptainer $sif (mounts $mounts)"
  elif [[ -n "$image" ]]; then
    # pyxis: the image is imported once per node and job (named container), reused by the
    # mesh-check step and the training step; the checkout is mounted at the same path so that
    # relative config/dump paths mean the same inside and outside.
    GPTOSS_SRUN_CONTAINER=(
      "--container-image=$image"
      "--container-mounts=$mounts"
      "--container-workdir=$RUNTIME_ROOT"
      "--container-name=gptoss-${SLURM_JOB_ID}"
    )
    gptoss_log "container: pyxis $image (mounts $mounts)"
  fi
}

# Checks that CONFIG's parallelism mesh fits WORLD ranks before anything expensive starts.
gptoss_mesh_check() {
  local world=$1; shift
  if [[ "${SKIP_MESH_CHECK:-0}" == 1 ]]; then gptoss_log "mesh check skipped (SKIP_MESH_CHECK=1)"; return 0; fi
  local out rc=0 cmd=("$PYTHON" -m runtime.plan --config "$CONFIG" --world-size "$world" --check-only "$@")
  if (( ${#GPTOSS_SRUN_CONTAINER[@]} )); then
    out=$(srun --nodes=1 --ntasks=1 "${GPTOSS_SRUN_CONTAINER[@]}" "${cmd[@]}" 2>&1) || rc=$?
  else
    out=$("${GPTOSS_EXEC_PREFIX[@]}" "${cmd[@]}" 2>&1) || rc=$?
  fi
  if (( rc != 0 )); then
    printf '%s\n' "$out" >&2
    gptoss_die "mesh check failed: $CONFIG for this job's $world ranks ($SLURM_JOB_NUM_NODES node(s) x ${SLURM_NTASKS_PER_NODE:-?} task(s)): $(printf '%s\n' "$out" | grep -v '^\s*$' | tail -n 1)" 2
  fi
  gptoss_log "mesh check ok: $CONFIG fits $world ranks${out:+ ($(printf '%s' "$out" | tail -n 1))}"
}

# Redacted environment snapshot for the job folder (no tokens/keys/passwords).
gptoss_env_snapshot() {
  env | grep -E '^(SLURM|NCCL|TORCH|CUDA|FI_|OMP|PYTHON|MASTER|CONTAINER|SIF|CONFIG|RUNTIME|HF_HOME|PATH)' \
    | grep -viE 'TOKEN|KEY|SECRET|PASSWORD' | sort
}

# The job: gptoss_main [--section.key=value ...]
gptoss_main() {
  set -uo pipefail
  [[ -n "${SLURM_JOB_ID:-}" ]] || gptoss_die "not inside a Slurm job (use sbatch, or salloc + slurm/interactive.sh)" 2
  RUNTIME_ROOT=$(gptoss_find_root)
  export RUNTIME_ROOT
  cd "$RUNTIME_ROOT" || gptoss_die "cannot cd to RUNTIME_ROOT=$RUNTIME_ROOT" 2
  [[ -f runtime/__init__.py ]] || gptoss_die "RUNTIME_ROOT=$RUNTIME_ROOT is not a gptoss-runtime checkout" 2
  export PYTHONPATH="$RUNTIME_ROOT${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
  PYTHON=${PYTHON:-python3}
  : "${CONFIG:?set CONFIG=path/to/config.toml}"
  [[ -f "$CONFIG" ]] || gptoss_die "config $CONFIG not found (relative paths are relative to $RUNTIME_ROOT)" 2

  local overrides=()
  if [[ -n "${DUMP_FOLDER:-}" ]]; then overrides+=("--job.dump_folder=$DUMP_FOLDER"); fi
  overrides+=("$@")

  local world=${SLURM_NTASKS:-}
  [[ -n "$world" ]] || gptoss_die "SLURM_NTASKS is not set: request tasks (--ntasks-per-node=GPUS_PER_NODE)" 2
  local attempt=${SLURM_RESTART_COUNT:-0}
  local job_dir="${LOG_DIR:-$RUNTIME_ROOT/logs}/${SLURM_JOB_NAME:-gptoss}-${SLURM_JOB_ID}"
  mkdir -p "$job_dir" || gptoss_die "cannot create log folder $job_dir" 2
  export GPTOSS_JOB_LOG_DIR=$job_dir

  # Rendezvous: rank 0 runs on the first node of the allocation (block distribution).
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export MASTER_ADDR MASTER_PORT
  # Threads per rank: the CPUs Slurm gave each task.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

  gptoss_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) attempt ${attempt}: ${world} ranks on ${SLURM_JOB_NUM_NODES} node(s) [${SLURM_JOB_NODELIST}], master ${MASTER_ADDR}:${MASTER_PORT}"
  gptoss_log "config ${CONFIG} overrides: ${overrides[*]:-(none)}"
  gptoss_log "logs: ${job_dir}/"
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" && -n "${SLURM_NTASKS_PER_NODE:-}" && "${SLURM_GPUS_ON_NODE}" != "${SLURM_NTASKS_PER_NODE}" ]]; then
    gptoss_log "WARNING: ${SLURM_GPUS_ON_NODE} GPUs but ${SLURM_NTASKS_PER_NODE} tasks per node: one task per GPU is expected"
  fi
  {
    echo "attempt ${attempt} start $(date -Is) nodes ${SLURM_JOB_NODELIST}"
  } >> "$job_dir/attempts.log"
  if (( attempt == 0 )); then
    cp -f "$CONFIG" "$job_dir/config.toml" 2>/dev/null || true
    printf '%q ' "$CONFIG" "${overrides[@]}" > "$job_dir/command.txt"; echo >> "$job_dir/command.txt"
  fi
  gptoss_env_snapshot > "$job_dir/env-attempt${attempt}.txt"

  gptoss_container_setup
  gptoss_mesh_check "$world" "${overrides[@]}"

  # ---- the training step --------------------------------------------------------------
  local srun_args=(
    --kill-on-bad-exit=0               # a rank that exits first (e.g. 75) must not kill the others mid-save
    "--wait=${RANK_EXIT_GRACE_S:-600}"  # ...but do not hang forever behind a crashed rank
  )
  if [[ "${RANK_LOGS:-1}" == 1 ]]; then
    srun_args+=("--output=$job_dir/rank-%t.log" --open-mode=append)
  else
    srun_args+=(--label)
  fi
  srun_args+=("${GPTOSS_SRUN_CONTAINER[@]}")
  local train=("$PYTHON" -m runtime.train --config "$CONFIG" "${overrides[@]}")
  if [[ "${LAUNCHER:-srun}" == torchrun ]]; then
    # One agent per node; torchrun sets RANK/WORLD_SIZE (slurm_env.py then does nothing).
    # NOTE: torchrun does not forward SIGUSR1 to its workers: use --signal=TERM@<s> with it.
    local nproc=${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    srun_args+=(--ntasks-per-node=1 "--ntasks=${SLURM_JOB_NUM_NODES}")
    train=("$PYTHON" -m torch.distributed.run --nnodes="${SLURM_JOB_NUM_NODES}" --nproc-per-node="$nproc"
           --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id="${SLURM_JOB_ID}"
           -m runtime.train --config "$CONFIG" "${overrides[@]}")
  fi
  # shellcheck disable=SC2206
  if [[ -n "${EXTRA_SRUN_ARGS:-}" ]]; then srun_args+=(${EXTRA_SRUN_ARGS}); fi

  gptoss_log "launch: srun ${srun_args[*]} ${GPTOSS_EXEC_PREFIX[*]} bash slurm/rank_exec.sh ${train[*]}"
  # srun in the background + wait, so that a SIGTERM to this batch shell (time limit,
  # preemption) is trapped and we keep waiting for the ranks to save and exit.
  local term_seen=0 rc
  trap 'term_seen=1; gptoss_log "batch shell got SIGTERM: waiting for the ranks to checkpoint"' TERM
  srun "${srun_args[@]}" "${GPTOSS_EXEC_PREFIX[@]}" bash "$RUNTIME_ROOT/slurm/rank_exec.sh" "${train[@]}" &
  local srun_pid=$!
  while true; do
    wait "$srun_pid"; rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break   # wait returned because of a trapped signal
  done
  trap - TERM
  echo "attempt ${attempt} exit ${rc} $(date -Is)" >> "$job_dir/attempts.log"

  if [[ "${RANK_LOGS:-1}" == 1 && -f "$job_dir/rank-0.log" ]]; then
    gptoss_log "rank 0 log tail ($job_dir/rank-0.log):"
    tail -n 5 "$job_dir/rank-0.log" | sed 's/^/    /'
  fi

  case "$rc" in
    0)
      gptoss_log "training finished (exit 0)"
      return 0 ;;
    75)
      if [[ "${GPTOSS_INTERACTIVE:-0}" == 1 ]]; then
        gptoss_log "ranks checkpointed and exited 75; interactive: not requeueing (run again to resume)"
        return 75
      fi
      if (( attempt >= ${MAX_REQUEUES:-50} )); then
        gptoss_die "ranks exited 75 (requeue) but MAX_REQUEUES=${MAX_REQUEUES:-50} restarts reached" 75
      fi
      gptoss_log "ranks checkpointed and exited 75: requeueing job ${SLURM_JOB_ID} (it resumes from the latest checkpoint)"
      echo "attempt ${attempt} requeue $(date -Is)" >> "$job_dir/attempts.log"
      scontrol requeue "$SLURM_JOB_ID" || gptoss_die "scontrol requeue $SLURM_JOB_ID failed (was the job submitted with --no-requeue?)" 75
      # slurmctld now ends this run and puts the job back in the queue; nothing else to do
      return 0 ;;
    2)
      gptoss_die "config error (exit 2): see $job_dir/rank-0.log" 2 ;;
    *)
      if (( term_seen )); then gptoss_die "ranks exited ${rc} after SIGTERM" "$rc"; fi
      gptoss_die "training failed with exit ${rc}: see $job_dir/rank-*.log" "$rc" ;;
  esac
}
