"""Check a config's parallelism and estimate per-GPU memory before queueing a job.

    python -m runtime.plan --config configs/gptoss_120b.toml --world-size 128 [--a.b=c ...]
    python -m runtime.plan --config configs/gptoss_20b.toml --world-size 16 --check-only
    python -m runtime.plan --config configs/gptoss_20b.toml --world-size 16 --gpu-memory-gib 141

--check-only validates the config and the mesh (`validate_job`: degrees x world size, every
divisibility) without importing torch and prints one `ok: ...` line; the Slurm templates and
submit.py run it before starting anything. Without it the real parallel plan is applied:
the model is built on the meta device (no weight is allocated) under a fake process group of
the requested world size (`torch.testing._internal.distributed.fake_pg`: collectives are not
run, but every rank-dependent decision is made as on rank 0 of the real job), the device mesh
is built and `runtime.parallel.parallelize.parallelize` shards the model exactly as the
trainer would. What each rank then holds is read off the sharded parameters.

Exit codes: 0 valid (and it fits), 2 invalid config or mesh (`error: <one line naming the
keys>`; nothing else is done), 1 valid but the estimate exceeds --gpu-memory-gib
(`error: does not fit: ...`, the largest parts named).

Memory model (per rank; the worst rank under PP; GiB = 2^30 bytes)
------------------------------------------------------------------
params        fp32 master weights: the rank's shards (FSDP pads dim 0: rank 0 gets the ceil)
grads         fp32, same shards
optimizer     AdamW exp_avg + exp_avg_sq: 2 x fp32 per parameter
FSDP buffers  all-gathered (unsharded) parameters in the mixed-precision param dtype (bf16)
              for 2 transformer blocks (the running one + the prefetched next), plus the root
              unit (embeddings, final norm, output head: gathered for the whole step), plus
              one block's unsharded gradients in the reduce dtype (fp32) before reduce-scatter.
              "Unsharded" means after FSDP's all-gather only: tp / ep shards stay local.
activations   first order, bf16 compute (a = 2 bytes; 4 for fp32), per layer and token:
                none        a*(8*dim + 4*q + 3*kv + 6*k*F + 3*k*dim) + 4*(4*dim + 2*E)
                selective   a*(2*dim + q + 2*kv + 2*k*F + k*dim) + 4*E   (matmul outputs kept)
                full        a*dim                                         (block input only)
              q = n_heads*head_dim, kv = n_kv_heads*head_dim, F = moe_inter_dim, k = top_k,
              E = num_experts; dim-wide terms: the norms' inputs/outputs, residual sums, the
              attention and MoE outputs (+ fp32 copies inside RMSNorm); q/kv terms:
              projections, RoPE outputs, attention output (flex attention: no S x S scores);
              k*F terms: mlp1 output (2F), the clamped SwiGLU intermediates; k*dim: routed rows
              gathered, mlp2 output, weighted rows. Checkpointed layers add, during backward,
              one layer's full activations (the recompute). Totals x tokens per rank per
              micro-batch (local_batch_size x seq_len / cp), / tp (sequence parallel and head /
              expert sharding), x micro-batches in flight under PP (GPipe: all; others: pp).
              Routing is assumed balanced (EP: each rank gets its share of rows).
logits + loss tokens x vocab (/ tp with loss parallel) x (a bf16 logits + 4 fp32 upcast + 4
              saved log-softmax + 4 its gradient) bytes, on the rank holding the output head;
              with the fused loss (training.loss_chunk_size > 0, no TP/PP) one chunk of
              tokens instead of all of them, plus the fp32 gradients of the hidden states and
              of the head weight that the fused forward stores for backward.
reserve       2 GiB for the CUDA context, NCCL buffers and allocator fragmentation.
Not modelled: expert-load imbalance, temporary buffers of collectives, compile workspaces.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from runtime import fake_cuda
from runtime.errors import EXIT_CONFIG_ERROR, EXIT_OK, ConfigError, one_line, report_config_error
from runtime.model.args import ModelArgs
from runtime.parallel.dims import ParallelDims, pipeline_num_stages
from runtime.train.config import JobConfig, build_parser, parse_args, validate_job

EXIT_DOES_NOT_FIT = 1  # valid config and mesh, but the estimate exceeds --gpu-memory-gib
EXIT_TRACE_FAILED = 3  # --trace: the traced training step failed (a bug: the line names where)

DEFAULT_GPU_MEMORY_GIB = 80.0  # H100 80GB
RESERVE_GIB = 2.0
GIB = 2 ** 30

# Parameters that tensor parallelism splits (heads, vocabulary); experts are counted apart.
# The rest (norms, router, wo.bias) is replicated over tp.
_TP_SHARDED = ("attention.wq.", "attention.wk.", "attention.wv.", "attention.wo.weight",
               "attention.sinks", "tok_embeddings.", "output.")


def _is_expert(name: str) -> bool:
    return ".moe.experts." in f".{name}"


def _is_tp_sharded(name: str) -> bool:
    return any(f".{p}" in f".{name}" for p in _TP_SHARDED)


def _layer_of(name: str) -> int | None:
    if name.startswith("layers."):
        return int(name.split(".")[1])
    return None


# --------------------------------------------------------------------------- the applied plan

@dataclass
class RankShare:
    """Which parameters one pipeline rank holds (all of them without PP)."""

    label: str
    layers: list[int]
    first: bool  # holds the embeddings
    last: bool  # holds the final norm and output head

    def holds(self, name: str) -> bool:
        layer = _layer_of(name)
        if layer is not None:
            return layer in self.layers
        if name.startswith("tok_embeddings."):
            return self.first
        return self.last


@dataclass
class Applied:
    """What `parallelize` did on the fake mesh."""

    full_shapes: dict[str, tuple[int, ...]]  # every parameter's global shape
    local_numel: dict[str, int]  # rank 0's local elements per parameter as sharded
    fsdp: bool  # fully_shard was applied (all-gather buffers exist)
    mesh: str  # the device mesh parallelize() ran on
    shares: list[RankShare]  # each pipeline rank's part, cut as the trainer cuts stages


def apply_plan(cfg: JobConfig, dims: ParallelDims, model_args: ModelArgs) -> Applied:
    """Build the model on meta under a fake process group and apply `parallelize`."""
    # torch is imported here, not at the top: --check-only must stay torch-free (milliseconds
    # on a login node) and only the full plan needs it.
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    from runtime.model import GptOssModel
    from runtime.parallel.parallelize import parallelize
    from runtime.parallel.pipeline import stage_ids_this_rank, stage_layer_ids

    if dist.is_initialized():
        raise RuntimeError("runtime.plan needs its own process: a process group already exists")
    dist.init_process_group("fake", rank=0, world_size=dims.world_size, store=FakeStore())
    try:
        mesh = dims.build_mesh("cpu") if dims.world_size > 1 else None
        with torch.device("meta"):
            model = GptOssModel(model_args)
        # Plans are for the job's accelerator: "auto" means CUDA there (bf16 compute).
        device = torch.device("cpu" if cfg.training.device == "cpu" else "cuda")
        model = parallelize(model, dims, cfg, device)
        shares = [RankShare("every rank", list(range(model_args.n_layers)), True, True)]
        if dims.pp > 1:
            p = cfg.parallelism
            stages = pipeline_num_stages(dims.pp, p.pipeline_parallel_schedule,
                                         model_args.n_layers, p.pipeline_parallel_layers_per_stage)
            layers = stage_layer_ids(model_args.n_layers, stages,
                                     p.pipeline_parallel_layers_per_stage)
            owned = [stage_ids_this_rank(r, dims.pp, stages, p.pipeline_parallel_schedule)
                     for r in range(dims.pp)]
            shares = _pipeline_shares(layers, owned)
        return Applied(
            full_shapes={n: tuple(p.shape) for n, p in model.named_parameters()},
            local_numel={n: (p.to_local() if hasattr(p, "to_local") else p).numel()
                         for n, p in model.named_parameters()},
            fsdp=any(isinstance(m, FSDPModule) for m in model.modules()),
            mesh=_describe_mesh(mesh),
            shares=shares,
        )
    finally:
        dist.destroy_process_group()


def _pipeline_shares(stage_layers: list[list[int]],
                     owned: list[tuple[int, ...]]) -> list[RankShare]:
    """One RankShare per pipeline rank from the layers of each stage and each rank's stages."""
    last = len(stage_layers) - 1
    return [RankShare(f"pipeline rank {r}: stages {', '.join(map(str, own))}",
                      sorted(layer for s in own for layer in stage_layers[s]),
                      0 in own, last in own)
            for r, own in enumerate(owned)]


