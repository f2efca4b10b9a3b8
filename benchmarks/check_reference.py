"""gpu_check part 2: the reference training config as shipped -- median tokens/s over the timed
steps, first-step time, peak allocated/reserved memory -- with runtime.plan's per-rank memory
estimate for the same config beside the measured peak (the planner's first validation) and,
with --dry-run, the CUDA dry run's prediction (check_dry_run.py: traced peak and FLOPs per step)
beside the measured peak and the MFU formula's FLOPs (the dry run's first validation).

    python benchmarks/check_reference.py --out results.jsonl [--steps 5] [bench_train options]
    python benchmarks/check_reference.py --smoke --out ...      # the tiny debug model on the CPU
    python benchmarks/check_reference.py --dry-run dry_run.jsonl --out ...

One gpu_check record (part "reference") holding bench_train.py's numbers, the plan's lines and
the dry run's numbers (the dry run's own record is copied into --out just before it).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import REPO, append_jsonl, check_record, read_jsonl

PART = "reference"
CONFIG = "benchmarks/configs/20b_2layer_seq4096.toml"
SMOKE = ["--config", "configs/debugmodel.toml", "--model.flavor=tiny", "--training.seq_len=32",
         "--training.local_batch_size=2", "--training.device=cpu", "--measure-peak", "--peak-size", "64"]
KEEP = ("tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu", "peak_tflops",
        "peak_source", "first_step_s", "median_step_s", "step_times_s", "losses", "peak_memory_gib",
        "peak_memory_reserved_gib", "memory_kind", "build_s", "data_ms_per_step", "tokens_per_step",
        "n_params", "compile", "activation_checkpoint", "attn_backend", "compute_dtype",
        "optimizer_fused", "flops_per_token", "config", "overrides", "error")


def plan_estimate(config: str, overrides: list[str], gpu_gib: float | None) -> dict:
    """runtime.plan's per-rank estimate for the same config on one rank (its own fake process
    group: run before anything initialises a real one)."""
    from runtime.plan import GIB, plan_job
    from runtime.train.config.loader import load_config

    cfg = load_config(str(REPO / config), [o for o in overrides if o.startswith("--") and "=" in o])
    plan = plan_job(cfg, 1, gpu_gib or 80.0, config)
    return {"plan_total_gib": plan.total_bytes / GIB, "plan_fits": plan.fits, "plan_gpu_gib": plan.gpu_gib,
            "plan_lines_gib": {line.label: line.bytes / GIB for line in plan.lines}}


def dry_run_beside(path: str | None, out: str | None, measured: float | None, numbers: dict) -> dict:
    """The dry run's prediction (check_dry_run.py's record in `path`) beside the measured numbers:
    its traced peak over the measured allocated peak, its traced FLOPs per step over the MFU
    formula's. The dry run's record is copied into `out` (one file holds the whole part)."""
    if not path or not Path(path).exists():
        return {}
    rows = [r for r in read_jsonl(path) if r.get("check") == "dry run"]
    if not rows:
        return {}
    dry = rows[-1]
    append_jsonl(out, dry)
    peak, flops = dry.get("dry_run_peak_gib"), dry.get("dry_run_flops_per_step")
    formula = (numbers["flops_per_token"] * numbers["tokens_per_step"]
               if numbers.get("flops_per_token") and numbers.get("tokens_per_step") else None)
    return {"dry_run_peak_gib": peak, "dry_run_plan_gib": dry.get("dry_run_plan_gib"),
            "dry_run_flops_per_step": flops,
            "dry_run_over_measured": peak / measured if peak and measured else None,
            "dry_run_flops_over_formula": flops / formula if flops and formula else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="check_reference.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, metavar="FILE.jsonl")
    p.add_argument("--smoke", action="store_true", help="the tiny debug model on the CPU")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported; >= 5 on a GPU)")
    p.add_argument("--dry-run", default=None, metavar="FILE.jsonl",
                   help="check_dry_run.py's record for this config: its prediction goes beside the measurement")
    a, bench_args = p.parse_known_args(argv)
    bench_args = (SMOKE if a.smoke else ["--config", CONFIG, "--measure-peak"]) + bench_args
    config = bench_args[bench_args.index("--config") + 1]
    overrides = [x for x in bench_args if x.startswith("--") and "=" in x]
    device = torch.device("cpu" if a.smoke else "cuda")
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if device.type == "cuda" else None

    t0 = time.perf_counter()
    numbers: dict = {}
    try:
        numbers.update(plan_estimate(config, overrides, gpu_gib))
    except Exception as exc:  # noqa: BLE001 - the measurement still runs without an estimate
        traceback.print_exc()
        numbers["plan_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    from benchmarks import bench_train

    record = None
    dump = tempfile.mkdtemp(prefix="gpu-check-reference-")  # the trainer's dump folder: nothing kept
    try:
        record = bench_train.run(bench_args + ["--warmup", str(a.warmup), "--steps", str(a.steps),
                                               "--label", "gpu_check reference", f"--job.dump_folder={dump}"])
    except SystemExit:  # bench_train recorded an error (OOM, compile) and printed it
        pass
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        numbers["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    shutil.rmtree(dump, ignore_errors=True)
    if record is None and bench_train.LAST_RECORD is not None:
        record = bench_train.LAST_RECORD
    if record is not None:
        numbers.update({k: record.get(k) for k in KEEP})
    measured = numbers.get("peak_memory_gib") if device.type == "cuda" else None
    if measured and numbers.get("plan_total_gib"):
        numbers["plan_over_measured"] = numbers["plan_total_gib"] / measured
    numbers.update(dry_run_beside(a.dry_run, a.out, measured, numbers))
    passed = record is not None and not record.get("error") and not numbers.get("error")
    rec = check_record(PART, "reference config", passed, device, seconds=round(time.perf_counter() - t0, 3),
                       **numbers)
    append_jsonl(a.out, rec)
    fmt = (lambda v, f: "n/a" if v is None else format(v, f))
    print(f"[reference] {'ok' if passed else 'FAILED'}: tokens/s {fmt(rec.get('tokens_per_s'), ',.0f')} | "
          f"first step {fmt(rec.get('first_step_s'), '.1f')} s | peak {fmt(rec.get('peak_memory_gib'), '.2f')} GiB "
          f"allocated, {fmt(rec.get('peak_memory_reserved_gib'), '.2f')} reserved | plan "
          f"{fmt(rec.get('plan_total_gib'), '.2f')} GiB | dry run {fmt(rec.get('dry_run_peak_gib'), '.2f')} GiB "
          f"| {rec.get('error') or ''}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
