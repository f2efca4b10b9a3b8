#!/usr/bin/env bash
# Every benchmark variant on ONE GPU, in groups that each fit one command of a 15-minute lease
# (<= 10 minutes a command), appended to one dated JSONL + a markdown table.
#
#   RESULTS_DIR=$OUT bash benchmarks/run_all.sh block table        # one lease: one group (+ table)
#   RESULTS_DIR=$OUT bash benchmarks/run_all.sh train table
#   bash benchmarks/run_all.sh                 # every group in a row (a long session, ~25-35 min)
#   QUICK=1 bash benchmarks/run_all.sh         # the reference variants only: peak block train table
#   ALLOW_CPU=1 PEAK_TFLOPS=1 QUICK=1 CONFIG=configs/debugmodel.toml \
#     TRAIN_ARGS="--model.flavor=tiny --training.seq_len=32 --training.device=cpu" \
#     BLOCK_ARGS="--flavor tiny --tokens 64" bash benchmarks/run_all.sh block train table   # CPU smoke
#
# Groups (run in the order given; budgets are first guesses, not yet measured on a GPU):
#   peak          8192^3 bf16 matmul -> the peak every later MFU / % of peak is quoted against  ~0.5 min
#   block         bench_block.py: 20b block, 16k tokens, sliding + full: eager and compiled
#                 (+ pieces)                                                                     ~4-6 min
#   block-bf16    the same block eager and compiled with bf16 params (as under FSDP), no pieces ~3-5 min
#   train         bench_train.py on benchmarks/configs/20b_2layer_seq4096.toml: as shipped
#                 (compiled) and eager                                                           ~4-6 min
#   train-extra   compiled with the plain (unfused) logits loss, + selective AC, + full AC      ~6-9 min
#   table         make_table.py over the day's JSONL -> <date>.md                                seconds
# Every group stops starting variants when GROUP_BUDGET (default 540 s) is spent: a variant gets
# min(PER_RUN_TIMEOUT, the group's time left) and is skipped (reported) under 60 s. So one group
# + table fits one <= 10-minute command; on a lent machine write to RESULTS_DIR=$OUT.
# Output: $RESULTS_DIR/<UTC date>.jsonl (appended) and $RESULTS_DIR/<UTC date>.md.
# Every variant runs in its own process with a fresh, empty TORCHINDUCTOR_CACHE_DIR and
# TRITON_CACHE_DIR, so each first-step time is a cold compile (SHARED_CACHE=1: one warm cache for
# all, faster, first-step times then warm). A variant that fails (OOM, timeout) is reported and
# the rest still run; the script exits 1 if any failed. benchmarks/gpu_check.sh (8 minutes) is
# the first thing to run in a GPU window: correctness + the reference numbers.
set -uo pipefail

# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
PY=${PYTHON:-python3}
DATE=${DATE:-$(date -u +%F)}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/benchmarks/results}
OUT=${OUT_JSONL:-$RESULTS_DIR/$DATE.jsonl}
TABLE=${OUT_TABLE:-$RESULTS_DIR/$DATE.md}
PER_RUN_TIMEOUT=${PER_RUN_TIMEOUT:-540}
GROUP_BUDGET=${GROUP_BUDGET:-540}
SHARED_CACHE=${SHARED_CACHE:-0}
GROUP_START=$SECONDS
CONFIG=${CONFIG:-benchmarks/configs/20b_2layer_seq4096.toml}
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-10}
QUICK=${QUICK:-0}
mkdir -p "$RESULTS_DIR"

failed=()
log() { printf '[run_all %s] %s\n' "$(date -u +%T)" "$*"; }

SHARED_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/bench-cache-shared.XXXXXX")
trap 'rm -rf "$SHARED_CACHE_DIR"' EXIT

# run LABEL CMD...: one variant, cold compile caches, a time limit (the smaller of PER_RUN_TIMEOUT
# and the group's time left); failures and variants skipped for lack of time are recorded.
run() {
  local label=$1; shift
  local left=$(( GROUP_BUDGET - (SECONDS - GROUP_START) ))
  local limit=$(( left < PER_RUN_TIMEOUT ? left : PER_RUN_TIMEOUT ))
  if (( limit < 60 )); then
    failed+=("$label (not run: the group's ${GROUP_BUDGET}s budget is spent)")
    log "$label: NOT RUN (group budget spent)"
    return
  fi
  local cache=$SHARED_CACHE_DIR
  [[ "$SHARED_CACHE" == 1 ]] || cache=$(mktemp -d "${TMPDIR:-/tmp}/bench-cache.XXXXXX")
  log "$label (limit ${limit}s): $*"
  local start=$SECONDS rc=0
  TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton" \
    timeout --signal=TERM --kill-after=30 "$limit" "$@" || rc=$?
  [[ "$SHARED_CACHE" == 1 ]] || rm -rf "$cache"
  if (( rc != 0 )); then
    failed+=("$label (exit $rc$([[ $rc == 124 ]] && echo ", timed out after ${limit}s"))")
    log "$label: FAILED (exit $rc) after $((SECONDS - start)) s"
  else
    log "$label: done in $((SECONDS - start)) s"
  fi
}

