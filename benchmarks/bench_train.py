"""Training-step throughput of a config: tokens/s, TFLOP/s and MFU per device, peak memory,
first-step (compile) time. One JSON line per run.

    python benchmarks/bench_train.py --config benchmarks/configs/20b_2layer_seq4096.toml \
        --warmup 3 --steps 10 --measure-peak --out benchmarks/results/$(date +%F).jsonl \
        [--label NAME] [--section.key=value ...]
    torchrun --nproc-per-node 8 benchmarks/bench_train.py --config ... (rank 0 writes)
    # CPU smoke run:
    python benchmarks/bench_train.py --config configs/debugmodel.toml --model.flavor=tiny \
        --training.seq_len=32 --training.local_batch_size=2 --warmup 0 --steps 2

What is timed
-------------
A step is exactly what `Trainer.run` does per step, minus logging/checkpointing:
`Trainer.optimizer_step` (forward, loss, backward, grad-norm clip -- it syncs the host twice,
for the loss and the norm -- optimizer, lr scheduler, expert-bias update). Batches
are drawn from the config's data loader BEFORE timing (their cost is reported separately as
`data_ms_per_step`), so tokens/s is the device's, not the tokenizer's.
- first step: its own wall time (includes torch.compile and flex-attention compilation;
  run with a fresh TORCHINDUCTOR_CACHE_DIR for a cold-cache number, as run_all.sh does).
- then `--warmup` untimed steps, then `--steps` timed ones: `torch.cuda.synchronize()`
  before and after each, wall clock; with several ranks the per-step maximum over ranks.
- tokens/s = global tokens per step / median step time; per device = / world size.
- TFLOP/s per device = tokens/s per device x `training_flops_per_token` (matmul FLOPs incl.
  sliding window and causal mask, runtime/train/metrics.py). Recomputation by activation
  checkpointing is NOT counted (model FLOPs, not hardware FLOPs), so MFU stays comparable.
- MFU = that / the peak: measured now (`--measure-peak`: 8192^3 bf16 matmul median, as
  ../shared/perf/roofline.py) or given (`--peak-tflops`), else null.
- peak memory: `torch.cuda.max_memory_allocated` over the whole run (max over ranks);
  on CPU the process' max RSS.
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
import torch.distributed as dist

from benchmarks.common import (
    add_peak_args,
    append_jsonl,
    env_info,
    median,
    peak_memory,
    resolve_peak,
    synchronize,
)

# The record of the latest run() in this process, also when run() exits 1 after recording an
# error (benchmarks/check_reference.py reads the numbers of a failed run from here).
LAST_RECORD: dict | None = None

# Applied before the user's overrides (which may change them): a benchmark saves nothing.
BENCH_DEFAULTS = ["--checkpoint.enable=false", "--metrics.enable_jsonl=false",
                  "--metrics.enable_tensorboard=false"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_train.py", allow_abbrev=False,
        description="Time training steps of a TOML config (+ --section.key=value overrides).",
        epilog="Any other --section.key=value argument is a config override.")
    p.add_argument("--config", required=True, metavar="FILE", help="TOML job config")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="append one JSON line here")
    p.add_argument("--label", default=None, help="variant name for the results table")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, run --profile-steps more steps under torch.profiler: "
                        "DIR/trace-rank<N>.json (chrome://tracing, Perfetto) + top ops printed")
    p.add_argument("--profile-steps", type=int, default=2)
    add_peak_args(p)
    return p


def parse(argv: list[str] | None):
    parser = build_parser()
    # The leftovers are config overrides; load_config rejects anything else in one line.
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args, overrides


def one_step(trainer, batch: dict) -> tuple[float, float]:
    """One optimizer step exactly as Trainer.run performs it (without logging/checkpointing)."""
    trainer.step += 1
    loss, grad_norm, _ = trainer.optimizer_step(batch)
    return loss, grad_norm


def profile_steps_(trainer, batches: list[dict], folder: str, device: torch.device) -> str:
    """A few more steps under torch.profiler (CPU + CUDA activity, shapes): a chrome trace
    per rank and the top ops by device time on rank 0. Not part of the timed numbers."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    Path(folder).mkdir(parents=True, exist_ok=True)
    synchronize(device)
    with profile(activities=activities, record_shapes=True) as prof:
        for batch in batches:
            one_step(trainer, batch)
        synchronize(device)
    trace = str(Path(folder) / f"trace-rank{trainer.rank}.json")
    prof.export_chrome_trace(trace)
    if trainer.rank == 0:
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)
        except (KeyError, AttributeError, RuntimeError):  # column names differ across versions
            print(prof.key_averages().table(row_limit=25), flush=True)
    return trace


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def run(argv: list[str] | None = None) -> dict:
    """Build, time, and return the record (also appended to --out on rank 0)."""
    args, overrides = parse(argv)
    from runtime.train.config.loader import load_config
    from runtime.train.metrics import training_flops_per_token
    from runtime.train.trainer import Trainer

    profile_steps = args.profile_steps if args.profile else 0
    total_steps = 1 + args.warmup + args.steps + profile_steps
    cfg = load_config(args.config, BENCH_DEFAULTS + [f"--training.steps={total_steps}"] + overrides)

    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    build_s = time.perf_counter() - t0
    device = trainer.device
    rank0 = trainer.rank == 0

    from runtime.model.model import resolve_compute_dtype

    # The peak is measured in the dtype the model computes in (bf16 on CUDA by default).
    peak = resolve_peak(args, device, resolve_compute_dtype(cfg.model.compute_dtype, device))
    seq_len = cfg.training.seq_len
    tokens_per_step = trainer.global_batch * seq_len
    flops_per_token = training_flops_per_token(trainer.model_args, seq_len)
    record: dict = {
        "kind": "train",
        "label": args.label,
        **env_info(device),
        "config": args.config,
        "overrides": overrides,
        "world_size": trainer.world_size,
        "mesh": trainer.dims.describe(),
        "flavor": cfg.model.flavor,
        "n_layers": trainer.model_args.n_layers,
        "vocab_size": trainer.model_args.vocab_size,
        "seq_len": seq_len,
        "local_batch_size": cfg.training.local_batch_size,
        "global_batch_size": trainer.global_batch,
        "grad_accum": trainer.grad_accum,
        "tokens_per_step": tokens_per_step,
        "compile": cfg.compile.enable,
        "activation_checkpoint": cfg.activation_checkpoint.mode,
        "attn_backend": cfg.model.attn_backend,
        "compute_dtype": str(resolve_compute_dtype(cfg.model.compute_dtype, device)).replace("torch.", ""),
        "optimizer": type(trainer.optimizer).__name__,
        "optimizer_fused": bool(trainer.optimizer.defaults.get("fused")),
        "n_params": sum(p.numel() for p in trainer.model.parameters()),
        "flops_per_token": flops_per_token,
        "warmup": args.warmup,
        "steps": args.steps,
        "build_s": build_s,
        **peak,
    }

    t0 = time.perf_counter()
    data = iter(trainer.dataloader)
    batches = [next(data) for _ in range(total_steps)]
    record["data_ms_per_step"] = (time.perf_counter() - t0) / total_steps * 1e3

    losses: list[float] = []
    times: list[float] = []
    error = None
    first_step_s = None
    try:
        synchronize(device)
        t0 = time.perf_counter()
        losses.append(one_step(trainer, batches[0])[0])
        synchronize(device)
        first_step_s = time.perf_counter() - t0
        for i in range(args.warmup):
            losses.append(one_step(trainer, batches[1 + i])[0])
        for i in range(args.steps):
            synchronize(device)
            t0 = time.perf_counter()
            losses.append(one_step(trainer, batches[1 + args.warmup + i])[0])
            synchronize(device)
            times.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - an OOM or a compile failure is a row too; exit 1
        kind = "OOM" if _is_oom(exc) else type(exc).__name__
        error = f"{kind}: {' '.join(str(exc).split())[:300]}"
        traceback.print_exc()

    if args.profile and error is None:
        record["profile_trace"] = profile_steps_(
            trainer, batches[total_steps - profile_steps:], args.profile, device)

    mem = peak_memory(device)
    if trainer.world_size > 1 and mem["peak_memory_gib"] is not None and error is None:
        mem["peak_memory_gib"] = _max_over_ranks([mem["peak_memory_gib"]], device)[0]
    if error is None:
        times = _max_over_ranks(times, device)
    record.update(mem)
    record["first_step_s"] = first_step_s
    record["step_times_s"] = times
    record["losses"] = losses
    record["error"] = error
    if times:
        step_s = median(times)
        tps = tokens_per_step / step_s
        per_dev = tps / trainer.world_size
        tflops = per_dev * flops_per_token / 1e12
        record.update({
            "median_step_s": step_s,
            "tokens_per_s": tps,
            "tokens_per_s_per_device": per_dev,
            "tflops_per_device": tflops,
            "mfu": tflops / peak["peak_tflops"] if peak["peak_tflops"] else None,
        })
    else:
        record.update({"median_step_s": None, "tokens_per_s": None,
                       "tokens_per_s_per_device": None, "tflops_per_device": None, "mfu": None})

    global LAST_RECORD
    LAST_RECORD = record
    if rank0:
        append_jsonl(args.out, record)
        print(summary(record), flush=True)
    if error is not None:
        raise SystemExit(1)
    return record


def summary(r: dict) -> str:
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)
    mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    tps, per_dev = fmt(r["tokens_per_s"], ",.0f"), fmt(r["tokens_per_s_per_device"], ",.0f")
    lines = [
        f"bench_train {r.get('label') or ''} {r['config']} {' '.join(r['overrides'])}".rstrip(),
        (f"  {r['gpu'] or r['device']} | torch {r['torch']} | world {r['world_size']} | "
         f"{r['tokens_per_step']} tokens/step"),
        (f"  tokens/s {tps} (per device {per_dev}) | "
         f"TFLOP/s/dev {fmt(r['tflops_per_device'], '.1f')} | MFU {mfu} "
         f"(peak {fmt(r['peak_tflops'], '.0f')} TF/s: {r['peak_source'] or 'none'})"),
        (f"  peak mem {fmt(r['peak_memory_gib'], '.2f')} GiB ({r['memory_kind']}) | "
         f"first step {fmt(r['first_step_s'], '.2f')} s | median step {fmt(r['median_step_s'], '.4f')} s | "
         f"build {r['build_s']:.1f} s"),
    ]
    if r.get("error"):
        lines.append(f"  ERROR {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from runtime.errors import ConfigError

    try:
        run(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
