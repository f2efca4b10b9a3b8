"""gpu_check part 4: bench_block.py's numbers -- one compiled 20b block at 16k tokens (batch 4 x
seq 4096), sliding vs full, forward+backward ms, TFLOP/s and % of the matmul peak measured in
the same process, and the flex attention core alone for sliding vs full.

    python benchmarks/check_block.py --out results.jsonl [bench_block options]
    python benchmarks/check_block.py --smoke --out ...     # tiny block, math attention, CPU

One gpu_check record (part "block"); bench_block's own records stay in its scratch output.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import append_jsonl, check_record

PART = "block"
GPU = ["--compile", "--measure-peak", "--pieces", "attention-core", "--iters", "10", "--warmup", "3"]
SMOKE = ["--flavor", "tiny", "--tokens", "64", "--device", "cpu", "--attn-backend", "math",
         "--pieces", "attention-core", "--iters", "2", "--warmup", "1", "--measure-peak", "--peak-size", "64"]


def summarize(records: list[dict]) -> dict:
    """Per variant: the block's and the attention core's ms / TF/s / % of peak."""
    out: dict = {}
    for r in records:
        if r.get("kind") == "block":
            key = f"block_{r['variant']}"
        elif r.get("kind") == "block_piece" and r.get("piece", "").startswith("attention core"):
            key = f"attention_core_{r['variant']}"
        else:
            continue
        out[key] = {k: r.get(k) for k in ("ms", "tflops", "pct_of_peak", "first_call_s", "peak_memory_gib",
                                           "block_mask_sparsity_pct", "error") if k in r}
    first = records[0] if records else {}
    out.update({k: first.get(k) for k in ("flavor", "tokens", "batch", "seq_len", "dtype", "param_dtype",
                                          "compile", "attn_backend", "peak_tflops", "peak_source")})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="check_block.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, metavar="FILE.jsonl")
    p.add_argument("--smoke", action="store_true", help="tiny block on the CPU")
    a, extra = p.parse_known_args(argv)
    from benchmarks import bench_block

    device = torch.device("cpu" if a.smoke else "cuda")
    t0 = time.perf_counter()
    numbers: dict = {}
    records: list[dict] = []
    try:
        records = bench_block.run((SMOKE if a.smoke else GPU) + extra + ["--label", "gpu_check block"])
        numbers = summarize(records)
    except Exception as exc:  # noqa: BLE001 - recorded as a failed part
        traceback.print_exc()
        numbers["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
    errors = [r["error"] for r in records if r.get("error")]
    passed = bool(records) and not errors and "error" not in numbers
    if errors:
        numbers["errors"] = errors
    rec = check_record(PART, "block sliding vs full", passed, device,
                       seconds=round(time.perf_counter() - t0, 3), **numbers)
    append_jsonl(a.out, rec)

    def show(key):
        v = rec.get(key) or {}
        pct = "n/a" if v.get("pct_of_peak") is None else f"{v['pct_of_peak']:.1f}%"
        return f"{key} {v.get('ms') or float('nan'):.3f} ms ({pct} of peak)"
    print(f"[block] {'ok' if passed else 'FAILED'}: " + " | ".join(
        show(k) for k in ("block_sliding", "block_full", "attention_core_sliding", "attention_core_full")),
        flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
