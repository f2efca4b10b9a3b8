"""Gradient utilities that every parallelism shares: skipping the data-parallel gradient
reduction during accumulation micro-steps, and the total gradient norm (DTensor-aware, over
several meshes and, with pipeline parallelism, over the stages of other ranks) with clipping.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["clip_grad_norm_", "clip_grad_norm_over_stages_", "no_gradient_sync"]


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


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Total gradient 2-norm over every rank's shards (DTensor-aware), clipped to max_norm
    (inf: no clipping).

    Gradients may live on different meshes (experts on the EP x FSDP mesh, the rest on the
    FSDP x TP mesh): the norm is taken per mesh, each reduced over its own ranks, then combined.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
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
    return total  # a device scalar: reading it is the caller's (one) host sync


def clip_grad_norm_over_stages_(parameters, max_norm: float, pp_group,
                                device: torch.device) -> torch.Tensor:
    """`clip_grad_norm_` over every pipeline stage: this rank's stages' norm combined with
    those of the other `pp_group` ranks (each holds different stages), then clipped."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    # This rank's norm (its stages, all shards), not clipped yet.
    local = clip_grad_norm_(parameters, float("inf")).to(device, torch.float64)
    total_sq = local * local
    dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()  # stays on the device: no host sync here
    if grads and math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total, foreach=True)
    return total
