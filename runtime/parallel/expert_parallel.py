"""The expert-parallel token transport: each rank of the `ep` mesh owns num_experts/ep whole
experts, and the routed token rows travel to their expert's rank and back by all-to-all with
uneven splits. moe_parallel.py decides when and over which ranks (and installs one
`ExpertParallel` as `MoE.expert_parallel` on every MoE layer); the MoE's forward calls `run`.

Per MoE layer, on every EP rank (its own tokens, routed locally):
    rows [N, D] sorted by global expert id, counts [E]
      -> send_counts [ep, E_local]   rows for each destination rank, per its local expert
      -> all-to-all of counts        recv_counts [ep, E_local] (rows arriving per source/expert)
      -> all-to-all of rows          received [M, D], ordered (source rank, local expert)
      -> regroup by local expert, grouped GEMM on the local experts, undo the regrouping
      -> all-to-all back             [N, D] in the original order
The row all-to-alls are autograd functions (their backward is the reverse all-to-all), so
each expert's gradient sums the contributions of every rank's tokens (the gradient scale
that makes this equal the single-process update: moe_parallel.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import (
    all_to_all_single,
    all_to_all_single_autograd,
)


@dataclass
class ExpertParallel:
    group: dist.ProcessGroup
    size: int
    # DualPipeV's EP overlap (dualpipe_overlap.py) sets this: the rows pass through it right
    # before and after each all-to-all, where its forward and backward roles hand over.
    sync_point: Callable[[torch.Tensor, str], torch.Tensor] | None = None

    def _all_to_all(self, x: torch.Tensor, output_splits, input_splits) -> torch.Tensor:
        if self.sync_point is not None:  # overlap: the backward all-to-all is not waited for
            return _all_to_all_lazy_grad(x, output_splits, input_splits, self.group)
        return all_to_all_single_autograd(x, output_splits, input_splits, self.group)

    def _sync(self, t: torch.Tensor, where: str) -> torch.Tensor:
        return t if self.sync_point is None else self.sync_point(t, where)

    def run(self, experts: nn.Module, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, D] sorted by global expert, counts [E] -> expert outputs [N, D], same order."""
        rows = self._sync(rows, "before_dispatch")
        send_counts = counts.view(self.size, -1)  # [ep, E_local]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
        input_splits, output_splits = split_sizes(send_counts, recv_counts, rows.shape[0])
        received = self._all_to_all(rows.contiguous(), output_splits, input_splits)  # [M, D]
        received = self._sync(received, "after_dispatch")

        num_local = send_counts.shape[1]
        segment_expert = torch.arange(num_local, device=rows.device).repeat(self.size)  # [ep*E_local]
        row_expert = torch.repeat_interleave(segment_expert, recv_counts.flatten(),
                                             output_size=received.shape[0])  # [M]
        order = torch.argsort(row_expert, stable=True)
        out = experts(received[order], recv_counts.sum(0))  # [M, D] grouped by local expert
        restored = torch.empty_like(out).index_copy_(0, order, out)  # back to (source, expert)
        restored = self._sync(restored, "before_combine")
        combined = self._all_to_all(restored, input_splits, output_splits)
        return self._sync(combined, "after_combine")


def split_sizes(send_counts: torch.Tensor, recv_counts: torch.Tensor,
                num_rows: int) -> list[list[int]]:
    """[rows sent to each rank, rows received from each rank] as host integers: the one host
    sync of the layer (the row all-to-alls need their split sizes on the host). Both
    directions in one transfer; the backward all-to-alls reuse them. Looked up at call time:
    the CPU dry run (runtime/dry_run.py) has no values to read and swaps in balanced routing
    of the `num_rows` routed rows."""
    return torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()


class _AllToAllLazyGrad(torch.autograd.Function):
    """all_to_all_single whose backward (the reverse all-to-all) hands on the collective's
    result un-waited (an AsyncCollectiveTensor, waited at its first use by the next backward
    op). torch's own autograd all-to-all waits at once, which on GPU makes the compute
    stream queue behind it; under DualPipeV's overlap the backward role hands over right
    after issuing it, so the forward role's kernels run while it is in flight. Same values."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (input_splits, output_splits), group
        return all_to_all_single(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        input_splits, output_splits = ctx.splits
        return all_to_all_single(grad.contiguous(), input_splits, output_splits, ctx.group), \
            None, None, None


@torch.compiler.disable  # a collective between two hand-over points: always eager
def _all_to_all_lazy_grad(x, output_splits, input_splits, group) -> torch.Tensor:
    return _AllToAllLazyGrad.apply(x, output_splits, input_splits, group)
