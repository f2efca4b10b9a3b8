"""A background thread that produces batches ahead of the training thread, in order.

Tokenization (HF `tokenizers`, Rust) and numpy gathers release the GIL, so producing the
next batches overlaps the training step instead of adding to it.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable


class Prefetcher:
    """`get()` returns the results of successive `produce()` calls, computed up to `depth`
    ahead on a daemon thread started by the first `get()`. An exception in `produce` is
    raised by the `get()` that would have returned its result."""

    def __init__(self, produce: Callable[[], object], depth: int):
        self.produce, self.depth = produce, max(1, int(depth))
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self, q: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = (True, self.produce())
            except BaseException as e:  # handed to the consumer, which raises it
                item = (False, e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return

    def get(self):
        if self._thread is None:
            self._queue, self._stop = queue.Queue(self.depth), threading.Event()
            self._thread = threading.Thread(target=self._run, args=(self._queue, self._stop),
                                            name="data-prefetch", daemon=True)
            self._thread.start()
        ok, value = self._queue.get()
        if not ok:
            self._thread = None
            raise value
        return value

    def stop(self) -> None:
        """Stop the thread and drop what it produced (the next get() starts afresh)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
