"""gpu_check, part 2 (reference), first step: the CUDA dry run's prediction for the reference
config (`python -m runtime.plan --trace`: the real training step on fake CUDA tensors, eager),
so the first GPU session scores the dry run against what it measures. check_reference.py puts
these numbers beside its measured peak and FLOPs in its own record.

    python benchmarks/check_dry_run.py --out dry_run.jsonl [--smoke]

One record (part "reference", check "dry run"): the traced peak, the plan (without its
reserve), the traced FLOPs per step and the MFU formula's, the dry run's exit code. Exit 0 when
the dry run produced a prediction (exit 0, or 4: the traced peak exceeds the plan, recorded as
plan_underestimates), else 1. Runs on the CPU (fake tensors): side by side with the
correctness part on a GPU machine.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, append_jsonl, check_record

PART, CHECK = "reference", "dry run"
TRACE = re.compile(r"^trace: peak (\d+\.\d+) GiB, plan (\d+\.\d+) GiB, ratio (\d+\.\d+)$")
FLOPS = re.compile(r"flops: traced (\S+) per step on this rank, MFU formula (\S+), ratio")


def plan_args(bench_args: list[str]) -> list[str]:
    """The reference measurement's config and overrides, as runtime.plan takes them."""
    config = bench_args[bench_args.index("--config") + 1]
    return ["--config", config, *(x for x in bench_args if x.startswith("--") and "=" in x)]


def parse(stdout: str) -> dict:
    """The dry run's numbers from its report (None where a line is missing)."""
    numbers: dict = {"dry_run_peak_gib": None, "dry_run_plan_gib": None,
                     "dry_run_flops_per_step": None, "flops_formula_per_step": None}
    for line in stdout.splitlines():
        if m := TRACE.match(line.strip()):
            numbers["dry_run_peak_gib"], numbers["dry_run_plan_gib"] = float(m[1]), float(m[2])
        elif m := FLOPS.search(line):
            numbers["dry_run_flops_per_step"], numbers["flops_formula_per_step"] = float(m[1]), float(m[2])
        elif line.strip().startswith("at the peak:"):
            numbers["dry_run_at_peak"] = line.strip().removeprefix("at the peak:").strip()
    return numbers


def main(argv: list[str] | None = None) -> int:
    from benchmarks.check_reference import CONFIG, SMOKE

    p = argparse.ArgumentParser(prog="check_dry_run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, metavar="FILE.jsonl")
    p.add_argument("--smoke", action="store_true", help="the reference's tiny CPU smoke config")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S")
    a = p.parse_args(argv)
    args = plan_args(SMOKE if a.smoke else ["--config", CONFIG])
    cmd = [sys.executable, "-m", "runtime.plan", *args, "--world-size", "1", "--trace"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=a.timeout)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = None, exc.stdout or "", f"timed out after {a.timeout:g} s"
        out = out.decode() if isinstance(out, bytes) else out
    sys.stdout.write(out)
    sys.stderr.write(err if isinstance(err, str) else "")
    numbers = parse(out)
    errors = [line for line in (err or "").splitlines() if line.startswith("error:")]
    passed = code in (0, 4) and numbers["dry_run_peak_gib"] is not None
    import torch

    rec = check_record(PART, CHECK, passed, torch.device("cpu"), seconds=round(time.perf_counter() - t0, 3),
                       command=" ".join(cmd[1:]), dry_run_exit=code, plan_underestimates=code == 4,
                       eager=True, **numbers, **({"error": errors[-1][:300]} if errors else {}))
    append_jsonl(a.out, rec)
    fmt = (lambda v, f: "n/a" if v is None else format(v, f))
    print(f"[reference] dry run {'ok' if passed else 'FAILED'}: traced peak "
          f"{fmt(numbers['dry_run_peak_gib'], '.2f')} GiB, plan {fmt(numbers['dry_run_plan_gib'], '.2f')} GiB, "
          f"FLOPs/step {fmt(numbers['dry_run_flops_per_step'], '.4g')} | {errors[-1] if errors else ''}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
