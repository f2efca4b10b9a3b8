"""Context parallelism: the sequence is split over the `cp` ranks for everything, and
attention gathers the keys/values of the whole sequence (all-gather CP).

Why all-gather rather than ring attention: every query then sees all of its keys in one
softmax, so the learned sinks, sliding windows and document masks stay exact with either
attention backend (the mask predicate runs on global indices), and the backward of the
all-gather (a reduce-scatter) is autograd's. K/V are GQA-sized (8 of 64 heads for gpt-oss),
so the gathered tensors are small next to the queries each rank keeps.

Load balancing ("headtail"): the sequence is cut into 2*cp chunks and rank r keeps chunks r
and 2*cp-1-r, so every rank holds an equal share of early (cheap) and late (expensive)
causal queries. Positions travel with the tokens, so RoPE stays right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_gather_tensor_autograd


def local_sequence_indices(seq_len: int, cp: int, rank: int, load_balancer: str) -> torch.Tensor:
    """Global positions (in the packed window) of the tokens rank `rank` keeps: [seq_len // cp]."""
    if load_balancer == "headtail":
        chunk = seq_len // (2 * cp)
        head = torch.arange(rank * chunk, (rank + 1) * chunk)
        tail_chunk = 2 * cp - 1 - rank
        tail = torch.arange(tail_chunk * chunk, (tail_chunk + 1) * chunk)
        return torch.cat([head, tail])
    chunk = seq_len // cp
    return torch.arange(rank * chunk, (rank + 1) * chunk)


@dataclass
class ContextParallel:
    group: dist.ProcessGroup
    rank: int
    size: int
    load_balancer: str

    def local_indices(self, seq_len: int, device) -> torch.Tensor:
        return local_sequence_indices(seq_len, self.size, self.rank, self.load_balancer).to(device)

    def gathered_indices(self, seq_len: int, device) -> torch.Tensor:
        """Global positions of the keys after an all-gather (rank-ordered): [seq_len]."""
        return torch.cat([local_sequence_indices(seq_len, self.size, r, self.load_balancer)
                          for r in range(self.size)]).to(device)

    def shard(self, t: torch.Tensor, seq_len: int) -> torch.Tensor:
        """This rank's part of a [B, S, ...] tensor along dim 1."""
        return t.index_select(1, self.local_indices(seq_len, t.device))

    def gather_sequence(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """All-gather along `dim` (differentiable: the backward reduce-scatters)."""
        return all_gather_tensor_autograd(t.contiguous(), gather_dim=dim, group=self.group)

    def gather_ids(self, t: torch.Tensor) -> torch.Tensor:
        """All-gather integer ids [B, S_local] -> [B, S] (no gradient)."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)


def apply_cp(model: nn.Module, cp_mesh, load_balancer: str) -> ContextParallel:
    """Make the model (and its attention layers) context parallel over `cp_mesh`; returns the
    handle (parallelize() hands it to its callers in its record). The modules keep it as
    their own runtime state: their forward reads it (the masks on global positions, the
    K/V all-gather), just as it reads their weights."""
    cp = ContextParallel(group=cp_mesh.get_group(), rank=cp_mesh.get_local_rank(),
                         size=cp_mesh.size(), load_balancer=load_balancer)
    model.context_parallel = cp
    for block in model.layers.values():
        block.attention.context_parallel = cp
    return cp


def shard_batch(cp: ContextParallel | None, batch: dict, seq_len: int) -> dict:
    """This rank's share of every sequence of a batch under context parallel `cp` (positions
    travel along, so RoPE and masks stay right); the batch itself without CP (None). The train
    step and validation both cut through here, so they see the same tokens."""
    if cp is None:
        return batch
    return {k: cp.shard(v, seq_len) for k, v in batch.items()}
