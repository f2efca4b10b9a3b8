"""Progress of a long data job: a redrawn bar on a terminal, one line now and then in a log.

    progress = Progress(total_bytes, total_parts, done_bytes=resumed)
    progress.partial(k, tokens_so_far, part_bytes)  # a part under way (a worker's report)
    progress.update(part_bytes, part_tokens, k)     # a part finished
    progress.close()

The fraction done counts input bytes (parts differ in size; a dataset library's parts have
no known size: then parts count). A part under way counts its tokens so far as input bytes
at this run's bytes per token (a guess of BYTES_PER_TOKEN before a part finished), at most
99% of the part: the bar and the log line move during a long part. Speed and ETA count this
run's work only (resumed parts took no time now).
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


BYTES_PER_TOKEN = 4.0  # input bytes per token (English text) until this run finished a part


class Progress:
    def __init__(self, total_bytes: int, total_parts: int, *, done_bytes: int = 0,
                 done_parts: int = 0, out: TextIO | None = None, tty: bool | None = None,
                 every: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 label: str = "prepare", redraw: float = 0.5):
        self.out = out  # None: silent
        self.tty = bool(out is not None and out.isatty()) if tty is None else tty
        self.total_bytes, self.total_parts = total_bytes, total_parts
        self.bytes, self.parts = done_bytes, done_parts  # done, resumed ones included
        self.run_bytes = self.run_parts = self.tokens = 0  # done by this run
        self.every, self.clock, self.label, self.redraw = every, clock, label, redraw
        self.start = self.last = self.drawn = clock()
        self._under_way: dict[int, tuple[int, int]] = {}  # part -> (tokens so far, its bytes)

    def _under_way_bytes(self) -> float:
        per_token = self.run_bytes / self.tokens if self.tokens else BYTES_PER_TOKEN
        return sum(min(t * per_token, 0.99 * n) for t, n in self._under_way.values())

    def fraction(self) -> float:
        if self.total_bytes > 0:
            return min((self.bytes + self._under_way_bytes()) / self.total_bytes, 1.0)
        return self.parts / self.total_parts if self.total_parts else 1.0

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        f = self.fraction()
        tokens = self.tokens + sum(t for t, _ in self._under_way.values())
        rate = tokens / elapsed
        base = self.total_bytes or self.total_parts
        run_done = (self.run_bytes + self._under_way_bytes() if self.total_bytes
                    else self.run_parts)
        left = base * (1 - f)
        eta = _duration(left * elapsed / run_done) if run_done and f < 1 else (
            "0:00:00" if f >= 1 else "?")
        text = (f"{self.parts}/{self.total_parts} parts, {_amount(tokens)} tokens, "
                f"{_amount(rate)} tokens/s, ETA {eta}")
        if self.tty:
            bar = "#" * int(f * 24)
            return f"\r{self.label} [{bar:<24}] {f:4.0%} {text}"
        return f"{self.label}: {f:.0%} done, {text}"

    def partial(self, part: int, tokens: int, nbytes: int) -> None:
        """Part `part` (`nbytes` of input) is under way with `tokens` tokens so far."""
        self._under_way[part] = (tokens, nbytes)
        self._show(redraw=False, last=False)

    def update(self, nbytes: int, tokens: int, part: int | None = None) -> None:
        """A part finished (`part`: the one `partial` reported on)."""
        self._under_way.pop(part, None)
        self.bytes += nbytes
        self.run_bytes += nbytes
        self.parts += 1
        self.run_parts += 1
        self.tokens += tokens
        self._show(redraw=True, last=self.parts == self.total_parts)

    def _show(self, redraw: bool, last: bool) -> None:
        """Redraw the bar (at most every `redraw` s within a part), or print a log line
        every `every` s and for the last part."""
        if self.out is None:
            return
        now = self.clock()
        if self.tty:
            if redraw or now - self.drawn >= self.redraw:
                self.out.write(self.line())
                self.out.flush()
                self.drawn = now
        elif now - self.last >= self.every or last:
            print(self.line(), file=self.out, flush=True)
            self.last = now

    def close(self) -> None:
        if self.out is not None and self.tty and self.run_parts:
            self.out.write("\n")
            self.out.flush()
