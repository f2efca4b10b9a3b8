"""`[validation]`: the mean token loss on held-out data, every `freq` steps and after the last.

The held-out loader is rebuilt for every evaluation, so each evaluation sees the same
`steps` global batches (runtime.data.loader.validation_data_config says where they come
from). At start-up those batches are read once: one log line says what an evaluation
measures (conversations, trained tokens, batches), and `steps` is capped at one pass over
the held-out set (-1: exactly one pass), with a line saying so. Reading it and evaluating
log progress every PROGRESS_EVERY_S seconds when they take that long. Each batch is split like a training batch (context-parallel shard, micro-batches) and
its loss summed over the trained tokens (labels != IGNORE_INDEX); the validation loss is
that sum over every rank with different tokens divided by their count, the same
normalisation as training, so it does not depend on the mesh.

Forward only, without gradients, on every runner but the pipeline one: a pipeline schedule
always runs its stages' backward, so there the gradients it leaves are dropped afterwards
(validation runs between optimizer steps, when no training gradient is pending). MoE routing statistics collected by these forwards are
restored, so the expert-bias update never sees validation tokens.
"""

from __future__ import annotations

import contextlib
import itertools
import time

import torch
import torch.distributed as dist

from runtime.data import build_dataloader, split_microbatches
from runtime.data.loader import validation_data_config
from runtime.model.loss import IGNORE_INDEX
from runtime.model.moe import moe_layers
from runtime.parallel.context_parallel import shard_batch


PROGRESS_EVERY_S = 30.0  # a long read or evaluation logs where it is this often


class _Progress:
    """A line every PROGRESS_EVERY_S seconds of a long phase, none for a short one."""

    def __init__(self, log, what: str, total: int):
        self.log, self.what, self.total = log, what, total
        self.start = self.last = time.monotonic()

    def tick(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            of = f"/{self.total}" if self.total > 0 else ""
            self.log(f"{self.what}: {done}{of} global batches ({now - self.start:.0f} s)")


class Validator:
    def __init__(self, cfg, tokenizer, global_batch: int, *, dp_rank: int, dp_world_size: int,
                 log):
        self.cfg = cfg.validation
        self.log = log
        data_cfg, holdout = validation_data_config(cfg.validation, cfg.data)

        def make_loader():
            return build_dataloader(
                data_cfg, tokenizer, cfg.training.seq_len, global_batch,
                dp_rank=dp_rank, dp_world_size=dp_world_size,
                document_masking=cfg.data.document_mask, split="validation", holdout=holdout)

        self._make_loader = make_loader
        census = build_dataloader(  # the global batches, the same on every rank
            data_cfg, tokenizer, cfg.training.seq_len, global_batch,
            document_masking=cfg.data.document_mask, split="validation", holdout=holdout)
        self.source_name = census.source.name
        self.steps = self._count(census)  # bad input fails before training

    def _count(self, loader) -> int:
        """Read what one evaluation reads (at most one pass over the held-out set), log it
        once, and return the global batches per evaluation: `validation.steps`, capped at
        one pass (more would repeat held-out windows and weigh them twice)."""
        asked = self.cfg.steps
        batches = tokens = 0
        progress = _Progress(self.log, "validation: reading the held-out set", asked)
        while (asked < 0 or batches < asked) and loader.epoch == 0:
            tokens += int((next(loader)["labels"] != IGNORE_INDEX).sum())
            batches += 1
            progress.tick(batches)
        one_pass = loader.epoch > 0
        state = loader.state_dict()  # chat: conversations placed or dropped so far
        seen, dropped = state.get("chat_seen", 0), state.get("chat_dropped", 0)
        if seen and one_pass and hasattr(loader.source, "stream"):
            # the last batch is filled from the set's start again: count the set itself
            seen = sum(1 for _ in itertools.takewhile(lambda c: c[0][0] == 0,
                                                      loader.source.stream()))
        what = f"{seen - dropped:,} conversations, " if seen else ""
        if dropped:
            what = f"{seen - dropped:,} conversations ({dropped:,} dropped), "
        span = "one pass over the held-out set" if one_pass else "the held-out set is longer"
        self.log(f"validation: {self.source_name}: {what}{tokens:,} trained tokens in "
                    f"{batches} global batch{'es' if batches != 1 else ''} per evaluation "
                    f"({span}), every {self.cfg.freq} steps and after the last")
        if one_pass and 0 < batches < asked:
            self.log(f"validation: steps = {asked} capped at {batches}: one pass over the "
                        f"held-out set (a longer evaluation would repeat it)")
        return batches

    def due(self, step: int, last_step: int) -> bool:
        return step % self.cfg.freq == 0 or step == last_step

    def evaluate(self, runner, model, context_parallel, *, optimizer, grad_accum: int, seq_len: int,
                 token_group, device, log) -> dict:
        """{"validation_loss", "validation_tokens"}, identical on every rank.

        runner: the train runner (eval_loss_sum, share_loss); model: whose MoE statistics are
        restored; context_parallel: the CP handle (shard_batch; None without CP);
        optimizer: its gradients are dropped after; token_group: every rank with different
        tokens (ParallelDims.group("dp_cp"), None alone)."""
        loader = self._make_loader()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        tokens = torch.zeros((), dtype=torch.float64, device=device)
        batches = 0
        progress = _Progress(log, "validation: evaluating", self.steps)
        with _moe_statistics_restored(model):
            while batches < self.steps:
                batch = shard_batch(context_parallel, next(loader), seq_len)  # as the train step does
                batches += 1
                progress.tick(batches)
                tokens += float((batch["labels"] != IGNORE_INDEX).sum())
                batch_loss = torch.zeros((), device=device)
                for micro in split_microbatches(batch, grad_accum):
                    batch_loss += runner.eval_loss_sum(micro)
                loss_sum += runner.share_loss(batch_loss).double()
        optimizer.zero_grad(set_to_none=True)  # the pipeline's zero-scaled backward
        if token_group is not None:
            dist.all_reduce(loss_sum, group=token_group)
            dist.all_reduce(tokens, group=token_group)
        return {"validation_loss": (loss_sum / tokens.clamp(min=1)).item(),
                "validation_tokens": int(tokens.item())}


@contextlib.contextmanager
def _moe_statistics_restored(model):
    layers = list(moe_layers(model))
    saved = [m.tokens_per_expert.clone() for m in layers]
    try:
        yield
    finally:
        for m, counts in zip(layers, saved, strict=True):
            m.tokens_per_expert.copy_(counts)
