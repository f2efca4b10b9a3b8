"""Check a config's parallelism and estimate per-GPU memory before queueing a job.

    python -m runtime.plan --config configs/gptoss_120b.toml --world-size 128 [--a.b=c ...]
    python -m runtime.plan --config configs/gptoss_20b.toml --world-size 16 --check-only
    python -m runtime.plan --config configs/gptoss_20b.toml --world-size 16 --gpu-memory-gib 141

--check-only validates the config and the mesh (`validate_job`: degrees x world size, every
divisibility) without importing torch and prints one `ok: ...` line; the Slurm templates and
submit.py run it before starting anything. Without it the real parallel plan is applied:
the model is built on the meta device under a fake process group of the requested world size
and sharded exactly as the trainer would (runtime/train/memory_plan.py, which also documents
the memory model and owns it: the trainer refuses a run that does not fit with the same
estimate).

Exit codes: 0 valid (and it fits), 2 invalid config or mesh (`error: <one line naming the
keys>`; nothing else is done), 1 valid but the estimate exceeds --gpu-memory-gib
(`error: does not fit: ...`, the largest parts named). With --trace (the CUDA dry run,
runtime/dry_run.py): 3 the traced step failed (`error: dry run failed in <module>: ...`),
4 the traced peak exceeds the plan by more than 5% (`error: dry run: the traced peak ...`).
"""

from __future__ import annotations

import argparse
import math
import sys

from runtime import fake_cuda
from runtime.errors import EXIT_OK, ConfigError, one_line, report_config_error
from runtime.parallel.dims import ParallelDims
from runtime.train.config.job import validate_job
from runtime.train.config.loader import build_parser, parse_args
from runtime.train.config.schema import JobConfig
from runtime.train.memory_plan import (DEFAULT_GPU_MEMORY_GIB, GIB, MemoryPlan,
                                       available_memory, does_not_fit,
                                       fsdp_param_dtype_name, plan_job,
                                       target_compute_dtype_name)

EXIT_DOES_NOT_FIT = 1  # valid config and mesh, but the estimate exceeds --gpu-memory-gib
EXIT_TRACE_FAILED = 3  # --trace: the traced training step failed (a bug: the line names where)
EXIT_PLAN_UNDERESTIMATES = 4  # --trace: the traced peak exceeds the plan by > PLAN_TOLERANCE
# How far the traced peak may exceed the plan (modelled part, without the reserve): refusals
# and queueing decisions rely on the plan not underestimating.
PLAN_TOLERANCE = 0.05

# --------------------------------------------------------------------------- output

def _gib(b: float) -> str:
    return f"{b / GIB:7.2f} GiB"


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _mesh_lines(dims: ParallelDims) -> list[str]:
    names, sizes = dims.mesh_shape()
    out = ["mesh (outer -> inner): " + " x ".join(f"{n} {s}" for n, s in zip(names, sizes))
           + f" = {_ranks(dims.world_size)}"]
    size = dict(zip(names, sizes))
    for flat, parts in dims.flattened_dims().items():
        out.append(f"  {flat:<12} {math.prod(size[x] for x in parts):>5} = {' x '.join(parts)}")
    out.append(f"  degrees      {dims.describe().split(': ', 1)[1]}")
    return out


