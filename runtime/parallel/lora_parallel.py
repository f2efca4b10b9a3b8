"""Tensor-parallel styles for the attention projections' LoRA adapters (runtime/model/lora.py's
`LoRALinear`: y = x W^T + b + scaling * (x A^T) B^T, A [r, in], B [out, r]).

torch's ColwiseParallel would shard every parameter of the module on dim 0 (A's rank dim
too), and RowwiseParallel would replicate both adapters. The placements that keep each
rank's work local, with the rank dimension r never split:

    Colwise (wq, wk, wv: W [out, in] Shard(0), output Shard(-1)):
        A [r, in]  Replicate   x (Replicate) A^T = the whole [.., r] bottleneck on every rank
        B [out, r] Shard(0)    the rank's output features, like W's rows
        A's gradient is a partial sum on each rank (through its slice of B): DTensor
        reduces it (Partial -> Replicate).
    Rowwise (wo: W [out, in] Shard(1), input Shard(-1), output Partial):
        A [r, in]  Shard(1)    x (Shard(-1)) A^T = a partial [.., r] bottleneck, like x W^T
        B [out, r] Replicate   partial bottleneck @ B^T = a partial output, summed by the
                               reduce-scatter the base output needs anyway
        B's gradient is a partial sum (from the partial bottleneck): DTensor reduces it.

The computation stays LoRALinear.forward's own: DTensor dispatch propagates these
placements through its F.linear calls (no hand-written collective). The expert stacks'
adapters are placed by moe_parallel.py's `_EXPERT_SPLIT`.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from runtime.model.lora import LoRALinear
from runtime.parallel.dtensor_utils import distributed_parameter

__all__ = ["LoRAColwiseParallel", "LoRARowwiseParallel", "lora_styles"]

_ADAPTERS = ("lora_A", "lora_B")


def _partition(base_partition, placements: dict, name: str, module: nn.Module, mesh) -> None:
    """torch's partition of weight/bias, then the adapters at `placements` (same
    requires_grad; no communication: the model is on meta)."""
    if not isinstance(module, LoRALinear):  # distribute_module also visits lora_dropout
        return  # (no parameters; torch's rowwise partition would fail on it)
    adapters = {n: module._parameters.pop(n) for n in _ADAPTERS}  # hidden from torch's loop
    base_partition(name, module, mesh)
    for n, param in adapters.items():
        module.register_parameter(n, distributed_parameter(param, mesh, [placements[n]]))


class LoRAColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a LoRALinear: lora_A Replicate, lora_B Shard(0) (module doc)."""

    def _partition_linear_fn(self, name, module, device_mesh):
        _partition(super()._partition_linear_fn,
                   {"lora_A": Replicate(), "lora_B": Shard(0)}, name, module, device_mesh)


class LoRARowwiseParallel(RowwiseParallel):
    """RowwiseParallel for a LoRALinear: lora_A Shard(1), lora_B Replicate (module doc)."""

    def _partition_linear_fn(self, name, module, device_mesh):
        _partition(super()._partition_linear_fn,
                   {"lora_A": Shard(1), "lora_B": Replicate()}, name, module, device_mesh)


def lora_styles(module: nn.Module, colwise, rowwise):
    """(colwise, rowwise) style classes for `module`: the LoRA ones for a LoRALinear, else
    the given ones (torch's or float8's; LoRA with quantization is refused in config)."""
    if isinstance(module, LoRALinear):
        return LoRAColwiseParallel, LoRARowwiseParallel
    return colwise, rowwise