def _describe_mesh(mesh) -> str:
    if mesh is None:
        return "none (1 rank)"
    names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
    return " x ".join(f"{n} {s}" for n, s in zip(names, mesh.mesh.shape))


# --------------------------------------------------------------------------- per-rank accounting

def _expert_div(dims: ParallelDims) -> int:
    """How many ranks split one block's experts besides FSDP (ep x etp, or tp without EP)."""
    return dims.ep * dims.etp if dims.ep > 1 else dims.tp


@dataclass
class Line:
    label: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    config: str
    world_size: int
    dims: ParallelDims
    applied: Applied
    model_args: Any
    total_params: int
    active_params: int
    rank: str
    rank_params: int
    rank_dense: int
    rank_experts: int
    lines: list[Line]
    gpu_gib: float
    tokens_per_microbatch: int
    grad_accum: int
    global_batch: int
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return sum(line.bytes for line in self.lines)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu_gib * GIB


def _target_compute_dtype_name(cfg: JobConfig) -> str:
    """model.compute_dtype with "auto" resolved for the job's target device (CUDA unless
    training.device = "cpu"), as runtime.model.model.resolve_compute_dtype does there."""
    name = cfg.model.compute_dtype
    if name == "auto":
        name = "float32" if cfg.training.device == "cpu" else "bfloat16"
    return name


