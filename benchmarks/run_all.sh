#!/usr/bin/env bash
# Every benchmark variant on ONE GPU in one go, appended to one dated JSONL + a markdown table.
#
#   bash benchmarks/run_all.sh                 # all groups: peak, block, train, table
#   bash benchmarks/run_all.sh peak block      # only some groups (same results file)
#   QUICK=1 bash benchmarks/run_all.sh         # fewer variants (the reference ones only)
#   RESULTS_DIR=$OUT bash benchmarks/run_all.sh train    # e.g. on a lent machine
#   ALLOW_CPU=1 PEAK_TFLOPS=1 QUICK=1 CONFIG=configs/debugmodel.toml \
#     TRAIN_ARGS="--model.flavor=tiny --training.seq_len=32 --training.device=cpu" \
#     BLOCK_ARGS="--flavor tiny --tokens 64" bash benchmarks/run_all.sh block train table   # CPU smoke
#
# Groups (run in the order given):
#   peak   8192^3 bf16 matmul -> the peak every later MFU / % of peak is quoted against
#   block  bench_block.py: 20b block, 16k tokens, sliding + full: eager, compiled (+ pieces),
#          eager and compiled with bf16 params (as under FSDP)
#   train  bench_train.py on benchmarks/configs/20b_2layer_seq4096.toml: as shipped (compiled),
#          eager, plain (unfused) logits loss, + selective AC, + full AC
#   table  make_table.py over the day's JSONL -> <date>.md
# Output: $RESULTS_DIR/<UTC date>.jsonl (appended) and $RESULTS_DIR/<UTC date>.md.
# Every variant runs in its own process with a fresh, empty TORCHINDUCTOR_CACHE_DIR and
# TRITON_CACHE_DIR, so each first-step time is a cold compile. A variant that fails (OOM,
# timeout) is reported and the rest still run; the script exits 1 if any failed.
# Budget: not measured yet; compile dominates the compiled variants. PER_RUN_TIMEOUT caps each
# variant (default 540 s); QUICK=1 for a first session; split groups over several calls if a
# command may only run 10 minutes.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
PY=${PYTHON:-python3}
DATE=${DATE:-$(date -u +%F)}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/benchmarks/results}
OUT=${OUT_JSONL:-$RESULTS_DIR/$DATE.jsonl}
TABLE=${OUT_TABLE:-$RESULTS_DIR/$DATE.md}
PER_RUN_TIMEOUT=${PER_RUN_TIMEOUT:-540}
CONFIG=${CONFIG:-benchmarks/configs/20b_2layer_seq4096.toml}
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-10}
QUICK=${QUICK:-0}
mkdir -p "$RESULTS_DIR"

failed=()
log() { printf '[run_all %s] %s\n' "$(date -u +%T)" "$*"; }

# run LABEL CMD...: one variant, cold compile caches, a time limit; failures are recorded.
run() {
  local label=$1; shift
  local cache; cache=$(mktemp -d "${TMPDIR:-/tmp}/bench-cache.XXXXXX")
  log "$label: $*"
  local start=$SECONDS rc=0
  TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton" \
    timeout --signal=TERM --kill-after=30 "$PER_RUN_TIMEOUT" "$@" || rc=$?
  rm -rf "$cache"
  if (( rc != 0 )); then
    failed+=("$label (exit $rc$([[ $rc == 124 ]] && echo ", timed out after ${PER_RUN_TIMEOUT}s"))")
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
  if [[ "$QUICK" != 1 ]]; then
    run "block eager bf16 params" "$PY" benchmarks/bench_block.py --param-dtype bfloat16 \
      --no-pieces --label eager-bf16-params "${pk[@]}" --out "$OUT" "${BLOCK_EXTRA[@]}"
    run "block compiled bf16 params" "$PY" benchmarks/bench_block.py --compile --param-dtype bfloat16 \
      --no-pieces --label compiled-bf16-params "${pk[@]}" --out "$OUT" "${BLOCK_EXTRA[@]}"
  fi
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
  train "compiled, plain logits loss" --training.loss_chunk_size=0  # before the fused loss
  if [[ "$QUICK" != 1 ]]; then
    train "compiled + selective AC" --activation_checkpoint.mode=selective
    train "compiled + full AC" --activation_checkpoint.mode=full
  fi
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
(( ${#groups[@]} )) || groups=(peak block train table)
log "results: $OUT; groups: ${groups[*]}; $("$PY" -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")')"
for g in "${groups[@]}"; do
  case "$g" in
    peak|block|train|table) "group_$g" ;;
    *) echo "run_all.sh: unknown group '$g' (peak, block, train, table)" >&2; exit 2 ;;
  esac
done
if (( ${#failed[@]} )); then
  log "FAILED: ${failed[*]}"
  exit 1
fi
log "all done"
