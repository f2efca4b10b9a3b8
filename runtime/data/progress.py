"""Progress of a long data job: a redrawn bar on a terminal, one line now and then in a log.

    progress = Progress(total_bytes, total_parts, done_bytes=resumed)
    progress.update(part_bytes, part_tokens)   # a part finished
    progress.close()

The fraction done counts input bytes (parts differ in size; a dataset library's parts have
no known size: then parts count). Speed and ETA count this run's work only (resumed parts
took no time now).
"""

from __future__ import annotations

import time
from typing import Callable, TextIO


def _amount(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, total_bytes: int, total_parts: int, *, done_bytes: int = 0,
                 done_parts: int = 0, out: TextIO | None = None, tty: bool | None = None,
                 every: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 label: str = "prepare"):
        self.out = out  # None: silent
        self.tty = bool(out is not None and out.isatty()) if tty is None else tty
        self.total_bytes, self.total_parts = total_bytes, total_parts
        self.bytes, self.parts = done_bytes, done_parts  # done, resumed ones included
        self.run_bytes = self.run_parts = self.tokens = 0  # done by this run
        self.every, self.clock, self.label = every, clock, label
        self.start = self.last = clock()

    def fraction(self) -> float:
        if self.total_bytes > 0:
            return min(self.bytes / self.total_bytes, 1.0)
        return self.parts / self.total_parts if self.total_parts else 1.0

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        f = self.fraction()
        rate = self.tokens / elapsed
        base = self.total_bytes or self.total_parts
        run_done = self.run_bytes if self.total_bytes else self.run_parts
        left = base * (1 - f)
        eta = _duration(left * elapsed / run_done) if run_done and f < 1 else (
            "0:00:00" if f >= 1 else "?")
        text = (f"{self.parts}/{self.total_parts} parts, {_amount(self.tokens)} tokens, "
                f"{_amount(rate)} tokens/s, ETA {eta}")
        if self.tty:
            bar = "#" * int(f * 24)
            return f"\r{self.label} [{bar:<24}] {f:4.0%} {text}"
        return f"{self.label}: {f:.0%} done, {text}"

    def update(self, nbytes: int, tokens: int) -> None:
        self.bytes += nbytes
        self.run_bytes += nbytes
        self.parts += 1
        self.run_parts += 1
        self.tokens += tokens
        now = self.clock()
        if self.out is None:
            return
        if self.tty:
            self.out.write(self.line())
            self.out.flush()
        elif now - self.last >= self.every or self.parts == self.total_parts:
            print(self.line(), file=self.out, flush=True)
            self.last = now

    def close(self) -> None:
        if self.out is not None and self.tty and self.run_parts:
            self.out.write("\n")
            self.out.flush()