def _fsdp_param_dtype_name(cfg: JobConfig) -> str:
    # as runtime.parallel.data_parallel.mixed_precision_policy: fp32 compute keeps fp32 params
    if _target_compute_dtype_name(cfg) == "float32":
        return "float32"
    return cfg.training.mixed_precision_param


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def _activation_bytes_per_token(args, a: int) -> dict[str, float]:
    D, F, k, E = args.dim, args.moe_inter_dim, args.top_k, args.num_experts
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return {
        "none": a * (8 * D + 4 * q + 3 * kv + 6 * k * F + 3 * k * D) + 4 * (4 * D + 2 * E),
        "op": a * (2 * D + q + 2 * kv + 2 * k * F + k * D) + 4 * E,
        "full": a * D,
    }


def _layer_modes(cfg: JobConfig, n_layers: int) -> list[str]:
    ac = cfg.activation_checkpoint
    if ac.mode == "none":
        return ["none"] * n_layers
    if ac.mode == "full":
        return ["full"] * n_layers
    if ac.selective_ac_option == "op":
        return ["op"] * n_layers
    every = int(ac.selective_ac_option)
    return ["full" if (i + 1) % every == 0 else "none" for i in range(n_layers)]


def estimate(cfg: JobConfig, config_name: str, world_size: int, dims: ParallelDims,
             model_args, applied: Applied, gpu_gib: float) -> MemoryPlan:
    t, p = cfg.training, cfg.parallelism
    n_layers = model_args.n_layers
    local = applied.local_numel
    shares = applied.shares  # the whole model was sharded: each pp rank's part

    full_numel = {n: math.prod(s) for n, s in applied.full_shapes.items()}
    expert_div = _expert_div(dims)

    def unsharded(name: str) -> int:  # after FSDP's all-gather: tp / ep shards stay local
        n = full_numel[name]
        if _is_expert(name):
            return math.ceil(n / expert_div)
        return math.ceil(n / dims.tp) if _is_tp_sharded(name) else n

    a = _dtype_bytes(_target_compute_dtype_name(cfg))
    param_bytes = _dtype_bytes(_fsdp_param_dtype_name(cfg))
    reduce_bytes = _dtype_bytes(t.mixed_precision_reduce)
    per_token = _activation_bytes_per_token(model_args, a)
    modes = _layer_modes(cfg, n_layers)

    grad_accum = t.gradient_accumulation_steps(dims.dp)
    tokens = t.local_batch_size * t.seq_len // dims.cp  # per micro-batch (no PP)
    in_flight = 1
    if dims.pp > 1:
        micro = p.pipeline_parallel_microbatch_size
        n_micro = t.local_batch_size // micro
        tokens = micro * t.seq_len // dims.cp
        in_flight = n_micro if p.pipeline_parallel_schedule == "GPipe" else min(n_micro, dims.pp)
    vocab = model_args.vocab_size
    if dims.tp > 1 and not p.disable_loss_parallel:
        vocab = math.ceil(vocab / dims.tp)
    logit_bytes = a + (4 if a != 4 else 0) + 4 + 4

    worst: MemoryPlan | None = None
    for share in shares:
        names = [n for n in local if share.holds(n)]
        n_params = sum(local[n] for n in names)
        experts = sum(local[n] for n in names if _is_expert(n))
        lines = [
            Line("params", 4 * n_params, "fp32 master weights"),
            Line("grads", 4 * n_params, "fp32"),
            Line("optimizer", 8 * n_params, f"{cfg.optimizer.name} exp_avg + exp_avg_sq, fp32"),
        ]
        if applied.fsdp:
            blocks = sorted((sum(unsharded(n) for n in names if _layer_of(n) == i)
                             for i in share.layers), reverse=True)
            gathered = sum(blocks[:2])
            root = sum(unsharded(n) for n in names if _layer_of(n) is None)
            lines.append(Line(
                "FSDP buffers",
                param_bytes * (gathered + root) + reduce_bytes * (blocks[0] if blocks else 0),
                f"{min(2, len(blocks))} blocks + root unit gathered in "
                f"{_fsdp_param_dtype_name(cfg)}, 1 block of unsharded grads in {t.mixed_precision_reduce}"))
        stored = sum(per_token[modes[i]] for i in share.layers)
        recompute = max((per_token["none"] - per_token[modes[i]] for i in share.layers
                         if modes[i] != "none"), default=0.0)
        act = (in_flight * stored + recompute) * tokens / dims.tp
        ac_text = cfg.activation_checkpoint.mode + (
            f" ({cfg.activation_checkpoint.selective_ac_option})"
            if cfg.activation_checkpoint.mode == "selective" else "")
        lines.append(Line("activations", act,
                          f"{len(share.layers)} layers, AC {ac_text}, {tokens:,} tokens/micro-batch"
                          f"{f' x {in_flight} in flight' if in_flight > 1 else ''}"
                          f"{f' / tp {dims.tp}' if dims.tp > 1 else ''}"))
        if share.last:
            chunk = t.loss_chunk_size
            if chunk > 0 and dims.tp == 1 and dims.pp == 1:  # fused, chunked head + loss
                rows = min(chunk, tokens)
                lines.append(Line(
                    "logits + loss",
                    rows * vocab * logit_bytes + (tokens + vocab) * model_args.dim * 4,
                    f"fused: {rows:,}-token chunk x {vocab:,} vocab x {logit_bytes} B "
                    f"+ stored fp32 gradients of hidden states and head"))
            else:
                lines.append(Line("logits + loss", tokens * vocab * logit_bytes,
                                  f"{tokens:,} tokens x {vocab:,} vocab x {logit_bytes} B"))
        lines.append(Line("reserve", RESERVE_GIB * GIB, "CUDA context, NCCL, fragmentation"))
        candidate = MemoryPlan(
            config=config_name, world_size=world_size, dims=dims, applied=applied,
            model_args=model_args, total_params=sum(full_numel.values()), active_params=0,
            rank=share.label, rank_params=n_params, rank_dense=n_params - experts,
            rank_experts=experts, lines=lines, gpu_gib=gpu_gib, tokens_per_microbatch=tokens,
            grad_accum=grad_accum, global_batch=t.local_batch_size * dims.dp * grad_accum)
        if worst is None or candidate.total_bytes > worst.total_bytes:
            worst = candidate
    assert worst is not None
    expert_total = sum(v for n, v in full_numel.items() if _is_expert(n))
    embedding = sum(v for n, v in full_numel.items() if n.startswith("tok_embeddings."))
    worst.active_params = (worst.total_params - embedding - expert_total
                           + expert_total * model_args.top_k // model_args.num_experts)
    return worst


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
            (f"params {_fsdp_param_dtype_name(cfg)} / reduce "
             f"{cfg.training.mixed_precision_reduce}, " if a.fsdp else "")
            + f"compute {_target_compute_dtype_name(cfg)}"])),
    ]
    lines.append("sharding: measured from the sharded parameters (rank 0)")
    if d.pp > 1:
        lines.append(f"pipeline: {cfg.parallelism.pipeline_parallel_schedule}, stages cut as the "
                     "trainer cuts them; each pipeline rank keeps its stages' layers of the "
                     "sharded model (the worst rank is shown)")
    lines.append("buffers and activations: first-order formulas (documented in runtime/plan.py)")
    lines.append(f"per rank [{plan.rank}]: {_count(plan.rank_params)} parameters "
                 f"(dense {_count(plan.rank_dense)}, experts {_count(plan.rank_experts)})")
    for line in plan.lines:
        lines.append(f"  {line.label:<14}{_gib(line.bytes)}   {line.note}")
    total = plan.total_bytes
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<14}{_gib(total)}   of {plan.gpu_gib:g} GiB per GPU: {verdict} "
                 f"({100 * total / (plan.gpu_gib * GIB):.0f}%)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point

