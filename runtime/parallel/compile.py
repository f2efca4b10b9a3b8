"""torch.compile of the transformer blocks (after TP/EP/AC, before FSDP), so FSDP's hooks stay
outside the compiled regions. Two granularities:

whole block (no activation checkpointing): `block.compile()`, one graph per block type reused
    by every block. Host syncs (expert parallelism's all-to-all split sizes, the fp32 expert
    loop) are graph breaks: dynamo compiles the pieces around them.

regional (activation checkpointing on): a graph break inside a checkpointed function makes
    dynamo run the whole checkpointed block eagerly (it cannot split the checkpoint), so
    "compile" would compile nothing whenever the MoE has a host sync. The block's parts are
    compiled one by one instead, inside the checkpointed function: attention_norm, attention
    (flex attention needs compile to be fast), ffn_norm, and the experts' grouped-GEMM math
    (`GroupedExperts.compile_math`, bf16); routing, permutation and the EP all-to-alls stay
    eager between them.

In both, `skip_fwd_side_effects_in_bwd_under_checkpoint`: the MoE's token counting (an
in-place buffer update) is a forward side effect, which dynamo otherwise refuses to replay
in a checkpoint's recomputation (falling back to eager); skipping it in the recomputation
also keeps the load statistics from being counted twice.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_compile(model: nn.Module, regional: bool = False) -> None:
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in model.layers.values():
        if not regional:
            # In-place `Module.compile` keeps parameter names (no `_orig_mod.` prefix).
            block.compile(fullgraph=False)
            continue
        for part in (block.attention_norm, block.attention, block.ffn_norm):
            part.compile(fullgraph=False)
        block.moe.experts.compile_math()


def apply_compile_loss(model: nn.Module) -> None:
    """compile.components "loss": the fused chunked loss (training.loss_chunk_size > 0) runs
    each chunk's softmax, target gather, gradient and cast to the compute dtype as one
    compiled kernel instead of ~6 passes over the [chunk, vocab] logits. The plain logits
    path and TP's loss-parallel path have no such chain and are left as they are."""
    model.compile_loss = True
