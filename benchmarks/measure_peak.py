"""The dense-matmul ceiling MFU is quoted against: an n x n x n matmul (default 8192^3 bf16),
median of 20 timed calls after 5 warm-up calls, CUDA-event timed (as
../shared/perf/roofline.py measures it).

    python benchmarks/measure_peak.py [--size 8192] [--dtype bfloat16] [--out results.jsonl]
    PEAK=$(python benchmarks/measure_peak.py --quiet)      # just the TFLOP/s number
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    append_jsonl,
    env_info,
    measure_matmul_peak,
    pick_device,
    resolve_dtype,
)


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="measure_peak.py", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, metavar="FILE.jsonl")
    p.add_argument("--label", default=None)
    p.add_argument("--quiet", action="store_true", help="print only the TFLOP/s value")
    a = p.parse_args(argv)
    device = pick_device(a.device)
    peak = measure_matmul_peak(device, n=a.size, dtype=resolve_dtype(a.dtype, device),
                               iters=a.iters, warmup=a.warmup)
    record = {"kind": "peak", "label": a.label, **env_info(device), **peak,
              "peak_source": f"measured: {peak['peak_shape']} {peak['peak_dtype']} matmul, median"}
    append_jsonl(a.out, record)
    if a.quiet:
        print(f"{peak['peak_tflops']:.6g}")
    else:
        print(f"{record['gpu'] or device}: {peak['peak_shape']} {peak['peak_dtype']} matmul "
              f"{peak['peak_ms']:.3f} ms = {peak['peak_tflops']:.1f} TFLOP/s")
    return record


if __name__ == "__main__":
    run()