def plan_job(cfg: JobConfig, world_size: int, gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
             config_name: str = "(config)", *, dims: ParallelDims | None = None,
             model_args=None) -> MemoryPlan:
    """Validate, apply the parallel plan on a fake mesh and estimate memory (raises
    ConfigError for an invalid config or mesh)."""
    model_args = model_args or cfg.model_args()
    dims = dims or validate_job(cfg, world_size, model_args)
    applied = apply_plan(cfg, dims, model_args)
    return estimate(cfg, config_name, world_size, dims, model_args, applied, gpu_memory_gib)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = build_parser("python -m runtime.plan")
    parser.usage = ("%(prog)s --config FILE --world-size N [--check-only] [--gpu-memory-gib G] "
                    "[--section.key=value ...]")
    parser.description = __doc__.split("\n\n", 1)[0]
    parser.add_argument("--world-size", type=int, required=True, metavar="N",
                        help="number of ranks (GPUs) of the job")
    parser.add_argument("--check-only", action="store_true",
                        help="only validate the config and mesh (no torch import); exit 0 or 2")
    parser.add_argument("--gpu-memory-gib", type=float, default=DEFAULT_GPU_MEMORY_GIB,
                        metavar="G",
                        help=f"memory per GPU (default {DEFAULT_GPU_MEMORY_GIB:g}: H100)")
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


