"""Activation checkpointing: full (every block), every n-th block, or selective op-level.

The choice is stored on each TransformerBlock (`block.activation_checkpoint`) and applied
inside its forward, so parameter names never change (no wrapper modules): checkpoints,
HF export and parallel plans keep addressing `layers.N.*`.
"""

from __future__ import annotations

from torch import nn


def apply_ac(model: nn.Module, mode: str, option: str) -> None:
    """mode: none | full | selective; option (selective): "op" or an integer N = every N-th block."""
    if mode == "none":
        return
    for block in model.layers.values():  # layer_id: global, also on a pipeline stage
        if mode == "full":
            block.activation_checkpoint = "full"
        elif option == "op":
            block.activation_checkpoint = "op"
        elif (block.layer_id + 1) % int(option) == 0:
            block.activation_checkpoint = "full"
