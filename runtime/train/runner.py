"""How this rank executes a training step: one interface, two runners.

    LocalRunner                          the whole model in this process (FSDP / TP / EP / CP
                                         live inside the parallelised model)
    runtime.parallel.pipeline.PipelineParallel
                                         this rank's pipeline stages, run by a schedule

The trainer drives either through the same calls, the `Runner` protocol below, and never
asks which one it has (tests/train/test_runner.py checks that both conform).

The loss contract: `forward_backward` backpropagates `loss_scale` x (sum over the micro-step's
tokens of the cross entropy, IGNORE_INDEX labels skipped) and returns that sum, unscaled,
detached, fp32. The normaliser is the caller's choice: the trainer passes
dp x cp / (trained tokens of the whole step over all ranks), counted once per step.

`materialize` is the one place weights come into existence (`to_empty` + `init_weights`) after
the parallel passes ran on the meta device; the pipeline calls it for its stages.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from runtime.model.loss import cross_entropy_sum, loss_parallel_context
from runtime.parallel.gradients import clip_grad_norm_, no_gradient_sync


@runtime_checkable
class Runner(Protocol):
    """What the trainer needs of a runner (LocalRunner, parallel/pipeline.py's
    PipelineParallel)."""

    model_parts: list[nn.Module]  # the model, or this rank's stage modules (checkpoints)
    # One module holding every local parameter under the full model's names (the optimizer,
    # its checkpoints, MoE bookkeeping, parameter counts).
    model: nn.Module
    microbatches: int  # model forwards per gradient-accumulation micro-step

    def forward_backward(self, micro: dict, loss_scale: float,
                         sync_grads: bool = True) -> torch.Tensor:
        """Backpropagates loss_scale x the summed token loss of `micro`; returns the sum
        (unscaled, detached, fp32). sync_grads=False: no data-parallel reduction yet."""
        ...

    def eval_loss_sum(self, micro: dict) -> torch.Tensor:
        """The summed token loss of `micro` without training on it (validation)."""
        ...

    def share_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """The loss summed over the ranks that each computed a part of it (pipeline)."""
        ...

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The total gradient norm over every shard and stage, clipped to max_norm."""
        ...


def materialize(parts: list[nn.Module], device: torch.device, seed: int) -> None:
    """Allocate the (parallelised, meta) parts on `device` -- each rank only its shards -- and
    initialise them (values keyed by seed and parameter name: the same full tensors on any
    mesh and any pipeline split); training mode."""
    for part in parts:
        part.to_empty(device=device)
        part.init_weights(seed=seed)
        part.train()


class LocalRunner:
    """The whole (parallelised, materialised) model in this process."""

    microbatches = 1

    def __init__(self, model: nn.Module, device: torch.device, fused_loss_chunk: int = 0):
        """fused_loss_chunk > 0: the output head and the loss run fused, chunked over that many
        tokens (model/loss.py), never holding the [tokens, vocab] logits."""
        self.model = model
        self.model_parts = [model]
        self.device = device
        self.fused_loss_chunk = fused_loss_chunk

    def forward_backward(self, micro: dict, loss_scale: float, sync_grads: bool = True) -> torch.Tensor:
        """sync_grads=False: the backward only accumulates this rank's gradients (an early
        accumulation micro-step); data-parallel reduction happens on the last one."""
        with no_gradient_sync(self.model, skip=not sync_grads):
            return self._forward_backward(micro, loss_scale)

    def _forward_backward(self, micro: dict, loss_scale: float) -> torch.Tensor:
        tokens, labels, positions, doc_ids = self._inputs(micro)
        if self.fused_loss_chunk > 0:
            loss_sum = self.model(tokens, positions=positions, document_ids=doc_ids,
                                  labels=labels, loss_chunk_size=self.fused_loss_chunk)
            (loss_sum * loss_scale).backward()
            return loss_sum.detach()
        logits = self.model(tokens, positions=positions, document_ids=doc_ids)  # [B, S, V]
        vocab_sharded = hasattr(logits, "placements")  # TP loss parallel
        with loss_parallel_context(vocab_sharded):
            loss_sum = cross_entropy_sum(logits, labels)
            (loss_sum * loss_scale).backward()
        if vocab_sharded:
            loss_sum = loss_sum.full_tensor()
        return loss_sum.detach()

    @torch.no_grad()
    def eval_loss_sum(self, micro: dict) -> torch.Tensor:
        """The summed token loss of `micro` without training on it (validation): forward only."""
        tokens, labels, positions, doc_ids = self._inputs(micro)
        if self.fused_loss_chunk > 0:
            return self.model(tokens, positions=positions, document_ids=doc_ids,
                              labels=labels, loss_chunk_size=self.fused_loss_chunk)
        logits = self.model(tokens, positions=positions, document_ids=doc_ids)  # [B, S, V]
        vocab_sharded = hasattr(logits, "placements")
        with loss_parallel_context(vocab_sharded):
            loss_sum = cross_entropy_sum(logits, labels)
        return loss_sum.full_tensor() if vocab_sharded else loss_sum

    def _inputs(self, micro: dict):
        """(tokens, labels, positions, document_ids or None) of a micro-batch, on the device."""
        tokens, labels, positions = (micro[k].to(self.device, non_blocking=True)
                                     for k in ("tokens", "labels", "positions"))
        doc_ids = micro.get("document_ids")
        doc_ids = doc_ids.to(self.device, non_blocking=True) if doc_ids is not None else None
        return tokens, labels, positions, doc_ids

    def share_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        return loss_sum  # computed here in full

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(self.model.parameters(), max_norm)
