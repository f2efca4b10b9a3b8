"""Whole-document packing for chat: each conversation stays inside one window.

Windows of `seq_len` tokens are filled greedily with whole Documents in stream order; a
Document that does not fit in what is left of a window starts the next one and the rest
of the window is padding (pad tokens, untrained, a document of its own). The windows
have the text stream's layout, [seq_len + 1] tokens / document serials / trained flags,
so `window_batch` turns them into model inputs the same way: per-document positions and
ids, and labels IGNORE_INDEX where the label token is untrained. The extra last column
is padding, so a document's last token predicts nothing.

A Document longer than seq_len is cut to its first seq_len tokens
(`data.chat_overflow = "truncate"`) or skipped ("drop"); both are counted
(`overflow_counts`, in the loader state and the step log; a resume that starts at a cut
conversation counts it once more). Windows never share a
document, so the state is the cursor of the next document to place: a resumed stream
re-encodes from there and yields exactly the windows it would have.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from runtime.data.errors import DataError
from runtime.data.packing import Document

OVERFLOW = ("truncate", "drop")


class WholeDocumentStream:
    """The `PackedStream` interface (next_windows / state_dict / load_state_dict) for
    documents that must not be split across windows."""

    def __init__(self, items: Callable[[tuple], Iterator[tuple[tuple, object]]],
                 encode: Callable[[list], list[Document]], seq_len: int, *, pad_id: int,
                 overflow: str = "truncate", batch_docs: int = 64):
        if overflow not in OVERFLOW:
            raise DataError(f"data.chat_overflow must be one of {', '.join(OVERFLOW)}, "
                            f"got {overflow!r}")
        if seq_len < 2:
            raise DataError(f"data: seq_len must be >= 2 for whole documents, got {seq_len}")
        self.items, self.encode, self.seq_len = items, encode, seq_len
        self.pad_id, self.overflow = pad_id, overflow
        self.batch_docs = max(1, int(batch_docs))
        self.overflow_counts = {"truncated": 0, "dropped": 0}
        self._reset((0, 0, 0))

    def _reset(self, cursor: tuple) -> None:
        self._items_iter = self.items(cursor)
        self._queue: list[tuple[tuple, Document]] = []  # encoded, not yet placed

    def _next_document(self) -> tuple[tuple, Document]:
        while True:
            if not self._queue:
                batch = [next(self._items_iter) for _ in range(self.batch_docs)]
                docs = self.encode([item for _, item in batch])
                self._queue = [(c, d) for (c, _), d in zip(batch, docs, strict=True)]
            cursor, doc = self._queue[0]
            if len(doc.tokens) <= self.seq_len:
                return cursor, doc
            self._queue.pop(0)
            self.overflow_counts["truncated" if self.overflow == "truncate" else "dropped"] += 1
            if self.overflow == "truncate":
                cut = Document(np.asarray(doc.tokens)[: self.seq_len],
                               None if doc.trained is None else np.asarray(doc.trained)[: self.seq_len])
                self._queue.insert(0, (cursor, cut))
                return cursor, cut

    def _window(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        width = self.seq_len + 1
        tokens = np.full(width, self.pad_id, dtype=np.int64)
        serials = np.zeros(width, dtype=np.int64)
        trained = np.zeros(width, dtype=bool)
        used = n_docs = 0
        while True:
            _, doc = self._next_document()
            n = len(doc.tokens)
            if used + n > self.seq_len:
                break
            self._queue.pop(0)
            tokens[used: used + n] = doc.tokens
            serials[used: used + n] = n_docs
            trained[used: used + n] = True if doc.trained is None else doc.trained
            used, n_docs = used + n, n_docs + 1
        serials[used:] = n_docs  # padding (and the extra last column) is one more document
        return tokens, serials, trained

    def next_windows(self, n: int, rows: slice | None = None) -> tuple[np.ndarray, ...]:
        """The next `n` windows, (tokens, doc_serials, trained) each [len(rows), seq_len + 1];
        all n are built (each starts where the previous one stopped)."""
        windows = [self._window() for _ in range(n)]
        picked = windows[rows] if rows is not None else windows
        return tuple(np.stack(column) for column in zip(*picked, strict=True))

    def state_dict(self) -> dict:
        cursor, _ = self._next_document()  # the next document to place
        epoch, shard, index = cursor
        state = {"epoch": int(epoch), "shard": int(shard), "index": int(index), "offset": 0,
                 **{f"chat_{k}": v for k, v in self.overflow_counts.items()}}
        if getattr(self.encode, "date", None):  # a chat render date changes the tokens
            state["chat_date"] = self.encode.date
        return state

    def load_state_dict(self, sd: dict) -> None:
        self._reset((int(sd["epoch"]), int(sd["shard"]), int(sd["index"])))
        for k in self.overflow_counts:
            self.overflow_counts[k] = int(sd.get(f"chat_{k}", 0))
        if sd.get("chat_date") and hasattr(self.encode, "date"):
            self.encode.date = sd["chat_date"]
