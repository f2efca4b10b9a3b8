"""DTensor parameters that the model reads as plain local tensors (shared by tensor_parallel.py
and moe_parallel.py).

The model's own code reads some parameters directly (the router gate, the experts' weights,
the attention sinks) instead of through an nn.Linear that DTensor dispatch would handle.
Those parameters stay registered as DTensors (state dicts, optimizer and FSDP see the same
names and placements); `swap_parameters` hands the forward a substitute for each of them --
`to_local` (its local shard) or `sum_grad_over(...)` (its local value, with a gradient summed
over a mesh dimension) -- for the duration of the owning module's forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, distribute_tensor

__all__ = ["SumGradOverMesh", "distributed_parameter", "sum_grad_over", "swap_parameters",
           "to_local"]


def distributed_parameter(param: nn.Parameter, mesh, placements) -> nn.Parameter:
    """`param` as a DTensor parameter on `mesh` with `placements` (same requires_grad)."""
    # src_data_rank=None: no communication (the model is usually on meta; real values are
    # written later by init_weights or a checkpoint load).
    dt = distribute_tensor(param.data, mesh, placements, src_data_rank=None)
    return nn.Parameter(dt, requires_grad=param.requires_grad)


def to_local(param):
    """A `swap_parameters` substitute: the local shard (its gradient comes back as a DTensor
    with param's placements)."""
    return param.to_local()


class SumGradOverMesh(torch.autograd.Function):
    """DTensor parameter -> its local tensor for a rank-local computation whose gradient on
    each rank is only a partial sum over the mesh dim `dim` (where the parameter is
    Replicate); backward all-reduces (sums) the local gradients over that dim and hands back
    a gradient with the parameter's placements.

    count_once=True: the local value is the parameter divided by the size of `dim` (a bias
    added to a partial sum must be counted once over those ranks); its summed gradient is
    then the mean of the ranks' (identical) gradients. Not "the parameter on rank 0, zeros
    elsewhere": under torch.compile the other ranks' backward all-reduce of a zero gradient
    does not depend on the incoming gradient, so inductor's partitioner hoists it into the
    *forward* graph there, while rank 0 runs it in backward: the ranks' collectives no longer
    match (gloo: "Received data size doesn't match expected size"; NCCL would hang). Scaling
    keeps one program on every rank."""

    @staticmethod
    def forward(ctx, param, count_once: bool, dim: str | None = None):
        mesh = param.device_mesh
        index = 0 if dim is None else mesh.mesh_dim_names.index(dim)
        ctx.spec = (mesh, param.placements, param.shape, param.stride(), index)
        ctx.scale = 1.0 / mesh.size(index) if count_once else 1.0
        local = param.to_local()
        return local * ctx.scale if count_once else local.view_as(local)

    @staticmethod
    def backward(ctx, grad):
        mesh, placements, shape, stride, index = ctx.spec
        if ctx.scale != 1.0:
            grad = grad * ctx.scale
        partial_placements = list(placements)
        partial_placements[index] = Partial()
        partial = DTensor.from_local(grad.contiguous(), mesh, partial_placements, run_check=False,
                                     shape=shape, stride=stride)
        return partial.redistribute(mesh, placements), None, None


def sum_grad_over(dim: str | None = None, count_once: bool = False):
    """A `swap_parameters` substitute: the local tensor whose gradient is summed over `dim`
    (the mesh's only dim when None); see `SumGradOverMesh`."""
    # SumGradOverMesh is looked up at call time: tests replace it (negative controls).
    return lambda param: SumGradOverMesh.apply(param, count_once, dim)


def swap_parameters(owner: nn.Module, target: nn.Module, substitutes: dict) -> None:
    """Forward pre/post hooks on `owner` that replace parameters of `target` (owner or a
    submodule) by `substitutes[name](param)` for the duration of owner's forward, then put
    them back. The parameters stay registered (same names in state dicts and optimizers);
    only the forward reads the substitutes. Runs after FSDP's pre-forward (which registers
    the unsharded parameters on the block) and again under activation-checkpoint
    recomputation."""
    _SwapParameters(owner, target, substitutes)


class _SwapParameters:
    def __init__(self, owner: nn.Module, target: nn.Module, substitutes: dict):
        self.target, self.substitutes, self.saved = target, substitutes, []
        owner.register_forward_pre_hook(self._pre)
        owner.register_forward_hook(self._post)

    def _pre(self, module, args):
        saved = {}
        for name, fn in self.substitutes.items():
            param = self.target._parameters[name]
            saved[name] = param
            self.target._parameters[name] = fn(param)  # a plain tensor, bypassing __setattr__
        self.saved.append(saved)

    def _post(self, module, args, output):
        for name, param in self.saved.pop().items():
            self.target._parameters[name] = param
