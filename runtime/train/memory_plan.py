"""The memory model of a training job: what one rank holds, estimated before anything is
allocated. `python -m runtime.plan` prints it; the trainer refuses a run that does not fit
its device before building the model (`check_memory`, below).

The real parallel plan is applied: the model is built on the meta device (no weight is
allocated) under a fake process group of the job's world size
(`torch.testing._internal.distributed.fake_pg`: collectives are not run, but every
rank-dependent decision is made as on rank 0 of the real job), the device mesh is built and
`runtime.parallel.parallelize.parallelize` shards the model exactly as the trainer would.
What each rank then holds is read off the sharded parameters.

Memory model (per rank; the worst rank under PP; GiB = 2^30 bytes)
------------------------------------------------------------------
params        fp32 master weights: the rank's shards (FSDP pads dim 0: rank 0 gets the ceil)
grads         fp32, same shards
optimizer     AdamW exp_avg + exp_avg_sq: 2 x fp32 per parameter
              With [lora] (runtime/train/memory_plan_lora.py): the frozen base in the compute
              dtype, no grads or optimizer state; adapters (+ trainable_extra) as above.
FSDP buffers  all-gathered (unsharded) parameters in the mixed-precision param dtype (bf16)
              for 2 transformer blocks (the running one + the prefetched next), plus the root
              unit (embeddings, final norm, output head: gathered for the whole step), plus
              one block's unsharded gradients in the reduce dtype (fp32) before reduce-scatter
              (LoRA: the block's trainable parameters only).
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
              of the head weight (when trained: not under LoRA) that the fused forward
              stores for backward.
reserve       2 GiB for the CUDA context, NCCL buffers and allocator fragmentation.
Not modelled: expert-load imbalance, temporary buffers of collectives, compile workspaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from runtime.model.args import ModelArgs
from runtime.parallel.dims import ParallelDims, pipeline_num_stages
from runtime.train import memory_plan_lora
from runtime.train.config import JobConfig, validate_job

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
    # parameters with gradients and optimizer state: all of them, or LoRA's adapters (+ extras)
    trainable: frozenset[str] = frozenset()


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
        memory_plan_lora.adapt(model, cfg, target_compute_dtype_name(cfg))  # [lora]
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
            trainable=memory_plan_lora.trainable_names(model),
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
    total_trainable: int  # parameters with gradients (all of them without LoRA)
    rank_trainable: int
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


def target_compute_dtype_name(cfg: JobConfig) -> str:
    """model.compute_dtype with "auto" resolved for the job's target device (CUDA unless
    training.device = "cpu"), as runtime.model.model.resolve_compute_dtype does there."""
    name = cfg.model.compute_dtype
    if name == "auto":
        name = "float32" if cfg.training.device == "cpu" else "bfloat16"
    return name


def fsdp_param_dtype_name(cfg: JobConfig) -> str:
    # as runtime.parallel.data_parallel.mixed_precision_policy: fp32 compute keeps fp32 params
    if target_compute_dtype_name(cfg) == "float32":
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

    a = _dtype_bytes(target_compute_dtype_name(cfg))
    param_bytes = _dtype_bytes(fsdp_param_dtype_name(cfg))
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
        trained = [n for n in names if n in applied.trainable]
        lines = [Line(*term) for term in memory_plan_lora.state_lines(
            names, local, applied.trainable.__contains__, target_compute_dtype_name(cfg),
            a, cfg.optimizer.name)]
        if applied.fsdp:
            blocks = sorted((sum(unsharded(n) for n in names if _layer_of(n) == i)
                             for i in share.layers), reverse=True)
            gathered = sum(blocks[:2])
            root = sum(unsharded(n) for n in names if _layer_of(n) is None)
            grad_block = max((sum(unsharded(n) for n in trained if _layer_of(n) == i)
                              for i in share.layers), default=0)  # LoRA: adapters only
            lines.append(Line(
                "FSDP buffers",
                param_bytes * (gathered + root) + reduce_bytes * grad_block,
                f"{min(2, len(blocks))} blocks + root unit gathered in "
                f"{fsdp_param_dtype_name(cfg)}, 1 block of unsharded grads in {t.mixed_precision_reduce}"))
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
                head = "output.weight" in applied.trainable  # a frozen head gets no gradient
                lines.append(Line(
                    "logits + loss",
                    rows * vocab * logit_bytes + (tokens + vocab * head) * model_args.dim * 4,
                    f"fused: {rows:,}-token chunk x {vocab:,} vocab x {logit_bytes} B "
                    f"+ stored fp32 gradients of hidden states{' and head' if head else ''}"))
            else:
                lines.append(Line("logits + loss", tokens * vocab * logit_bytes,
                                  f"{tokens:,} tokens x {vocab:,} vocab x {logit_bytes} B"))
        lines.append(Line("reserve", RESERVE_GIB * GIB, "CUDA context, NCCL, fragmentation"))
        candidate = MemoryPlan(
            config=config_name, world_size=world_size, dims=dims, applied=applied,
            model_args=model_args, total_params=sum(full_numel.values()), active_params=0,
            rank=share.label, rank_params=n_params, rank_dense=n_params - experts,
            rank_experts=experts, lines=lines,
            total_trainable=sum(full_numel[n] for n in applied.trainable),
            rank_trainable=sum(local[n] for n in trained), gpu_gib=gpu_gib, tokens_per_microbatch=tokens,
            grad_accum=grad_accum, global_batch=t.local_batch_size * dims.dp * grad_accum)
        if worst is None or candidate.total_bytes > worst.total_bytes:
            worst = candidate
    assert worst is not None
    expert_total = sum(v for n, v in full_numel.items() if _is_expert(n))
    embedding = sum(v for n, v in full_numel.items() if n.startswith("tok_embeddings."))
    worst.active_params = (worst.total_params - embedding - expert_total
                           + expert_total * model_args.top_k // model_args.num_experts)
    return worst


def plan_job(cfg: JobConfig, world_size: int, gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
             config_name: str = "(config)", *, dims: ParallelDims | None = None,
             model_args=None) -> MemoryPlan:
    """Validate, apply the parallel plan on a fake mesh and estimate memory (raises
    ConfigError for an invalid config or mesh)."""
    model_args = model_args or cfg.model_args()
    dims = dims or validate_job(cfg, world_size, model_args)
    applied = apply_plan(cfg, dims, model_args)
    return estimate(cfg, config_name, world_size, dims, model_args, applied, gpu_memory_gib)