def format_plan(plan: MemoryPlan, cfg: JobConfig) -> str:
    d, a, args = plan.dims, plan.applied, plan.model_args
    ac = cfg.activation_checkpoint
    lines = [
        (f"plan: {plan.config} on {_ranks(plan.world_size)}: model {cfg.model.flavor} "
         f"({args.n_layers} layers, {_count(plan.total_params)} parameters, "
         f"{_count(plan.active_params)} active per token)"),
        *_mesh_lines(d),
        (f"batch: {plan.global_batch} sequences x {cfg.training.seq_len} tokens per step = "
         f"local {cfg.training.local_batch_size} x dp {d.dp} x accumulation {plan.grad_accum}"),
        f"parallelize(): applied on mesh {a.mesh}: "
        + ", ".join(filter(None, [
            ("FSDP" if d.dp_replicate == 1 else "HSDP" if d.dp_shard * d.cp > 1 else "DDP")
            + f" (reshard after forward: {cfg.parallelism.fsdp_reshard_after_forward})"
            if a.fsdp else "no data parallelism",
            f"AC {ac.mode}" + (f" ({ac.selective_ac_option})" if ac.mode == "selective" else "")
            if ac.mode != "none" else "",
            "per-block compile" if cfg.compile.enable and "model" in cfg.compile.components else "",
            (f"params {fsdp_param_dtype_name(cfg)} / reduce "
             f"{cfg.training.mixed_precision_reduce}, " if a.fsdp else "")
            + f"compute {target_compute_dtype_name(cfg)}"])),
    ]
    lines.append("sharding: measured from the sharded parameters (rank 0)")
    if d.pp > 1:
        lines.append(f"pipeline: {cfg.parallelism.pipeline_parallel_schedule}, stages cut as the "
                     "trainer cuts them; each pipeline rank keeps its stages' layers of the "
                     "sharded model (the worst rank is shown)")
    lines.append("buffers and activations: first-order formulas "
                 "(documented in runtime/train/memory_plan.py)")
    lines.append(f"per rank [{plan.rank}]: {_count(plan.rank_params)} parameters "
                 f"(dense {_count(plan.rank_dense)}, experts {_count(plan.rank_experts)})")
    if plan.total_trainable < plan.total_params:
        spec = cfg.lora_spec()
        lines.append(f"LoRA rank {spec.rank} on {', '.join(sorted(spec.targets))} in "
                     f"{len(spec.layers)} layers: trainable {_count(plan.total_trainable)} of "
                     f"{_count(plan.total_params)} "
                     f"({100 * plan.total_trainable / plan.total_params:.2f}%), "
                     f"{_count(plan.rank_trainable)} on this rank; frozen base in "
                     f"{target_compute_dtype_name(cfg)} (no grads, no optimizer state)")
    peak = plan.peak_line
    resident = [x for x in plan.lines if not x.alternative and x.label != "reserve"]
    for line in resident:
        lines.append(f"  {line.label:<14}{_gib(line.bytes)}   {line.note}")
    if peak is not None:
        lines.append("  + the largest (*) of the step's transient peaks (they do not coincide):")
        for line in (x for x in plan.lines if x.alternative):
            mark = "*" if line is peak else " "
            lines.append(f"  {line.label:<14}{_gib(line.bytes)} {mark} {line.note}")
    for line in (x for x in plan.lines if x.label == "reserve"):
        lines.append(f"  {line.label:<14}{_gib(line.bytes)}   {line.note}")
    total = plan.total_bytes
    verdict = "fits" if does_not_fit(plan, cfg) is None else "DOES NOT FIT"
    lines.append(f"  {'total':<14}{_gib(total)}   of {plan.gpu_gib:.4g} GiB {plan.limit_note}: "
                 f"{verdict} ({100 * total / (plan.gpu_gib * GIB):.0f}%)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point
def build_arg_parser() -> argparse.ArgumentParser:
    parser = build_parser("python -m runtime.plan")
    parser.usage = ("%(prog)s --config FILE --world-size N [--check-only] [--gpu-memory-gib G] "
                    "[--section.key=value ...]")
    parser.description = __doc__.split("\n\n", 1)[0]
    parser.add_argument("--world-size", type=int, required=True, metavar="N",
                        help="number of ranks (GPUs) of the job")
    parser.add_argument("--check-only", action="store_true",
                        help="only validate the config and mesh (no torch import); exit 0 or 2")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        metavar="G",
                        help=f"memory per GPU (default {DEFAULT_GPU_MEMORY_GIB:g}: H100; with "
                             "training.device=cpu: this machine's available memory / ranks, as "
                             "the trainer's check)")
    trace = parser.add_argument_group("dry run (runtime/dry_run.py)")
    trace.add_argument("--trace", action="store_true",
                       help="also run the real training step of one rank on fake CUDA tensors "
                            "and compare its memory peak with the plan")
    trace.add_argument("--steps", type=int, default=2, metavar="S",
                       help="traced optimizer steps (default 2: the second has optimizer state)")
    trace.add_argument("--rank", type=int, default=None, metavar="R",
                       help="the traced rank (default: the rank with the largest plan)")
    trace.add_argument("--imbalance", type=float, default=1.0, metavar="F",
                       help="routed rows of the busiest EP rank / the mean (default 1.0: "
                            "balanced)")
    return parser


def _check_trace_args(ns) -> None:
    if ns.steps < 1:
        raise ConfigError(f"command line: --steps must be >= 1, got {ns.steps}")
    if ns.rank is not None and not 0 <= ns.rank < ns.world_size:
        raise ConfigError(f"command line: --rank must be in [0, {ns.world_size}), got {ns.rank}")
    if not ns.imbalance >= 1.0:
        raise ConfigError(f"command line: --imbalance must be >= 1 (busiest / mean), "
                          f"got {ns.imbalance}")