def run_trace(plan: MemoryPlan, cfg: JobConfig, ns) -> int:
    """The dry run of one rank; prints its report (last line: trace: peak, plan, ratio)."""
    from runtime.dry_run import DryRunError, format_trace, trace

    rank = _traced_rank(plan) if ns.rank is None else ns.rank
    try:
        result = trace(cfg, plan.dims, plan.model_args, rank=rank, steps=ns.steps,
                       imbalance=ns.imbalance)
    except DryRunError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_TRACE_FAILED
    modelled = plan.total_bytes - sum(x.bytes for x in plan.lines if x.label == "reserve")
    print("\n".join(format_trace(result, modelled)), flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, ns = parse_args(argv, build_arg_parser())
        if ns.print_config:
            print(cfg.to_toml_str(), end="")
            return EXIT_OK
        if not ns.gpu_memory_gib > 0:
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
    try:
        plan = plan_job(cfg, ns.world_size, ns.gpu_memory_gib, config_name, dims=dims,
                        model_args=model_args)
    except ValueError as e:  # ConfigError, or a parallel pass refusing this model/mesh
        return report_config_error(e if isinstance(e, ConfigError) else f"parallel plan: {e}")
    print(format_plan(plan, cfg), flush=True)
    if ns.trace:
        return run_trace(plan, cfg, ns)
    if not plan.fits:
        big = sorted(plan.lines, key=lambda x: -x.bytes)[:3]
        parts = ", ".join(f"{x.label} {x.bytes / GIB:.1f}" for x in big)
        print(f"error: does not fit: {plan.total_bytes / GIB:.1f} GiB per rank > "
              f"{plan.gpu_gib:g} GiB per GPU (largest: {parts} GiB); shard more "
              "(data_parallel_shard_degree, tensor/expert/pipeline degrees), lower "
              "training.local_batch_size or enable activation_checkpoint.mode",
              file=sys.stderr, flush=True)
        return EXIT_DOES_NOT_FIT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
