"""Compose the parallel passes in one readable order.

    quantize (float8/mxfp8) -> TP/SP (+ async TP) -> EP (/ETP) -> CP -> activation checkpointing
    -> compile -> FSDP/HSDP/DDP

The model arrives on the meta device and leaves still on meta (the trainer then calls
`to_empty` + `init_weights`), so no rank ever materialises weights it does not own.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from runtime.parallel.activation_checkpoint import apply_ac
from runtime.parallel.compile import apply_compile, apply_compile_loss
from runtime.parallel.data_parallel import apply_fsdp, mixed_precision_policy, reshard_after_forward
from runtime.parallel.dims import ParallelDims


def _moe_mode_under_tp(dims: ParallelDims) -> str:
    """How the MoE layers run under TP: experts sharded along F over tp (no EP), experts
    sharded over ep x tp (ETP, etp == tp), or EP taking the TP ranks (etp == 1)."""
    if dims.ep == 1:
        return "tensor"
    return "expert_tensor" if dims.etp_enabled else "sequence"


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


def parallelize(model: nn.Module, dims: ParallelDims, mesh, cfg, device: torch.device) -> nn.Module:
    from runtime.parallel.quantize import apply_quantization, check_async_tp, enable_async_tp

    check_async_tp(cfg, device)
    # Float8 / MXFP8 module swaps on the meta model, before TP/EP/FSDP (quantize.py).
    apply_quantization(model, cfg, device, dims)
    if dims.tp > 1:
        from runtime.parallel.tensor_parallel import apply_tp

        apply_tp(model, dims.get_mesh("tp"), loss_parallel=not cfg.parallelism.disable_loss_parallel,
                 moe_mode=_moe_mode_under_tp(dims))
        if cfg.parallelism.enable_async_tensor_parallel:  # CUDA + compile: check_async_tp
            enable_async_tp(dims.get_mesh("tp"))
    if dims.ep > 1:
        from runtime.parallel.expert_parallel import apply_ep

        etp = dims.get_mesh(("ep", "tp")) if dims.etp_enabled else None
        apply_ep(model, dims.get_mesh("ep"), etp_mesh=etp, tp_in_ep=dims.tp_in_ep)
    if dims.cp > 1:
        from runtime.parallel.context_parallel import apply_cp

        apply_cp(model, dims.get_mesh("cp"), cfg.parallelism.context_parallel_load_balancer)
    apply_ac(model, cfg.activation_checkpoint.mode, cfg.activation_checkpoint.selective_ac_option)
    if cfg.compile.enable and "model" in cfg.compile.components:
        apply_compile(model, regional=cfg.activation_checkpoint.mode != "none")
    if cfg.compile.enable and "loss" in cfg.compile.components:
        apply_compile_loss(model)
    if mesh is not None and dims.dp * dims.cp > 1:
        mp = mixed_precision_policy(cfg.training, cfg.model.compute_dtype, device)
        experts = {}
        if dims.ep > 1:
            experts = dict(experts_mesh=_experts_data_parallel_mesh(dims))
        apply_fsdp(model, _data_parallel_mesh(dims), mp,
                   reshard_after_forward(cfg.parallelism.fsdp_reshard_after_forward, dims.pp_enabled),
                   **experts)
    return model


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module, skip: bool):
    """Inside: backward accumulates locally without reducing gradients across data-parallel
    ranks (gradient accumulation micro-steps)."""
    fsdp = hasattr(model, "set_requires_gradient_sync")
    if skip and fsdp:
        model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        if skip and fsdp:
            model.set_requires_gradient_sync(True)


def clip_grad_norm_(parameters, max_norm: float) -> float:
    """Total gradient 2-norm over every rank's shards (DTensor-aware), clipped to max_norm.

    Gradients may live on different meshes (experts on the EP x FSDP mesh, the rest on the
    FSDP x TP mesh): the norm is taken per mesh, each reduced over its own ranks, then combined.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    by_mesh: dict = {}
    for g in grads:
        by_mesh.setdefault(getattr(g, "device_mesh", None), []).append(g)
    squares = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()  # reduce the partial norms of sharded gradients
        squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum().sqrt()
    if math.isfinite(max_norm):
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total.item()
