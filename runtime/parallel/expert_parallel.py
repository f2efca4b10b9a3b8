"""Expert parallelism: each rank of the `ep` mesh owns num_experts/ep whole experts, and the
routed token rows travel to their expert's rank and back by all-to-all with uneven splits.

Per MoE layer, on every EP rank (its own tokens, routed locally):
    rows [N, D] sorted by global expert id, counts [E]
      -> send_counts [ep, E_local]   rows for each destination rank, per its local expert
      -> all-to-all of counts        recv_counts [ep, E_local] (rows arriving per source/expert)
      -> all-to-all of rows          received [M, D], ordered (source rank, local expert)
      -> regroup by local expert, grouped GEMM on the local experts, undo the regrouping
      -> all-to-all back             [N, D] in the original order
The row all-to-alls are autograd functions (their backward is the reverse all-to-all), so
each expert's gradient sums the contributions of every rank's tokens.

Gradient scale: every rank's loss carries the factor (dp x cp) / global_tokens, and data-
parallel reductions average over dp x cp ranks. Expert gradients already sum every EP rank's
contribution through the all-to-all, and FSDP then averages them only over the remaining
`dp_shard_mod_ep` (x replicate) ranks = dp x cp / ep, so the experts' weight gradients are
multiplied by 1/ep (`GroupedExperts.grad_scale`; FSDP's own divide factor would need
PREMUL_SUM, which gloo lacks), making the expert update equal the single-process one.
When EP borrows the TP ranks, ep = dp_shard_in_ep x cp x tp but the tp ranks of one sample
hold disjoint tokens of one loss (replicated over tp), so they count once: scale tp / ep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class ExpertParallel:
    group: dist.ProcessGroup
    size: int
    # DualPipeV's EP overlap (dualpipe_overlap.py) sets this: the rows pass through it right
    # before and after each all-to-all, where its forward and backward roles hand over.
    sync_point: Callable[[torch.Tensor, str], torch.Tensor] | None = None

    def _all_to_all(self, x: torch.Tensor, output_splits, input_splits) -> torch.Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd

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
        input_splits = send_counts.sum(1).tolist()  # host sync: split sizes must be known
        output_splits = recv_counts.sum(1).tolist()
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


class _AllToAllLazyGrad(torch.autograd.Function):
    """all_to_all_single whose backward (the reverse all-to-all) hands on the collective's
    result un-waited (an AsyncCollectiveTensor, waited at its first use by the next backward
    op). torch's own autograd all-to-all waits at once, which on GPU makes the compute
    stream queue behind it; under DualPipeV's overlap the backward role hands over right
    after issuing it, so the forward role's kernels run while it is in flight. Same values."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        from torch.distributed._functional_collectives import all_to_all_single

        ctx.splits, ctx.group = (input_splits, output_splits), group
        return all_to_all_single(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed._functional_collectives import all_to_all_single

        input_splits, output_splits = ctx.splits
        return all_to_all_single(grad.contiguous(), input_splits, output_splits, ctx.group), \
            None, None, None


@torch.compiler.disable  # a collective between two hand-over points: always eager
def _all_to_all_lazy_grad(x, output_splits, input_splits, group) -> torch.Tensor:
    return _AllToAllLazyGrad.apply(x, output_splits, input_splits, group)


def apply_ep(model: nn.Module, ep_mesh, *, etp_mesh=None, tp_in_ep: int = 1) -> None:
    """Shard every MoE layer's experts on dim 0 over `ep_mesh` and route rows by all-to-all.

    etp_mesh: the 2-D (ep, tp) mesh for expert tensor parallelism (ETP): experts are then also
        sharded along their hidden dim F over tp (mlp1 [E, 2F, D] Shard(1), mlp2 [E, D, F]
        Shard(2)); mlp2_bias is added as mlp2_bias/tp by every TP rank, since the MoE output
        is a partial sum over tp (runtime/parallel/tensor_parallel.py). The all-to-all runs over `ep_mesh`.
    tp_in_ep: how many TP ranks `ep_mesh` includes (EP borrowing TP ranks, etp == 1). Those
        ranks hold different tokens of the same samples, so they count as one data-parallel
        rank in the gradient scale below.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    ep = ExpertParallel(group=ep_mesh.get_group(), size=ep_mesh.size())
    mesh, placements = ep_mesh, {name: [Shard(0)] for name in _EXPERT_PARAMS}
    if etp_mesh is not None:
        mesh = etp_mesh
        placements = {"mlp1_weight": [Shard(0), Shard(1)], "mlp1_bias": [Shard(0), Shard(1)],
                      "mlp2_weight": [Shard(0), Shard(2)], "mlp2_bias": [Shard(0), Replicate()]}
    for block in model.layers.values():
        experts = block.moe.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.data, mesh, placements[name], src_data_rank=None)
            experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        if etp_mesh is not None:
            from runtime.parallel.tensor_parallel import _swap_parameters, sum_grad_over

            tp_dim = etp_mesh.mesh_dim_names[1]
            _swap_parameters(experts, experts, {"mlp2_bias": sum_grad_over(tp_dim, count_once=True)})
        block.moe.expert_parallel = ep
        experts.grad_scale = tp_in_ep / ep.size


_EXPERT_PARAMS = ("mlp1_weight", "mlp1_bias", "mlp2_weight", "mlp2_bias")
