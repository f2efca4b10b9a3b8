"""LoRA on the model: adapters on the attention projections and on every expert, frozen base.

    with torch.device("meta"):
        model = GptOssModel(args)
    apply_lora(model, spec, frozen_dtype=torch.bfloat16)   # before the parallel passes
    ... parallelize, materialize (init_weights also draws the adapters), load the base ...

`apply_lora` (on the meta model: no memory is touched)
- swaps each adapted attention projection for a `LoRALinear` (an nn.Linear with `lora_A`
  [r, in] and `lora_B` [out, r]; `weight` / `bias` keep their names, so base checkpoints and
  the parallel plans address the same keys);
- gives each adapted expert stack its own per-expert adapters (`GroupedExperts.add_lora`:
  `mlp1_lora_A` [E, r, D] ...; applied inside the grouped GEMMs, runtime/model/moe.py);
- freezes every base parameter (requires_grad False) except the groups named in
  `spec.trainable_extra`, and stores the frozen ones in `frozen_dtype` (the compute dtype:
  bf16 on GPU): they get no fp32 master copy, no gradient and no optimizer state. Adapters
  and trainable extras stay fp32 masters (FSDP2 mixes them with the frozen bf16 tensors in one
  unit: its uniform-dtype rule covers only trainable parameters, and an all-gather of mixed
  dtypes goes through uint8; torch >= 2.7).

Initialisation is PEFT's default (A Kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in))
per expert; B zero), so the step-0 model is the base model exactly. The parameter layout and
the target names: runtime/model/lora_spec.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from runtime.model import init
from runtime.model.lora_spec import (
    DENSE_TARGETS,
    EXPERT_TARGETS,
    LoRASpec,
    expert_adapter_names,
    is_lora_name,
    is_trainable_extra,
)

__all__ = ["LoRALinear", "apply_lora", "count_trainable", "fold", "merged_state_dict"]


class LoRALinear(nn.Linear):
    """y = x W^T + b + scaling * dropout(x) A^T B^T, A [r, in], B [out, r]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int,
                 scaling: float, dropout: float, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.scaling = rank, scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, scaling: float,
                    dropout: float) -> "LoRALinear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, rank,
                  scaling, dropout, device=linear.weight.device, dtype=linear.weight.dtype)
        new.weight, new.bias = linear.weight, linear.bias  # the same parameters (meta)
        return new

    def init_lora_weights(self) -> None:
        init.uniform_(self.lora_A, 1 / math.sqrt(self.in_features))
        init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        low = F.linear(self.lora_dropout(x), self.lora_A)  # [..., r]
        return base + F.linear(low * self.scaling, self.lora_B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def apply_lora(model: nn.Module, spec: LoRASpec, frozen_dtype: torch.dtype) -> nn.Module:
    """Adapters per `spec` on a (meta) GptOssModel, base frozen in `frozen_dtype`; see the
    module doc. Returns the model."""
    for name, block in model.layers.items():
        layer = int(name)
        attention = block.attention
        for target in DENSE_TARGETS:
            if spec.adapts(layer, target):
                setattr(attention, target, LoRALinear.from_linear(
                    getattr(attention, target), spec.rank, spec.scaling, spec.dropout))
        adapted = [t for t in EXPERT_TARGETS if spec.adapts(layer, t)]
        if adapted:
            block.moe.experts.add_lora(adapted, spec.rank, spec.scaling)
    freeze_base(model, spec.trainable_extra, frozen_dtype)
    return model


def freeze_base(model: nn.Module, trainable_extra, frozen_dtype: torch.dtype) -> None:
    """requires_grad False on every non-adapter parameter outside `trainable_extra`, stored in
    `frozen_dtype` (cast on meta: free)."""
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{module_name}.{name}" if module_name else name
            if is_lora_name(full) or is_trainable_extra(full, trainable_extra):
                continue
            module._parameters[name] = nn.Parameter(param.detach().to(frozen_dtype),
                                                    requires_grad=False)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters this rank holds (DTensors: the local shard)."""
    trainable = total = 0
    for p in model.parameters():
        n = (p.to_local() if hasattr(p, "to_local") else p).numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# One owner of the merge math: merged_state_dict below and the HF export (runtime/hf/save.py)
# both fold through this.
@torch.no_grad()
def fold(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
         *, experts_per_chunk: int = 8) -> torch.Tensor:
    """W + scale * B @ A in float32 (a new tensor): W [out, in] with A [r, in], B [out, r], or
    an expert stack W [E, out, in] with A [E, r, in], B [E, out, r], a few experts at a time
    (a 120b stack's fp32 delta would be 8.5 GB at once)."""
    out = weight.to(torch.float32, copy=True)
    a, b = lora_a.to(out.device, torch.float32), lora_b.to(out.device, torch.float32)
    if out.ndim == 2:
        return out.addmm_(b, a, alpha=scale)
    for start in range(0, out.shape[0], experts_per_chunk):
        chunk = slice(start, start + experts_per_chunk)
        out[chunk].baddbmm_(b[chunk], a[chunk], alpha=scale)  # [e, out, r] @ [e, r, in]
    return out


@torch.no_grad()
def merged_state_dict(state_dict: dict[str, torch.Tensor],
                      spec: LoRASpec) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors with adapters -> the base keys only, each adapted weight
    W + scaling * B @ A (per expert for the stacks), computed in fp32, returned in W's dtype.
    The input is not modified."""
    out = {k: v for k, v in state_dict.items() if not is_lora_name(k)}
    s = spec.scaling
    for layer, target in spec.pairs:
        if target in DENSE_TARGETS:
            prefix = f"layers.{layer}.attention.{target}"
            key, a, b = f"{prefix}.weight", f"{prefix}.lora_A", f"{prefix}.lora_B"
        else:
            prefix = f"layers.{layer}.moe.experts"
            name_a, name_b = expert_adapter_names(target)
            key, a, b = f"{prefix}.{target}_weight", f"{prefix}.{name_a}", f"{prefix}.{name_b}"
        if key not in out:
            continue  # another pipeline stage's layer
        w = out[key]
        out[key] = fold(w, state_dict[a], state_dict[b], s).to(w.dtype)
    return out