# Extra arguments for every bench_block.py / bench_train.py call (word-split), e.g. a CPU smoke
# run: BLOCK_ARGS="--flavor tiny --tokens 64" TRAIN_ARGS="--model.flavor=tiny --training.device=cpu"
read -r -a BLOCK_EXTRA <<< "${BLOCK_ARGS:-}"
read -r -a TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"

# The peak: PEAK_TFLOPS, else the `peak` group's measurement, else the last peak record already in
# the day's file (a session split over several calls), else each run measures its own.
PEAK=${PEAK_TFLOPS:-}
PEAK_SOURCE="given (PEAK_TFLOPS=${PEAK_TFLOPS:-})"
[[ -n "$PEAK" ]] || PEAK_SOURCE="measured: 8192^3 bfloat16 matmul, median (measure_peak.py record in $OUT)"
last_peak() {
  [[ -f "$OUT" ]] || return 0
  "$PY" - "$OUT" <<'PYEOF' 2>/dev/null || true
import json, sys
peaks = [json.loads(l) for l in open(sys.argv[1]) if '"kind": "peak"' in l]
if peaks:
    print(f"{peaks[-1]['peak_tflops']:.6g}")
PYEOF
}
peak_args() {
  [[ -n "$PEAK" ]] || PEAK=$(last_peak)
  if [[ -n "$PEAK" ]]; then
    printf '%s\n' --peak-tflops "$PEAK" --peak-source "$PEAK_SOURCE"
  else
    printf '%s\n' --measure-peak
  fi
}

group_peak() {
  log "peak: 8192^3 bf16 matmul"
  local value
  if value=$(timeout 300 "$PY" benchmarks/measure_peak.py --quiet --out "$OUT" --label run_all); then
    PEAK=$value
    log "peak: $PEAK TFLOP/s"
  else
    failed+=("peak")
    log "peak: FAILED; later runs measure their own (--measure-peak)"
  fi
}

group_block() {
  local pk; mapfile -t pk < <(peak_args)
  run "block eager" "$PY" benchmarks/bench_block.py --label eager "${pk[@]}" --out "$OUT" "${BLOCK_EXTRA[@]}"
  run "block compiled" "$PY" benchmarks/bench_block.py --compile --label compiled "${pk[@]}" --out "$OUT" \
    "${BLOCK_EXTRA[@]}"
}

group_block-bf16() {
  local pk; mapfile -t pk < <(peak_args)
  run "block eager bf16 params" "$PY" benchmarks/bench_block.py --param-dtype bfloat16 \
    --no-pieces --label eager-bf16-params "${pk[@]}" --out "$OUT" "${BLOCK_EXTRA[@]}"
  run "block compiled bf16 params" "$PY" benchmarks/bench_block.py --compile --param-dtype bfloat16 \
    --no-pieces --label compiled-bf16-params "${pk[@]}" --out "$OUT" "${BLOCK_EXTRA[@]}"
}

train() {  # train LABEL [overrides...]
  local label=$1; shift
  local pk; mapfile -t pk < <(peak_args)
  run "train $label" "$PY" benchmarks/bench_train.py --config "$CONFIG" --warmup "$WARMUP" \
    --steps "$STEPS" --label "$label" "${pk[@]}" --out "$OUT" "${TRAIN_EXTRA[@]}" "$@"
}

group_train() {
  train "ref (compiled)"
  train "eager" --compile.enable=false
}

group_train-extra() {
  train "compiled, plain logits loss" --training.loss_chunk_size=0  # before the fused loss
  train "compiled + selective AC" --activation_checkpoint.mode=selective
  train "compiled + full AC" --activation_checkpoint.mode=full
}

group_table() {
  if [[ -f "$OUT" ]]; then
    "$PY" benchmarks/make_table.py "$OUT" --out "$TABLE" && log "table: $TABLE" && cat "$TABLE"
  else
    log "table: no $OUT yet"
  fi
}

if [[ "${ALLOW_CPU:-0}" != 1 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "run_all.sh: no CUDA device visible (ALLOW_CPU=1 with BLOCK_ARGS/TRAIN_ARGS/CONFIG for a CPU smoke run)" >&2
  exit 2
fi

groups=("$@")
if (( ! ${#groups[@]} )); then
  if [[ "$QUICK" == 1 ]]; then groups=(peak block train table)
  else groups=(peak block block-bf16 train train-extra table); fi
fi
log "results: $OUT; groups: ${groups[*]}; $("$PY" -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")')"
for g in "${groups[@]}"; do
  case "$g" in
    peak|block|block-bf16|train|train-extra|table) ;;
    *) echo "run_all.sh: unknown group '$g' (peak, block, block-bf16, train, train-extra, table)" >&2; exit 2 ;;
  esac
done
for g in "${groups[@]}"; do
  GROUP_START=$SECONDS
  "group_$g"
done
if (( ${#failed[@]} )); then
  log "FAILED: ${failed[*]}"
  exit 1
fi
log "all done"
