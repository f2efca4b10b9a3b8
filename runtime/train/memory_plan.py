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
peak = resident + the largest transient peak of the step (the phases do not coincide).
Checked against the CUDA dry run (--trace, runtime/dry_run.py: torch's FSDPMemTracker on the
real step); the table is in docs/parallelism.md.
Resident (held through the step):
params        fp32 master weights: the rank's shards (FSDP pads dim 0: rank 0 gets the ceil)
grads         fp32, same shards. They appear during backward (FSDP: at each unit's
              reduce-scatter) and the loss phase has none (zero_grad(set_to_none) freed
              them): counted in the "block backward" and "reduce-scatter" peaks. Accumulating
              over micro-batches, plain .grad tensors are held through the step; with FSDP
              each replaces the larger unsharded accumulated gradient it was reduced from
              ("grad accum").
weight casts  without FSDP, compute dtype below fp32: autocast's copies of the fp32 weights
              each matmul uses, saved for backward (all trained weights but the embeddings).
optimizer     AdamW exp_avg + exp_avg_sq: 2 x fp32 per parameter
              With [lora] (runtime/train/memory_plan_lora.py): the frozen base in the compute
              dtype, no grads or optimizer state; adapters (+ trainable_extra) as above, and
              every gradient term below counts the trainable parameters only.
FSDP buffers  all-gathered (unsharded) parameters in the mixed-precision param dtype (bf16)
              for 2 transformer blocks (the running one + the prefetched next; every block
              with fsdp_reshard_after_forward = "never" and under PP, whose schedule also
              keeps them after backward), plus the root unit (embeddings, final norm, output
              head: gathered for the whole step). "Unsharded" means after FSDP's all-gather
              only: tp / ep shards stay local.
