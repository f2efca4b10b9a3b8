"""Graceful stop on SIGTERM/SIGUSR1 (preemption, Slurm time limit) and non-finite losses or
gradient norms (stop, or skip the step up to training.max_skipped_steps times)."""

from __future__ import annotations

import math
import signal

import torch
import torch.distributed as dist


class NonFiniteLossError(RuntimeError):
    pass


class StopSignal:
    """Records SIGUSR1/SIGTERM; the trainer finishes the step, saves and exits for requeue.

    Ranks may receive the signal at slightly different times, so `should_stop` agrees on
    it across ranks (one tiny all-reduce per step) before anyone starts saving.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self, device: torch.device) -> bool:
        flag = 1.0 if self.received is not None else 0.0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([flag], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = t.item()
        return flag > 0


def check_finite(value: float, step: int, policy: str, quantity: str = "loss") -> bool:
    """True if the step may proceed; raises on a non-finite `quantity` ("loss", "grad norm")
    unless policy == 'skip'."""
    if math.isfinite(value):
        return True
    if policy == "skip":
        return False
    raise NonFiniteLossError(
        f"non-finite {quantity} {value} at step {step} "
        f"(set training.on_nonfinite='skip' to skip such steps)")


def count_skipped_step(skipped: int, limit: int, step: int, quantity: str, value: float) -> str:
    """After a skipped step (`skipped` so far, this one included): the line to log, or
    NonFiniteLossError once more than `limit` steps were skipped."""
    if skipped > limit:
        raise NonFiniteLossError(
            f"non-finite {quantity} {value} at step {step}: {skipped} steps skipped, more than "
            f"training.max_skipped_steps ({limit}); the run stops (the last checkpoint is intact)")
    return f"step {step}: non-finite {quantity} {value}, step skipped ({skipped} of at most {limit})"
