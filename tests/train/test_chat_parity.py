"""Masked-loss normalisation on chat data: the loss of a step is the sum over every trained
token of the global batch divided by their global count, so gradient accumulation and any
mesh give the gradient of one big batch, although micro-batches and ranks hold different
numbers of trained tokens (gloo, CPU, the real Trainer through parallel_harness)."""

from __future__ import annotations

import pytest
import torch

from parallel_harness import (BASE, assert_parity, global_batch_overrides, run_distributed,
                              run_single, seeded, summarize)
from runtime.data import DataConfig, Tokenizer, build_dataloader
from runtime.model.loss import IGNORE_INDEX

STEPS = 3
SEQ_LEN = 384
CHAT = BASE + ["--data.dataset=chat", "--data.chat_date=2026-01-15",
               f"--training.seq_len={SEQ_LEN}"]


def test_the_masks_are_uneven():
    """The premise: rows (hence micro-batches and dp ranks) train different token counts,
    so a per-micro-batch or per-rank mean would weight tokens differently."""
    loader = build_dataloader(DataConfig(dataset="chat", chat_date="2026-01-15"),
                              Tokenizer.load(""), SEQ_LEN, 4)
    for _ in range(STEPS):
        counts = (next(loader)["labels"] != IGNORE_INDEX).sum(dim=1)
        assert len(set(counts.tolist())) > 1 and counts.min() > 0, counts


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    common = seeded(CHAT, tmp_path_factory.mktemp("chat_seed"))
    ref = run_single(common + global_batch_overrides(4, 1), STEPS)
    assert len(set(ref["losses"])) == STEPS  # training moves
    return common, ref


def test_accumulation_4x1_equals_1x4(reference):
    common, ref = reference
    got = run_single(common + global_batch_overrides(4, 1, accumulation=4), STEPS)
    assert got["info"]["grad_accum"] == 4
    print(f"4x1 accumulation: {summarize(ref, got)}")
    assert_parity(ref, got, what="4x1 accumulation")


@pytest.mark.parametrize("name, world, extra, dp", [
    ("FSDP2", 2, ["--parallelism.data_parallel_shard_degree=2"], 2),
    ("EP2", 2, ["--parallelism.data_parallel_shard_degree=2",
                "--parallelism.expert_parallel_degree=2"], 2),
    ("PP2_1F1B", 2, ["--parallelism.data_parallel_shard_degree=1",
                     "--parallelism.pipeline_parallel_degree=2",
                     "--parallelism.pipeline_parallel_schedule=1F1B",
                     "--parallelism.pipeline_parallel_microbatch_size=1"], 1),
])
def test_mesh_equals_one_process(reference, name, world, extra, dp):
    common, ref = reference
    got = run_distributed(world, common + extra + global_batch_overrides(4, dp), STEPS)
    print(f"{name}: {summarize(ref, got)}")
    assert_parity(ref, got, what=name)


def test_a_per_microbatch_mean_would_differ(reference):
    """Negative control: normalising each micro-step by its own trained tokens (the bug
    this design prevents) changes the result, so the parity above can fail."""
    common, ref = reference
    got = run_single(common + global_batch_overrides(4, 1, accumulation=4), STEPS,
                     hook="test_chat_parity:per_microbatch_mean")
    with pytest.raises(AssertionError):
        assert_parity(ref, got, what="per-micro-batch mean")


def per_microbatch_mean(rank: int, world_size: int) -> None:
    """Hook: scale each micro-batch's loss by 1 / (its own trained tokens x micro-steps)."""
    import runtime.train.trainer as trainer_module

    trainer_cls = trainer_module.Trainer
    original = trainer_cls.train_step

    def train_step(self, batch):
        runner = getattr(self, "runner", None)
        target = runner if runner is not None else self
        name = "forward_backward" if runner is not None else "_forward_backward"
        inner = getattr(target, name)
        global_tokens = float((batch["labels"] != IGNORE_INDEX).sum())

        def biased(micro, loss_scale, *args, **kwargs):
            own = float((micro["labels"] != IGNORE_INDEX).sum())
            micro_steps = batch["labels"].shape[0] // micro["labels"].shape[0]
            return inner(micro, loss_scale * global_tokens / (own * micro_steps), *args, **kwargs)

        setattr(target, name, biased)
        try:
            return original(self, batch)
        finally:
            setattr(target, name, inner)

    trainer_cls.train_step = train_step
    torch.manual_seed(0)
