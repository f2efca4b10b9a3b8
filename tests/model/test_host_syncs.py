"""Host synchronisations (device -> host reads: `.item()`, `.tolist()`) per step, counted on
CPU with patched Tensor methods: on a GPU each one stalls the CPU until the device catches up.
"""

from __future__ import annotations

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
def one_rank_group(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # monkeypatch: restored afterwards (a leaked MASTER_PORT would reach later launch tests)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
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


def test_one_training_step_reads_the_device_once(tmp_path, monkeypatch):
    """A whole optimizer step on one process (fused loss, clipping on, logging on): the loss
    and the grad norm come back in one transfer (before: two `.item()`s of the token count,
    one of the loss, one of the grad norm = 4). The trained-token count is taken from the
    batch on the host. With data-parallel ranks one more read remains (the all-reduced count:
    the backward needs the normaliser as a number), and the stop-signal agreement."""
    from runtime.train.config.loader import load_config
    from runtime.train.trainer import Trainer

    trainer = Trainer(load_config(None, [
        "--model.flavor=tiny", "--training.seq_len=32", "--training.device=cpu",
        "--training.local_batch_size=2", "--training.max_norm=1.0", "--training.steps=3",
        # fused AdamW as on CUDA (the CPU foreach path reads its step counters with .item())
        "--optimizer.implementation=fused",
        "--checkpoint.enable=false", "--metrics.log_freq=1", f"--job.dump_folder={tmp_path}"]))
    batches = iter(trainer.dataloader)
    trainer.optimizer_step(next(batches))  # warm-up step (lazy state)
    syncs = SyncCounter(monkeypatch)
    trainer.step += 1
    loss, grad_norm, lr = trainer.optimizer_step(next(batches))
    trainer.metrics.log(trainer.step, loss, grad_norm, lr)
    assert syncs.calls == ["tolist"]
