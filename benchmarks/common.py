"""Shared pieces of the benchmark scripts: timing with proper CUDA synchronisation, the
measured dense-matmul peak (the way ../shared/perf/roofline.py measures it), environment
facts for every record, and the JSONL writer.

Nothing here invents a number: a value that was not measured (or given on the command line)
is written as null.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def ensure_repo_on_path() -> None:
    """`import runtime` / `import benchmarks` from a checkout that is not pip-installed."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' = bfloat16 on CUDA, float32 elsewhere (the model's compute_dtype rule)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise SystemExit(f"error: unknown dtype {name!r} (one of auto, {', '.join(DTYPES)})") from None


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, iters: int = 20,
            warmup: int = 5) -> list[float]:
    """Per-call milliseconds of `fn` after `warmup` untimed calls.

    CUDA: a start/end event pair around each call and a synchronize after it (as
    roofline.py does), so each sample is the GPU time of that call. CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        for _ in range(iters):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _matmul(n: int, dtype: torch.dtype, device: torch.device) -> Callable[[], torch.Tensor]:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return lambda: a @ b


def measure_matmul_peak(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                        iters: int = 20, warmup: int = 5) -> dict:
    """Dense n x n x n matmul throughput, median of `iters` (roofline.py's method: 8192^3 bf16).
    Returns {"peak_tflops", "peak_ms", "peak_shape", "peak_dtype"}."""
    ms = median(time_ms(_matmul(n, dtype, device), device, iters=iters, warmup=warmup))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"peak_tflops": 2 * n ** 3 / (ms * 1e-3) / 1e12, "peak_ms": ms,
            "peak_shape": f"{n}^3", "peak_dtype": str(dtype).replace("torch.", "")}


def resolve_peak(args, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The peak used for MFU: --peak-tflops X (given), --measure-peak (measured now), or none."""
    if getattr(args, "peak_tflops", None) is not None:
        return {"peak_tflops": float(args.peak_tflops),
                "peak_source": getattr(args, "peak_source", None) or "given (--peak-tflops)"}
    if getattr(args, "measure_peak", False):
        peak = measure_matmul_peak(device, n=args.peak_size, dtype=dtype)
        peak["peak_source"] = f"measured: {peak['peak_shape']} {peak['peak_dtype']} matmul, median"
        return peak
    return {"peak_tflops": None, "peak_source": None}


def add_peak_args(parser) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--peak-tflops", type=float, default=None, metavar="X",
                   help="dense bf16 peak per device for MFU (e.g. from measure_peak.py)")
    g.add_argument("--measure-peak", action="store_true",
                   help="measure the peak now: a --peak-size^3 matmul in the compute dtype")
    parser.add_argument("--peak-size", type=int, default=8192, help="matmul size for --measure-peak")
    parser.add_argument("--peak-source", default=None,
                        help="free text recorded with --peak-tflops (e.g. 'measured 8192^3 bf16')")


def peak_memory(device: torch.device) -> dict:
    """CUDA: max_memory_allocated/reserved since the last reset. CPU: the process' max RSS
    (ru_maxrss, KiB on Linux): it includes Python, torch and the data loader."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
                "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30,
                "memory_kind": "cuda max_memory_allocated"}
    return {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "peak_memory_reserved_gib": None, "memory_kind": "cpu max RSS (whole process)"}


@functools.cache
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def env_info(device: torch.device) -> dict:
    """Facts that make a number reproducible: when, where, with what."""
    cuda = device.type == "cuda"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_count_visible": torch.cuda.device_count() if cuda else 0,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git": _git_commit(),
        "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }


def append_jsonl(path: str | os.PathLike | None, record: dict) -> None:
    """One line, appended with a single write() on an O_APPEND descriptor, so processes writing
    to the same file at once (gpu_check's concurrent steps) never interleave within a line."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def check_record(part: str, check: str, passed: bool, device: torch.device, **numbers) -> dict:
    """One gpu_check record (benchmarks/gpu_check.py): which part and check, whether it passed,
    where and when it ran, and its numbers (tolerances, observed errors, timings)."""
    env = env_info(device)
    return {"kind": "gpu_check", "part": part, "check": check, "passed": bool(passed),
            "gpu": env["gpu"], "torch": env["torch"], "date": env["date"], "device": env["device"],
            "git": env["git"], **numbers}


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (inf when got has a NaN/inf: never a pass)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def max_abs_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).abs().max()) if got.numel() else 0.0
