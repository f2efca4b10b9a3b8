"""Host synchronisations (device -> host reads: `.item()`, `.tolist()`) per step, counted on
CPU with patched Tensor methods: on a GPU each one stalls the CPU until the device catches up.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

from runtime.model.args import FLAVORS
from runtime.model.moe import GroupedExperts
from runtime.parallel.expert_parallel import ExpertParallel


class SyncCounter:
    """Counts Tensor.item / Tensor.tolist calls while active."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in ("item", "tolist"):
            real = getattr(torch.Tensor, name)

            def counted(t, *args, _real=real, _name=name, **kwargs):
                self.calls.append(_name)
                return _real(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_expert_parallel_dispatch_reads_split_sizes_once(one_rank_group, monkeypatch):
    """One transfer of both directions' split sizes per MoE layer forward (was two); the
    backward all-to-alls reuse them (no read at all)."""
    args = FLAVORS["tiny"]
    experts = GroupedExperts(args)
    experts.init_weights(0.02, 0.02)
    ep = ExpertParallel(group=one_rank_group, size=1)
    counts = torch.tensor([3, 0, 2, 5])  # [E]: an expert without tokens
    rows = torch.randn(int(counts.sum()), args.dim, requires_grad=True)
    syncs = SyncCounter(monkeypatch)
    out = ep.run(experts, rows, counts)
    assert syncs.calls == ["tolist"]
    out.sum().backward()
    assert syncs.calls == ["tolist"]
    torch.testing.assert_close(out, experts(rows, counts))  # one rank: plain experts
