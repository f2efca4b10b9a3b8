# shellcheck shell=bash
# shellcheck disable=SC2030,SC2031  # gptoss_submit_checks sets job-like variables in a subshell on purpose
# slurm/common.sh - the launcher shared by slurm/*.sbatch and slurm/interactive.sh (sourced).
#
# Launch model: ONE TASK PER GPU. `srun` starts WORLD_SIZE = SLURM_NTASKS plain
# `python -m runtime.train` processes; each one maps SLURM_PROCID/SLURM_LOCALID/... to
# RANK/LOCAL_RANK/... itself (runtime/train/slurm_env.py) and meets the others at
# MASTER_ADDR:MASTER_PORT (first node of the job, port derived from the job id). Every rank
# receives Slurm's signals directly (runtime/train/faults.py):
#   SIGUSR1 (`--signal=USR1@<s>`, before the time limit): each rank finishes its step, saves a
#           checkpoint and exits 75 (EXIT_REQUEUE); this script requeues the job, which resumes
#           from the latest complete checkpoint in job.dump_folder;
#   SIGTERM (scancel, preemption): the same save, then exit 143: the job ends (not requeued).
# A rank that crashes (any other exit code) ends the whole step at once (srun
# --kill-on-bad-exit with slurm/rank_exec.sh). Before srun: the time limit against the signal's
# lead, then `python -m runtime.plan`: the config, the mesh for this job's ranks, memory per GPU.
# (torchrun's agent would also receive the signals and end the workers on its own terms, hence
#  no torchrun here; LAUNCHER=torchrun runs one per node anyway, see slurm/README.md.)
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
#   RANK_EXIT_GRACE_S srun --wait: once one rank exited (cleanly), kill the others after this long [600]
#   GPU_MEMORY_GIB    memory per GPU for the memory check           [nvidia-smi, else 80]
#   SKIP_MEMORY_CHECK 1: check the config and mesh only, not memory per rank (the trainer's
#                     check too: --training.skip_memory_check=true)
#   SKIP_MESH_CHECK   1: no `python -m runtime.plan` check at all before srun
#   SIGNAL_LEAD_S     the --signal lead in seconds, if the submit line/header cannot tell
#   LAUNCHER          srun (one task per GPU, default) | torchrun (one task per node)
#   DEBUG_RANK        run this rank under debugpy (waits for a client on DEBUG_PORT [5678])
#   EXTRA_SRUN_ARGS   appended to the training srun (word-split)

gptoss_log() { printf '[gptoss %s] %s\n' "$(date '+%F %T')" "$*"; }
gptoss_die() { gptoss_log "ERROR: $1" >&2; exit "${2:-1}"; }

# Exit codes of a rank that ended cleanly (runtime/train/faults.py): 0 done, 75 checkpointed for a
# requeue, 128 + SIGINT/SIGUSR1/SIGTERM stopped on that signal (checkpoint saved if enabled).
GPTOSS_EXIT_REQUEUE=75
gptoss_signal_stop_code() { [[ "$1" == 130 || "$1" == 138 || "$1" == 143 ]]; }

# A trainer config override: --section.key[=value] (sbatch options never have a dot in the name).
gptoss_is_override() { [[ "$1" =~ ^--[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)+(=.*)?$ ]]; }

# Every argument after the script must be an override or the value of the one before it:
# `sbatch slurm/x.sbatch --hold` would otherwise hand --hold to the trainer.
gptoss_check_overrides() {
  local tok value_may_follow=0
  for tok in "$@"; do
    if gptoss_is_override "$tok"; then
      if [[ "$tok" == *=* ]]; then value_may_follow=0; else value_may_follow=1; fi
    elif (( value_may_follow )) && [[ ! "$tok" =~ ^--[A-Za-z] ]]; then
      value_may_follow=0
    else
      gptoss_die "'$tok' is not a config override (--section.key=value): sbatch options go before the script (sbatch $tok slurm/<template>.sbatch, or bash slurm/<template>.sbatch $tok --section.key=value)" 2
    fi
  done
}

