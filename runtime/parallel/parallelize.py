"""Compose the parallel passes in one readable order.

    quantize (float8/mxfp8) -> TP/SP (+ async TP) -> MoE (TP / EP / EP over TP ranks / ETP)
    -> CP -> activation checkpointing -> compile -> FSDP/HSDP/DDP

The model arrives on the meta device and leaves still on meta (the trainer then calls
`to_empty` + `init_weights`), so no rank ever materialises weights it does not own.
What the passes produce beyond the module (the CP handle, what quantize converted) comes back
in a `Parallelized` record: callers read that, not attributes of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from runtime.model.quantize import apply_quantization
from runtime.parallel.activation_checkpoint import apply_ac
from runtime.parallel.compile import apply_compile, apply_compile_loss
from runtime.parallel.context_parallel import ContextParallel, apply_cp
from runtime.parallel.data_parallel import apply_fsdp, mixed_precision_policy, reshard_after_forward
from runtime.parallel.dims import ParallelDims
from runtime.parallel.moe_parallel import apply_moe_parallel
from runtime.parallel.tensor_parallel import apply_tp, check_async_tp, enable_async_tp


@dataclass(frozen=True)
class Parallelized:
    """What parallelize() made of one model (or pipeline stage) part."""

    model: nn.Module  # the same module, its passes applied (still on meta)
    # The sequence split (shard_batch cuts each batch with it); None without CP.
    context_parallel: ContextParallel | None = None
    # What quantize converted (model/quantize.py's summary); None for quantize.mode = "none".
    quantize_summary: dict | None = None
    # FSDP float8 all-gather: call model.quantize.after_optimizer_step on this part after
    # every optimizer step.
    float8_precompute_scales: bool = False


def _data_parallel_mesh(dims: ParallelDims):
    """Gradients are averaged over every rank that saw different tokens: data-parallel ranks
    and, under context parallelism, the ranks holding other parts of the sequence."""
    shard = "dp_shard_cp" if dims.cp > 1 else "dp_shard"
    if dims.dp_replicate > 1:
        return dims.get_mesh(("dp_replicate", shard))
    return dims.get_mesh(shard)


def _experts_data_parallel_mesh(dims: ParallelDims):
    """The data-parallel ranks that hold the same experts (EP took the rest)."""
    if dims.dp_replicate > 1:
        return dims.get_mesh(("dp_replicate", "dp_shard_mod_ep"))
    return dims.get_mesh("dp_shard_mod_ep")


def parallelize(model: nn.Module, dims: ParallelDims, cfg, device: torch.device) -> Parallelized:
    """Apply every parallelism of `dims` to `model` in place (on meta; one pipeline stage's
    part or the whole model). With more than one rank, `dims.build_mesh` must have run."""
    check_async_tp(cfg, device)
    # Float8 / MXFP8 module swaps on the meta model, before TP/EP/FSDP (model/quantize.py).
    quantized = apply_quantization(model, cfg, device, dims.tp)
    cp = None
    if dims.tp > 1:
        apply_tp(model, dims.get_mesh("tp"),
                 loss_parallel=not cfg.parallelism.disable_loss_parallel)
        if cfg.parallelism.enable_async_tensor_parallel:  # CUDA + compile: check_async_tp
            enable_async_tp(dims.get_mesh("tp"))
    apply_moe_parallel(model, dims)
    if dims.cp > 1:
        cp = apply_cp(model, dims.get_mesh("cp"), cfg.parallelism.context_parallel_load_balancer)
    apply_ac(model, cfg.activation_checkpoint.mode, cfg.activation_checkpoint.selective_ac_option)
    if cfg.compile.enable and "model" in cfg.compile.components:
        apply_compile(model, regional=cfg.activation_checkpoint.mode != "none")
    if cfg.compile.enable and "loss" in cfg.compile.components:
        apply_compile_loss(model)
    if dims.dp * dims.cp > 1:
        mp = mixed_precision_policy(cfg.training, cfg.model.compute_dtype, device)
        experts = {}
        if dims.ep > 1:
            experts = dict(experts_mesh=_experts_data_parallel_mesh(dims))
        apply_fsdp(model, _data_parallel_mesh(dims), mp,
                   reshard_after_forward(cfg.parallelism.fsdp_reshard_after_forward, dims.pp_enabled),
                   **experts)
    return Parallelized(model, context_parallel=cp, quantize_summary=quantized,
                        float8_precompute_scales=bool(quantized
                                                      and quantized.get("precompute_scales")))