def _traced_rank(plan: MemoryPlan) -> int:
    """The first rank of the worst pipeline rank's share (pp is the outermost mesh dim); rank 0
    without PP (FSDP gives it the ceil of every uneven shard)."""
    if plan.dims.pp == 1:
        return 0
    pp_rank = int(plan.rank.split()[2].rstrip(":"))
    return pp_rank * (plan.world_size // plan.dims.pp)


def run_trace(plan: MemoryPlan, cfg: JobConfig, *, steps: int = 2, rank: int | None = None,
              imbalance: float = 1.0, count_flops: bool = True) -> int:
    """The dry run of one rank; prints its report (last line: trace: peak, plan, ratio).
    Exit EXIT_TRACE_FAILED when the step fails, EXIT_PLAN_UNDERESTIMATES when the traced peak
    exceeds the plan by more than PLAN_TOLERANCE (refusals rely on the plan)."""
    from runtime.dry_run import DryRunError, format_trace, trace

    rank = _traced_rank(plan) if rank is None else rank
    try:
        result = trace(cfg, plan.dims, plan.model_args, rank=rank, steps=steps,
                       imbalance=imbalance, count_flops=count_flops)
    except DryRunError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_TRACE_FAILED
    modelled = plan.total_bytes - sum(x.bytes for x in plan.lines if x.label == "reserve")
    report = format_trace(result, modelled)
    if result.peak_bytes > modelled * (1 + PLAN_TOLERANCE):
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in
                          sorted(result.by_kind.items(), key=lambda kv: -kv[1]) if v)
        print(f"error: dry run: the traced peak {result.peak_bytes / GIB:.2f} GiB exceeds the "
              f"plan {modelled / GIB:.2f} GiB by more than {PLAN_TOLERANCE:.0%} (at the peak: "
              f"{parts} GiB): the step holds memory the plan (runtime/train/memory_plan.py) does not model",
              file=sys.stderr, flush=True)
        print("\n".join(report), flush=True)
        return EXIT_PLAN_UNDERESTIMATES
    print("\n".join(report), flush=True)
    return EXIT_OK


def _memory_limit(cfg: JobConfig, ns) -> tuple[float, str]:
    """(GiB per rank, what it is): --gpu-memory-gib, else for a CPU job this machine's share as
    the trainer's pre-flight check computes it, else an H100's."""
    if ns.gpu_memory_gib is not None:
        return ns.gpu_memory_gib, "per GPU"
    if cfg.training.device == "cpu":
        limit = available_memory("cpu", ranks_here=ns.world_size)
        if limit is not None:
            return limit
    return DEFAULT_GPU_MEMORY_GIB, "per GPU"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, ns = parse_args(argv, build_arg_parser())
        if ns.print_config:
            print(cfg.to_toml_str(), end="")
            return EXIT_OK
        if ns.gpu_memory_gib is not None and not ns.gpu_memory_gib > 0:
            raise ConfigError(f"command line: --gpu-memory-gib must be > 0, "
                              f"got {ns.gpu_memory_gib}")
        model_args = cfg.model_args()
        dims = validate_job(cfg, ns.world_size, model_args)
    except ConfigError as e:  # ParallelismError included
        return report_config_error(e)
    config_name = ns.config or "(defaults)"
    if ns.trace:
        try:
            _check_trace_args(ns)
            fake_cuda.install()  # before torch is imported (runtime/fake_cuda.py)
        except ConfigError as e:
            return report_config_error(e)
        except fake_cuda.FakeCudaError as e:
            print(f"error: dry run: {one_line(e)}", file=sys.stderr, flush=True)
            return EXIT_TRACE_FAILED
    if ns.check_only:
        print(f"ok: {config_name}: mesh valid for {_ranks(ns.world_size)}: "
              f"{dims.describe().split(': ', 1)[1]}",
              flush=True)
        return EXIT_OK
    limit = _memory_limit(cfg, ns)
    try:
        plan = plan_job(cfg, ns.world_size, limit[0], config_name, dims=dims,
                        model_args=model_args)
        plan.limit_note = limit[1]
    except ValueError as e:  # ConfigError, or a parallel pass refusing this model/mesh
        return report_config_error(e if isinstance(e, ConfigError) else f"parallel plan: {e}")
    print(format_plan(plan, cfg), flush=True)
    if ns.trace:
        return run_trace(plan, cfg, steps=ns.steps, rank=ns.rank, imbalance=ns.imbalance)
    reason = does_not_fit(plan, cfg)
    if reason:
        print(f"error: {reason}", file=sys.stderr, flush=True)
        return EXIT_DOES_NOT_FIT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