grad accum    with FSDP and skipped gradient sync (gradient accumulation; PP micro-batches):
              every unit's unsharded gradients, upcast to the reduce dtype (fp32), kept
              between micro-batches (FSDP2's to_accumulated_grad_if_needed): root + blocks.
activations   kept for backward, first order, bf16 compute (a = 2 bytes; 4 for fp32), per
              layer and token:
                none        a*(8*dim + 4*q + 3*kv + 6*k*F + 3*k*dim) + 4*(4*dim + 2*E)
                selective   a*(2*dim + q + 2*kv + 2*k*F + k*dim) + 4*E   (matmul outputs kept)
                full        a*dim                                         (block input only)
              q = n_heads*head_dim, kv = n_kv_heads*head_dim, F = moe_inter_dim, k = top_k,
              E = num_experts; dim-wide terms: the norms' inputs/outputs, residual sums, the
              attention and MoE outputs (+ fp32 copies inside RMSNorm); q/kv terms:
              projections, RoPE outputs, attention output (flex attention: no S x S scores);
              k*F terms: mlp1 output (2F), the clamped SwiGLU intermediates; k*dim: routed rows
              gathered, mlp2 output, weighted rows. Totals x tokens per rank per micro-batch
              (local_batch_size x seq_len / cp), / tp (sequence parallel and head / expert
              sharding), x micro-batches in flight under PP (GPipe: all; others: pp).
              Routing is assumed balanced (EP: each rank gets its share of rows).
Transient (the largest counts):
logits + loss on the rank holding the output head. Whole logits (TP/PP): tokens x vocab
              (/ tp with loss parallel) x (a logits + 4 fp32 upcast + 4 + 4) bytes. The fused
              loss (training.loss_chunk_size > 0, no TP/PP) stores fp32 gradients of the
              hidden states and of the head weight in forward; the larger of its forward (+
              one chunk of logits) and its backward (+ the scaled fp32 copies of both and
              their casts to the inputs' dtypes: a second fp32 [vocab, dim] head gradient);
              a frozen head (LoRA) gets no [vocab, dim] gradient at all.
block forward  FSDP: one more block in the param dtype (an all-gather output lives until the
              next all-gather: the running block's copy + its output + the next block's).
block backward  (not held through the step: the grads) + one checkpointed layer's
              recompute (its full activations minus what was kept) + one block's unsharded
              gradients in the reduce dtype + (FSDP, head rank) the head's unsharded
              gradient, held until the root's reduce-scatter.
reduce-scatter  FSDP: (not accumulating: the sharded grads +) the root unit's gradients
              copied to the reduce dtype at the end of backward (the optimizer step, params
              + grads + optimizer state, is below it).
reserve       2 GiB for the CUDA context, NCCL buffers and allocator fragmentation (not on CPU).
Not modelled: expert-load imbalance (the dry run's --imbalance traces it), temporary buffers
of collectives, compile workspaces.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import ConfigError, one_line
from runtime.model.args import ModelArgs
from runtime.parallel.dims import ParallelDims, pipeline_num_stages
from runtime.train import memory_plan_lora
from runtime.train.config.job import validate_job
from runtime.train.config.schema import JobConfig
from runtime.train.config.job import step_batch

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
        model = parallelize(model, dims, cfg, device).model
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
    # A transient peak of one phase of the step (loss, block backward, reduce-scatter): these
    # do not coincide, so the total counts the largest of them, not their sum.
    alternative: bool = False


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
    gpu_gib: float  # the limit per rank (a GPU's memory; on CPU the machine's share)
    tokens_per_microbatch: int
    grad_accum: int
    global_batch: int
    notes: list[str] = field(default_factory=list)
    limit_note: str = "per GPU"  # what gpu_gib is, for the verdict and its message

    @property
    def resident_bytes(self) -> float:
        """Everything held through the whole step (the lines that are not alternatives)."""
        return sum(line.bytes for line in self.lines if not line.alternative)

    @property
    def peak_line(self) -> Line | None:
        """The alternative (transient) line that sets the peak."""
        return max((x for x in self.lines if x.alternative), key=lambda x: x.bytes, default=None)

    @property
    def total_bytes(self) -> float:
        """resident + the largest transient peak (never the sum of all lines)."""
        peak = self.peak_line
        return self.resident_bytes + (peak.bytes if peak is not None else 0.0)

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


def _loss_line(args, tokens: int, vocab: int, chunk: int, a: int, weight_bytes: int,
               head_trained: bool) -> Line:
    """The output head + loss phase on the rank holding the head: `chunk` > 0 is the fused,
    chunked loss (runtime/model/loss.py), else whole logits. `weight_bytes`: the head weight's
    dtype inside the step (FSDP: the gathered param dtype, else the fp32 master); a frozen
    head (LoRA) gets no [vocab, dim] gradient."""
    logit_bytes = a + (4 if a != 4 else 0) + 4 + 4  # logits, fp32 upcast, shifted, exp/grad
    if chunk <= 0:
        return Line("logits + loss", tokens * vocab * logit_bytes,
                    f"{tokens:,} tokens x {vocab:,} vocab x {logit_bytes} B", alternative=True)
    rows, D = min(chunk, tokens), args.dim
    head = vocab if head_trained else 0
    saved = (tokens + head) * D * 4  # fp32 gradients of hidden states and head, for backward
    forward = saved + rows * vocab * logit_bytes
    # backward scales the saved gradients (new fp32 tensors) and casts them to the inputs'
    # dtypes: a second fp32 [V, D] head gradient and its copy in the weight's dtype
    backward = saved + head * D * (4 + (weight_bytes if weight_bytes != 4 else 0)) \
        + tokens * D * (4 + (a if a != 4 else 0))
    if backward >= forward:
        note = (f"fused loss backward: stored fp32 gradients of hidden states"
                f"{f' and head ({vocab:,} x {D:,})' if head else ''} + their scaled fp32 "
                "copies + casts")
    else:
        note = (f"fused loss forward: {rows:,}-token chunk x {vocab:,} vocab x {logit_bytes} B "
                f"+ stored fp32 gradients of hidden states{' and head' if head else ''}")
    return Line("logits + loss", max(forward, backward), note, alternative=True)


def _backward_lines(cfg: JobConfig, *, grads: float, recompute: float, block_grads: float,
                    head: float, root_grads: float) -> list[Line]:
    """The backward's transient peaks: a block's backward, the root's reduce-scatter. `grads`:
    the gradients made in backward, counted here (0 when they are held through the step, or,
    FSDP accumulating, replace the larger accumulated gradients they were reduced from)."""
    reduce = cfg.training.mixed_precision_reduce
    grads_text = f"fp32 grads {grads / GIB:.2f}"
    parts = [(grads_text, grads), ("recompute of one checkpointed layer", recompute),
             (f"one block's unsharded grads in {reduce}", block_grads),
             (f"the head's unsharded grad in {fsdp_param_dtype_name(cfg)}", head)]
    lines = [Line("block backward", grads + recompute + block_grads + head,
                  " + ".join(text for text, b in parts if b) or "-", alternative=True)]
    if root_grads:
        lines.append(Line("reduce-scatter", grads + root_grads,
                          (f"{grads_text} + " if grads else "") + f"the root unit's gradients "
                          f"copied to {reduce} for its reduce-scatter (end of backward)",
                          alternative=True))
    return lines


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

    grad_accum, global_batch = step_batch(cfg, dims.dp)
    tokens = t.local_batch_size * t.seq_len // dims.cp  # per micro-batch (no PP)
    in_flight, n_micro = 1, 1
    if dims.pp > 1:
        micro = p.pipeline_parallel_microbatch_size
        n_micro = t.local_batch_size // micro
        tokens = micro * t.seq_len // dims.cp
        in_flight = n_micro if p.pipeline_parallel_schedule == "GPipe" else min(n_micro, dims.pp)
    vocab = model_args.vocab_size
    if dims.tp > 1 and not p.disable_loss_parallel:
        vocab = math.ceil(vocab / dims.tp)
    fused = t.loss_chunk_size > 0 and dims.tp == 1 and dims.pp == 1  # as Trainer._build_model
    # FSDP keeps gathered weights: "never" resharding, and under PP, where the schedule also
    # turns resharding after backward off until the last micro-batch (torch.distributed
    # .pipelining: set_reshard_after_backward(False) / set_requires_gradient_sync(False)).
    from runtime.parallel.data_parallel import reshard_after_forward
    keep_gathered = dims.pp > 1 or not reshard_after_forward(p.fsdp_reshard_after_forward, False)
    # Skipped gradient sync (accumulation micro-batches; every PP micro-batch but the last)
    # makes FSDP2 keep each unit's unsharded gradient, upcast to the reduce dtype, until the
    # reduce-scatter of the last one (FSDPParam.to_accumulated_grad_if_needed).
    accumulating = applied.fsdp and (grad_accum > 1 or (dims.pp > 1 and n_micro > 1))

    worst: MemoryPlan | None = None
    for share in shares:
        names = [n for n in local if share.holds(n)]
        n_params = sum(local[n] for n in names)
        experts = sum(local[n] for n in names if _is_expert(n))
        trained = [n for n in names if n in applied.trainable]
        state = {label: Line(label, b, note) for label, b, note in memory_plan_lora.state_lines(
            names, local, applied.trainable.__contains__, target_compute_dtype_name(cfg),
            a, cfg.optimizer.name)}
        grads = state["grads"].bytes  # fp32, sharded like the params (trainable only)
        # Gradients exist from their backward (FSDP: their reduce-scatter) to zero_grad: part of
        # the backward peaks below, except plain .grad tensors accumulating over micro-batches.
        held_grads = not applied.fsdp and (grad_accum > 1 or n_micro > 1)
        lines = [state["params"], *([state["grads"]] if held_grads else []), state["optimizer"]]
        if not applied.fsdp and a < 4:
            # autocast casts each fp32 weight a matmul uses and the matmul saves the copy for
            # backward (FSDP instead gathers compute-dtype weights: "FSDP buffers")
            # (LoRA: the frozen base is stored in the compute dtype already)
            cast = sum(local[n] for n in trained if not n.startswith("tok_embeddings."))
            lines.append(Line("weight casts", a * cast,
                              f"{target_compute_dtype_name(cfg)} copies of the weights used in "
                              "forward, saved for backward"))

        def unit_sizes(params: list[str]) -> tuple[int, list[int]]:
            """(root unit, each block) unsharded elements of `params`, blocks largest first."""
            return (sum(unsharded(n) for n in params if _layer_of(n) is None),
                    sorted((sum(unsharded(n) for n in params if _layer_of(n) == i)
                            for i in share.layers), reverse=True))

        root, blocks = unit_sizes(names)
        root_grad, block_grads = unit_sizes(trained)  # LoRA: adapters only
        if applied.fsdp:
            kept = blocks if keep_gathered else blocks[:2]
            lines.append(Line(
                "FSDP buffers", param_bytes * (root + sum(kept)),
                f"root unit + {len(kept)} blocks gathered in {fsdp_param_dtype_name(cfg)}"))
        if accumulating:
            lines.append(Line(
                "grad accum", reduce_bytes * (root_grad + sum(block_grads)),
                f"unsharded {t.mixed_precision_reduce} gradients of every FSDP unit, kept "
                f"between micro-batches (no gradient sync until the last)"))
        stored = sum(per_token[modes[i]] for i in share.layers) * in_flight * tokens / dims.tp
        ac_text = cfg.activation_checkpoint.mode + (
            f" ({cfg.activation_checkpoint.selective_ac_option})"
            if cfg.activation_checkpoint.mode == "selective" else "")
        lines.append(Line("activations", stored,
                          f"kept for backward: {len(share.layers)} layers, AC {ac_text}, "
                          f"{tokens:,} tokens/micro-batch"
                          f"{f' x {in_flight} in flight' if in_flight > 1 else ''}"
                          f"{f' / tp {dims.tp}' if dims.tp > 1 else ''}"))
        # The transient peaks; the largest one counts.
        head_trained = "output.weight" in applied.trainable
        if applied.fsdp and blocks and not keep_gathered:
            # FSDP2 frees an all-gather's output only at its next all-gather (no stream
            # juggling): a block's forward holds its own unsharded copy, its all-gather output
            # and the next block's (traced: 120b without EP, 3 x 6.04 GiB blocks + root).
            lines.append(Line("block forward", param_bytes * blocks[0],
                              f"one more block's all-gather output in {fsdp_param_dtype_name(cfg)}",
                              alternative=True))
        if share.last:
            lines.append(_loss_line(model_args, tokens, vocab, t.loss_chunk_size if fused else 0,
                                    a, param_bytes if applied.fsdp else 4, head_trained))
        lines.extend(_backward_lines(
            cfg, grads=0 if accumulating or held_grads else grads,
            recompute=max((per_token["none"] - per_token[modes[i]] for i in share.layers
                           if modes[i] != "none"), default=0.0) * tokens / dims.tp,
            block_grads=reduce_bytes * block_grads[0] if applied.fsdp and block_grads else 0,
            # FSDP: the head's unsharded gradient (param dtype) waits for the root's
            # reduce-scatter at the end of backward, through every block's backward.
            head=param_bytes * unsharded("output.weight")
            if applied.fsdp and share.last and head_trained else 0,
            root_grads=reduce_bytes * root_grad if applied.fsdp else 0))
        if cfg.training.device != "cpu":  # a CPU run has no CUDA context or NCCL buffers
            lines.append(Line("reserve", RESERVE_GIB * GIB, "CUDA context, NCCL, fragmentation"))
        candidate = MemoryPlan(
            config=config_name, world_size=world_size, dims=dims, applied=applied,
            model_args=model_args, total_params=sum(full_numel.values()), active_params=0,
            rank=share.label, rank_params=n_params, rank_dense=n_params - experts,
            rank_experts=experts, lines=lines,
            total_trainable=sum(full_numel[n] for n in applied.trainable),
            rank_trainable=sum(local[n] for n in trained), gpu_gib=gpu_gib, tokens_per_microbatch=tokens,
            grad_accum=grad_accum, global_batch=global_batch)
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


# --------------------------------------------------------------------------- the verdict

def does_not_fit(plan: MemoryPlan, cfg: JobConfig) -> str | None:
    """None when the plan fits its limit, else the one-line reason naming the estimate, the
    limit and the keys that lower it. Shared by `python -m runtime.plan` and the trainer's
    pre-flight check, so both give the same verdict."""
    need = plan.total_bytes
    if need <= plan.gpu_gib * GIB:
        return None
    big = sorted(plan.lines, key=lambda x: -x.bytes)[:3]
    parts = ", ".join(f"{x.label} {x.bytes / GIB:.1f}" for x in big)
    t = cfg.training
    ac = ("enable activation_checkpoint.mode" if cfg.activation_checkpoint.mode == "none"
          else "set activation_checkpoint.mode=full")
    return (f"does not fit: {need / GIB:.1f} GiB per rank > {plan.gpu_gib:.4g} GiB "
            f"{plan.limit_note} (largest: {parts} GiB); lower training.local_batch_size "
            f"({t.local_batch_size}) or training.seq_len ({t.seq_len}), {ac} or shard more "
            f"(data_parallel_shard_degree, tensor/expert/pipeline/context degrees)")


def available_memory(device_type: str, device_index: int | None = None,
                     ranks_here: int = 1) -> tuple[float, str] | None:
    """(GiB one rank may use, what that is) for a device: a GPU's total memory, or on CPU the
    machine's MemAvailable (/proc/meminfo) shared by the ranks on this machine; None where it
    cannot be read (no /proc: nothing is checked)."""
    if device_type == "cuda":
        # imported here: this module is on `runtime.plan --check-only`'s torch-free path
        import torch

        total = torch.cuda.get_device_properties(device_index).total_memory
        return total / GIB, f"per GPU (cuda:{device_index})"
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    share = kib * 1024 / max(ranks_here, 1) / GIB
    return share, (f"per rank (MemAvailable in /proc/meminfo"
                   f"{f' / {ranks_here} ranks on this machine' if ranks_here > 1 else ''})")


def check_memory(cfg: JobConfig, world_size: int, device_type: str, device_index: int | None,
                 ranks_here: int) -> tuple[str | None, str | None]:
    """The trainer's pre-flight check, before anything is built: (refusal, warning), each one
    line or None. Runs before the trainer's real process group (apply_plan brings up a fake
    one). A config the estimate cannot take is left to the trainer's own checks (they name
    the key); an estimate that fails otherwise is a warning, never a refusal."""
    limit = available_memory(device_type, device_index, ranks_here)
    if limit is None:
        return None, "warning: memory check not done: the available memory cannot be read"
    if world_size == 1:  # no mesh is built: nothing of the fake group outlives it
        return _judge(cfg, world_size, device_type, limit)
    return _in_child(lambda: _judge(cfg, world_size, device_type, limit))


def _judge(cfg: JobConfig, world_size: int, device_type: str,
           limit: tuple[float, str]) -> tuple[str | None, str | None]:
    resolved = copy.deepcopy(cfg)  # estimated for the device the run resolved ("auto")
    resolved.training.device = device_type
    try:
        plan = plan_job(resolved, world_size, limit[0])
    except ConfigError:
        return None, None
    except Exception as e:  # noqa: BLE001 - a bug in the estimate must not stop a valid run
        return None, f"warning: memory check not done: the estimate failed ({one_line(e)})"
    plan.limit_note = limit[1]
    reason = does_not_fit(plan, resolved)
    if reason is None:
        return None, None
    if cfg.training.skip_memory_check:
        return None, f"warning: memory check skipped (training.skip_memory_check): {reason}"
    plan_cmd = "python -m runtime.plan" + (" --training.device=cpu" if device_type == "cpu" else "")
    return (f"memory check: {reason}; or --skip-memory-check (training.skip_memory_check) to "
            f"start anyway; `{plan_cmd}` shows the estimate"), None


def _in_child(judge) -> tuple[str | None, str | None]:
    """judge() in a forked child, its two lines back as JSON. With a mesh, the fake process
    group leaves state in torch that the real mesh then picks up (seen with torch 2.13: rank 1's
    FSDP parameters on a mesh with rank 0's coordinate, so its checkpoint shards overwrote
    rank 0's); a child process takes all of it away. Costs milliseconds (no new interpreter)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        try:
            result = judge()
        except BaseException as e:  # noqa: BLE001 - a start-up signal too: report, leave
            result = (None, f"warning: memory check not done: {one_line(repr(e))}")
        with os.fdopen(write, "w") as f:
            f.write(json.dumps(result))
        os._exit(0)
    os.close(write)
    text = None
    try:
        with os.fdopen(read) as f:
            text = f.read()
    finally:
        if text is None:  # a signal in the parent while it waited: the child goes too
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if not text:
        return None, "warning: memory check not done: the estimate's process died"
    refusal, warning = json.loads(text)
    return refusal, warning
