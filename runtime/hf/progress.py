"""A progress display for long checkpoint reads/writes: rank 0 only.

tqdm when it is installed and stderr is a terminal; otherwise (Slurm log files, where tqdm's
carriage returns turn into one giant line) a plain line every `interval_s` seconds and at the end.
"""

from __future__ import annotations

import sys
import time

import torch.distributed as dist


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Progress:
    def __init__(self, total: int, desc: str, *, unit: str = "tensor", enabled: bool = True,
                 interval_s: float = 10.0):
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = enabled and total > 0 and _is_rank0()
        self.done = 0
        self.interval_s = interval_s
        self._start = self._last = time.monotonic()
        self._bar = self._make_bar() if self.enabled else None

    def _make_bar(self):
        if not sys.stderr.isatty():
            return None
        try:
            from tqdm.auto import tqdm  # optional (not a declared dependency): a bar only on a tty
        except ImportError:
            return None
        return tqdm(total=self.total, desc=self.desc, unit=self.unit, dynamic_ncols=True)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s or self.done >= self.total:
            self._last = now
            suffix = f" ({note})" if note else ""
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}s, {now - self._start:.0f}s{suffix}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