# Slurm time ([D-]HH:MM:SS, MM:SS, M, D-HH[:MM]) -> seconds; fails for UNLIMITED and the like.
gptoss_time_s() {
  local t=$1 d=0 h=0 m=0 s=0
  if [[ "$t" =~ ^([0-9]+)-([0-9]+)(:([0-9]+))?(:([0-9]+))?$ ]]; then
    d=${BASH_REMATCH[1]}; h=${BASH_REMATCH[2]}; m=${BASH_REMATCH[4]:-0}; s=${BASH_REMATCH[6]:-0}
  elif [[ "$t" =~ ^([0-9]+):([0-9]+):([0-9]+)$ ]]; then
    h=${BASH_REMATCH[1]}; m=${BASH_REMATCH[2]}; s=${BASH_REMATCH[3]}
  elif [[ "$t" =~ ^([0-9]+):([0-9]+)$ ]]; then
    m=${BASH_REMATCH[1]}; s=${BASH_REMATCH[2]}
  elif [[ "$t" =~ ^([0-9]+)$ ]]; then
    m=${BASH_REMATCH[1]}
  else
    return 1
  fi
  echo $(( ((10#$d * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s ))
}

# The lead of the last `--signal=[B:]SIG@N` in the given text (sbatch options or a script).
gptoss_signal_lead_in() {
  grep -oE -- '--signal[= ]+([A-Za-z]+:)*[A-Za-z0-9]+@[0-9]+' <<<"$1" | tail -n 1 | sed 's/.*@//'
}

# Refuses a job whose time limit is not longer than its time-limit signal's lead: every leg would
# be told to stop as it starts, checkpoint, requeue, and again (up to MAX_REQUEUES times).
# gptoss_time_check LIMIT LEAD_S WHAT
gptoss_time_check() {
  local limit_s
  [[ -n "$1" && -n "$2" ]] || return 0
  limit_s=$(gptoss_time_s "$1") || return 0
  if (( limit_s <= $2 )); then
    gptoss_die "time limit $1 (${limit_s} s) is not longer than the time-limit signal's lead (--signal=...@$2, $3): every leg would stop as soon as it starts; ask for more --time or a smaller --signal lead" 2
  fi
}

# In the job: the limit from slurmctld, the lead from the submit line (sacct, if accounting
# keeps it) or else from this script's #SBATCH header; SIGNAL_LEAD_S overrides both.
gptoss_job_time_check() {
  [[ "${GPTOSS_INTERACTIVE:-0}" == 1 ]] && return 0
  local limit lead where
  limit=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.*TimeLimit=\([^ ]*\).*/\1/p' | head -n 1)
  if [[ -n "${SIGNAL_LEAD_S:-}" ]]; then
    lead=$SIGNAL_LEAD_S; where="SIGNAL_LEAD_S"
  else
    lead=$(gptoss_signal_lead_in "$(timeout 20 sacct -j "$SLURM_JOB_ID" -X -n -P -o SubmitLine 2>/dev/null | head -n 1)"); where="sbatch command line"
    if [[ -z "$lead" ]]; then
      lead=$(gptoss_signal_lead_in "$(grep -E '^#SBATCH' "$0" 2>/dev/null)"); where="#SBATCH header"
    fi
  fi
  gptoss_time_check "$limit" "$lead" "$where"
}

# GPU memory per GPU in GiB for the memory check: GPU_MEMORY_GIB, else what nvidia-smi reports
# on this (first) node of the job, else 80 (H100 80GB).
gptoss_gpu_memory_gib() {
  if [[ -n "${GPU_MEMORY_GIB:-}" ]]; then echo "$GPU_MEMORY_GIB"; return; fi
  local mib
  mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -d ' ')
  if [[ "$mib" =~ ^[0-9]+$ ]] && (( mib > 0 )); then
    awk -v m="$mib" 'BEGIN { printf "%.1f\n", m / 1024 }'
  else
    echo 80
  fi
}

# Outside Slurm (`bash slurm/x.sbatch [sbatch options] [--section.key=value ...]`): submit the
# script. Everything before the first override (or a `--`) is an sbatch option.
gptoss_submit() {
  local script=$1; shift
  local opts=()
  while (( $# )); do
    if [[ "$1" == -- ]]; then shift; break; fi
    gptoss_is_override "$1" && break
    opts+=("$1"); shift
  done
  gptoss_check_overrides "$@"
  local all_opts limit lead
  all_opts="$(grep -E '^#SBATCH' "$script") ${opts[*]}"
  limit=$(gptoss_opt_value "$all_opts" '--time|-t')
  lead=$(gptoss_signal_lead_in "$all_opts")
  gptoss_time_check "$limit" "$lead" "options and #SBATCH header"
  gptoss_submit_checks "$script" "$all_opts" "$@"
  mkdir -p logs   # the --output folder (tracked in git; sbatch does not create it)
  exec sbatch "${opts[@]}" "$script" "$@"
}

# The last value of an sbatch option in TEXT (#SBATCH lines, then the command line):
# gptoss_opt_value TEXT '--nodes|-N' -> 2 for "--nodes=2", "--nodes 2", "-N 2", "-N2".
gptoss_opt_value() {
  grep -oE -- "(^|[ =])(${2})(=| +|)[^ =-][^ ]*" <<<"$1" | tail -n 1 | sed -E "s/^[ =]?(${2})(=| +|)//"
}

# Before submitting: the job's config/mesh/memory checks, here, when this machine's python can
# run the plan (torch importable) and the layout is plain NODES x NTASKS_PER_NODE; else they run
# in the job only. GPU memory: GPU_MEMORY_GIB, else 80 (a login node's GPUs prove nothing).
gptoss_submit_checks() {
  local script=$1 all_opts=$2; shift 2
  [[ "${SKIP_MESH_CHECK:-0}" == 1 ]] && return 0
  local nodes tpn root
  nodes=$(gptoss_opt_value "$all_opts" '--nodes|-N')
  tpn=$(gptoss_opt_value "$all_opts" '--ntasks-per-node')
  root=$(cd "$(dirname "$script")/.." && pwd)
  PYTHON=${PYTHON:-python3}
  if [[ ! "$nodes" =~ ^[0-9]+$ || ! "$tpn" =~ ^[0-9]+$ ]] \
     || ! (cd "$root" && PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c 'import torch, runtime.plan' >/dev/null 2>&1); then
    gptoss_log "config/mesh/memory checks: in the job (not runnable here)" >&2
    return 0
  fi
  (
    cd "$root" || exit 2
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" GPU_MEMORY_GIB=${GPU_MEMORY_GIB:-80}
    export SLURM_JOB_NUM_NODES=$nodes SLURM_NTASKS_PER_NODE=$tpn
    GPTOSS_SRUN_CONTAINER=(); GPTOSS_EXEC_PREFIX=()
    [[ -f "$CONFIG" ]] || gptoss_die "config $CONFIG not found (relative paths are relative to $root)" 2
    gptoss_checks $((nodes * tpn)) "$@"
  ) >&2 || exit $?   # stdout stays sbatch's (--parsable)
}

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

# Runs `$PYTHON ARGS...` where the ranks will run it (in the container, if any); sets
# GPTOSS_OUT (stdout + stderr) and GPTOSS_RC.
gptoss_python() {
  GPTOSS_RC=0
  if (( ${#GPTOSS_SRUN_CONTAINER[@]} )); then
    GPTOSS_OUT=$(srun --nodes=1 --ntasks=1 "${GPTOSS_SRUN_CONTAINER[@]}" "$PYTHON" "$@" 2>&1) || GPTOSS_RC=$?
  else
    GPTOSS_OUT=$("${GPTOSS_EXEC_PREFIX[@]}" "$PYTHON" "$@" 2>&1) || GPTOSS_RC=$?
  fi
}
gptoss_last_line() { printf '%s\n' "$1" | grep -v '^\s*$' | tail -n 1; }

# Before anything expensive starts, `python -m runtime.plan` on the first node: (1) the config
# and overrides alone (unknown key, bad value: a config error), (2) the parallel mesh against
# this job's WORLD ranks and (3) the memory per rank against the GPUs' (SKIP_MEMORY_CHECK=1:
# mesh only; SKIP_MESH_CHECK=1: none of it). Dies with exit 2 and the plan's one-line reason.
gptoss_checks() {
  local world=$1; shift
  if [[ "${SKIP_MESH_CHECK:-0}" == 1 ]]; then gptoss_log "config/mesh/memory checks skipped (SKIP_MESH_CHECK=1)"; return 0; fi
  local plan=(-m runtime.plan --config "$CONFIG" --world-size "$world") gib=""
  local layout="$SLURM_JOB_NUM_NODES node(s) x ${SLURM_NTASKS_PER_NODE:-?} task(s)"
  gptoss_python "${plan[@]}" --print-config "$@"
  if (( GPTOSS_RC != 0 )); then
    printf '%s\n' "$GPTOSS_OUT" >&2
    gptoss_die "config error in $CONFIG or the overrides: $(gptoss_last_line "$GPTOSS_OUT")" 2
  fi
  if [[ "${SKIP_MEMORY_CHECK:-0}" == 1 ]]; then
    gptoss_python "${plan[@]}" --check-only "$@"
  else
    local gib
    gib=$(gptoss_gpu_memory_gib)
    gptoss_python "${plan[@]}" --gpu-memory-gib "$gib" "$@"
  fi
  case "$GPTOSS_RC" in
    0) ;;
    1)
      printf '%s\n' "$GPTOSS_OUT" >&2
      gptoss_die "memory check failed: $CONFIG on this job's $world ranks ($layout) with ${gib} GiB per GPU (GPU_MEMORY_GIB sets the size, SKIP_MEMORY_CHECK=1 skips the check): $(gptoss_last_line "$GPTOSS_OUT")" 2 ;;
    *)
      printf '%s\n' "$GPTOSS_OUT" >&2
      gptoss_die "mesh check failed: $CONFIG for this job's $world ranks ($layout): $(gptoss_last_line "$GPTOSS_OUT")" 2 ;;
  esac
  if [[ "${SKIP_MEMORY_CHECK:-0}" == 1 ]]; then
    gptoss_log "mesh check ok: $CONFIG fits $world ranks ($(gptoss_last_line "$GPTOSS_OUT")); memory check skipped"
  else
    gptoss_log "mesh and memory check ok: $CONFIG fits $world ranks, $(printf '%s\n' "$GPTOSS_OUT" | grep -E '^ *total' | sed 's/^ *//')"
  fi
}

# The ranks that crashed (a code other than 0, 75, 130/138/143), from the records rank_exec.sh
# wrote into EXIT_DIR ("<code> <epoch s> <host>"), earliest first: "<epoch s> <rank> <code> <host>"
# per line. The first is the root cause (as torchrun's "first observed failure"); the others are
# usually collateral (a peer's gloo/NCCL "connection reset"). Which rank's record comes first in
# rank order is a race, so the time decides (hosts' clocks: NTP). No time: last.
gptoss_step_failures() {
  local exit_dir=$1 world=$2 rank code t host
  for ((rank = 0; rank < world; rank++)); do
    [[ -s "$exit_dir/rank-$rank" ]] || continue
    read -r code t host < "$exit_dir/rank-$rank" || true
    if [[ -z "$code" || "$code" == 0 || "$code" == "$GPTOSS_EXIT_REQUEUE" ]] || gptoss_signal_stop_code "$code"; then
      continue
    fi
    [[ "$t" =~ ^[0-9]+(\.[0-9]+)?$ ]] || t=9e99
    echo "$t $rank $code ${host:-?}"
  done | LC_ALL=C sort -g -k1,1 -k2,2n
}

# The step's outcome from the ranks' own records (written by rank_exec.sh into EXIT_DIR):
# "<code> <rank>" of the first crash by time (gptoss_step_failures), else "<code> -" of a signal
# stop, else 75, else 0; srun's code where ranks left no record (killed, or never started).
gptoss_step_outcome() {
  local exit_dir=$1 world=$2 srun_rc=$3 f code stop="" requeue=0 n=0 rank first t host
  first=$(gptoss_step_failures "$exit_dir" "$world" | head -n 1)
  if [[ -n "$first" ]]; then
    read -r t rank code host <<<"$first"
    echo "$code $rank"; return
  fi
  for ((rank = 0; rank < world; rank++)); do
    f="$exit_dir/rank-$rank"
    [[ -s "$f" ]] || continue
    n=$((n + 1)); read -r code _ < "$f" || true
    if [[ "$code" == "$GPTOSS_EXIT_REQUEUE" ]]; then requeue=1
    elif gptoss_signal_stop_code "$code"; then stop=${stop:-$code}
    fi
  done
  if (( n < world )) && (( srun_rc != 0 )); then echo "$srun_rc -"; return; fi
  if [[ -n "$stop" ]]; then echo "$stop -"; return; fi
  if (( requeue )); then echo "$GPTOSS_EXIT_REQUEUE -"; return; fi
  echo "$srun_rc -"
}

# After a crash: the root cause (rank, host, code, time, its log's tail), then the other
# crashed ranks with their delay after it, like torchrun's "Root Cause" / "Other Failures".
gptoss_report_failures() {
  local exit_dir=$1 world=$2 job_dir=$3 lines t0 t rank code host when
  lines=$(gptoss_step_failures "$exit_dir" "$world")
  [[ -n "$lines" ]] || return 0
  read -r t0 rank code host <<<"$(head -n 1 <<<"$lines")"
  when=$(date -d "@${t0%%.*}" '+%F %T' 2>/dev/null || echo "?")
  gptoss_log "root cause (first failure): rank ${rank} on ${host} exited ${code} at ${when}"
  if [[ -f "$job_dir/rank-$rank.log" ]]; then
    gptoss_log "rank ${rank} log tail ($job_dir/rank-$rank.log):"
    tail -n 10 "$job_dir/rank-$rank.log" | sed 's/^/    /'
  fi
  while read -r t rank code host; do
    [[ -n "$rank" ]] || continue
    gptoss_log "after it: rank ${rank} on ${host} exited ${code} ($(awk -v a="$t" -v b="$t0" 'BEGIN { printf "+%.2f s", a - b }'))"
  done < <(tail -n +2 <<<"$lines")
}

# Redacted environment snapshot for the job folder (no tokens/keys/passwords).
gptoss_env_snapshot() {
  env | grep -E '^(SLURM|NCCL|TORCH|CUDA|FI_|OMP|PYTHON|MASTER|CONTAINER|SIF|CONFIG|RUNTIME|HF_HOME|PATH)' \
    | grep -viE 'TOKEN|KEY|SECRET|PASSWORD' | sort
}

# Interactive Ctrl-C -> SIGINT to the job's steps (see gptoss_main).
gptoss_forward_ctrl_c() {
  local now
  now=$(date +%s%3N)
  (( now - GPTOSS_LAST_INT_MS >= 700 )) || return 0
  GPTOSS_LAST_INT_MS=$now
  gptoss_log "Ctrl-C: the ranks finish their step, save and stop (Ctrl-C again: at once)"
  scancel --signal=INT "$SLURM_JOB_ID" 2>/dev/null || true
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

  gptoss_check_overrides "$@"
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
  # below the Linux ephemeral range (32768-60999), where a port may already be in use;
  # the same formula as runtime/train/slurm_env.py:master_port_for_job
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 12768))}
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

  gptoss_job_time_check
  gptoss_container_setup
  gptoss_checks "$world" "${overrides[@]}"
  # the trainer's own pre-flight memory check is skipped too
  if [[ "${SKIP_MEMORY_CHECK:-0}" == 1 ]]; then overrides+=(--training.skip_memory_check=true); fi

  # ---- the training step --------------------------------------------------------------
  local srun_args=(
    --kill-on-bad-exit=1                # a crashed rank ends the step at once (rank_exec.sh exits 0 for clean stops)
    "--wait=${RANK_EXIT_GRACE_S:-600}"  # ...and a rank that finished does not wait forever for a hung one
  )
  if [[ "${RANK_LOGS:-1}" == 1 ]]; then
    srun_args+=("--output=$job_dir/rank-%t.log" --open-mode=append)
  else
    srun_args+=(--label)
  fi
  srun_args+=("${GPTOSS_SRUN_CONTAINER[@]}")
  local train=("$PYTHON" -m runtime.train --config "$CONFIG" "${overrides[@]}") tasks=$world
  if [[ "${LAUNCHER:-srun}" == torchrun ]]; then
    # One agent per node; torchrun sets RANK/WORLD_SIZE (slurm_env.py then does nothing).
    # NOTE: its agent also gets Slurm's signals and ends with its own exit code (see
    # slurm/README.md): no requeue on this path.
    local nproc=${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    tasks=$SLURM_JOB_NUM_NODES
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
  local term_seen=0 rc srun_rc exit_dir="$job_dir/exit" outcome bad_rank
  rm -rf "$exit_dir"; mkdir -p "$exit_dir"
  trap 'term_seen=1; gptoss_log "batch shell got SIGTERM: waiting for the ranks to checkpoint"' TERM
  # Interactive Ctrl-C: srun runs in the background (SIGINT ignored), so pass it to the ranks
  # ourselves; they finish the step, save and exit 130, a second Ctrl-C stops them at once.
  # The time guard drops the copy that comes back to us when we run inside a step ourselves.
  GPTOSS_LAST_INT_MS=0
  if [[ "${GPTOSS_INTERACTIVE:-0}" == 1 ]]; then trap gptoss_forward_ctrl_c INT; fi
  srun "${srun_args[@]}" "${GPTOSS_EXEC_PREFIX[@]}" bash "$RUNTIME_ROOT/slurm/rank_exec.sh" "${train[@]}" &
  local srun_pid=$!
  while true; do
    wait "$srun_pid"; srun_rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break   # wait returned because of a trapped signal
  done
  trap - TERM INT
  outcome=$(gptoss_step_outcome "$exit_dir" "$tasks" "$srun_rc")
  rc=${outcome% *}; bad_rank=${outcome#* }
  echo "attempt ${attempt} exit ${rc} $(date -Is)" >> "$job_dir/attempts.log"

  if [[ "$bad_rank" != - ]]; then
    gptoss_report_failures "$exit_dir" "$tasks" "$job_dir"
  elif [[ "${RANK_LOGS:-1}" == 1 && -f "$job_dir/rank-0.log" ]]; then
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
    130|138|143)
      # scancel / Ctrl-C / a time-limit signal with nothing to resume from: the ranks saved
      # (if checkpointing is on) and stopped; the job ends here (Slurm requeues preempted jobs itself)
      gptoss_log "ranks stopped on SIG$(kill -l $((rc - 128))) (exit ${rc}): not requeueing; see $job_dir/rank-0.log"
      return "$rc" ;;
    2)
      gptoss_die "config error (exit 2): see $job_dir/rank-${bad_rank/-/0}.log" 2 ;;
    *)
      if (( term_seen )); then gptoss_die "ranks exited ${rc} after SIGTERM" "$rc"; fi
      if [[ "$bad_rank" != - ]]; then
        gptoss_die "rank ${bad_rank} failed with exit ${rc} (the step was stopped): see $job_dir/rank-${bad_rank}.log" "$rc"
      fi
      gptoss_die "training failed with exit ${rc}: see $job_dir/rank-*.log" "$rc" ;;
  esac
}
