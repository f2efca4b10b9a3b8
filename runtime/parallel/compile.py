"""Per-block torch.compile (after TP/EP/AC, before FSDP): one compiled graph per block type,
reused by every block, while FSDP's hooks stay outside the compiled region."""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module) -> None:
    for block in model.layers.values():
        # In-place `Module.compile` keeps parameter names (no `_orig_mod.` prefix).
        block.compile(fullgraph=False)
