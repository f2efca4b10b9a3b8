"""Conversations -> packed windows with loss masks: one conversation is one document.

Each conversation is rendered (chat template or built-in harmony), tokenized with the
special tokens matched, and its trained tokens found (`chat_masks`). Windows of `seq_len`
tokens are filled greedily with whole conversations in stream order; a conversation that
does not fit in what is left of a window starts the next one and the rest is padding.
For a conversation of L tokens at offset o of a window:

    tokens[o:o+L]        = its ids
    labels[o+i]          = ids[i+1] if token i+1 is trained else IGNORE_INDEX   (i < L-1)
    labels[o+L-1]        = IGNORE_INDEX (nothing follows inside the document)
    document_ids[o:o+L]  = its index in the window; positions[o:o+L] = 0..L-1

Padding: pad tokens, IGNORE_INDEX labels, a document of its own. A conversation longer
than seq_len is cut to its first seq_len tokens (`data.chat_overflow = "truncate"`) or
skipped ("drop"); both are counted (`overflow_counts`). Windows never share a
conversation, so the state is just the cursor of the next conversation to place: a
resumed stream re-renders from there and yields exactly the windows it would have.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from runtime.data.chat_masks import HarmonyIds, trained_tokens
from runtime.model.loss import IGNORE_INDEX

OVERFLOW = ("truncate", "drop")


class ChatPackedStream:
    """Same interface as the text `PackedStream`: next_windows / state_dict / load_state_dict."""

    def __init__(self, source, tokenizer, renderer, seq_len: int, *,
                 loss_on: str = "last_assistant", overflow: str = "truncate",
                 document_masking: bool = True):
        if overflow not in OVERFLOW:
            raise ValueError(f"data.chat_overflow must be one of {', '.join(OVERFLOW)}, "
                             f"got {overflow!r}")
        if seq_len < 2:
            raise ValueError(f"data: seq_len must be >= 2 for chat data, got {seq_len}")
        self.source, self.tokenizer, self.renderer = source, tokenizer, renderer
        self.seq_len, self.loss_on, self.overflow = seq_len, loss_on, overflow
        self.document_masking = document_masking
        self.harmony_ids = HarmonyIds.of(tokenizer)
        self.overflow_counts = {"truncated": 0, "dropped": 0}
        self._reset((0, 0, 0))

    def _reset(self, cursor) -> None:
        self._stream: Iterator = self.source.stream(cursor)
        self._pending = None  # (cursor, ids, trained) that did not fit the last window

    # ------------------------------------------------------------------ documents
    def encode(self, conversation) -> tuple[np.ndarray, np.ndarray]:
        """(ids, trained) of one conversation, both [L]."""
        text = self.renderer.render(conversation.messages, tools=conversation.tools,
                                    reasoning_effort=conversation.reasoning_effort)
        ids = np.asarray(self.tokenizer.encode(text, allow_special=True), dtype=np.int64)
        trained = trained_tokens(ids, self.tokenizer.decode, self.harmony_ids, self.loss_on)
        return ids, trained

    def _next_document(self):
        if self._pending is not None:
            doc, self._pending = self._pending, None
            return doc
        while True:
            cursor, conversation = next(self._stream)
            ids, trained = self.encode(conversation)
            if len(ids) <= self.seq_len:
                return cursor, ids, trained
            if self.overflow == "drop":
                self.overflow_counts["dropped"] += 1
                continue
            self.overflow_counts["truncated"] += 1
            return cursor, ids[: self.seq_len], trained[: self.seq_len]

    # ------------------------------------------------------------------ windows
    def _window(self) -> dict[str, np.ndarray]:
        S = self.seq_len
        tokens = np.full(S, self.tokenizer.pad_id, dtype=np.int64)
        labels = np.full(S, IGNORE_INDEX, dtype=np.int64)
        doc_ids = np.zeros(S, dtype=np.int64)
        positions = np.zeros(S, dtype=np.int64)
        used, n_docs = 0, 0
        while True:
            doc = self._next_document()
            _, ids, trained = doc
            if used + len(ids) > S:
                self._pending = doc
                break
            L = len(ids)
            tokens[used: used + L] = ids
            labels[used: used + L - 1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
            doc_ids[used: used + L] = n_docs
            positions[used: used + L] = np.arange(L)
            used, n_docs = used + L, n_docs + 1
            if used == S:
                break
        doc_ids[used:] = n_docs
        positions[used:] = np.arange(S - used)
        if not self.document_masking:
            doc_ids[:] = 0
            positions[:] = np.arange(S)
        return {"tokens": tokens, "labels": labels, "document_ids": doc_ids,
                "positions": positions}

    def next_windows(self, n: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        """The next `n` windows (all are built: each depends on the previous one's leftover);
        returns the rows in `rows` as int64 arrays [len(rows), seq_len]."""
        windows = [self._window() for _ in range(n)]
        picked = windows[rows] if rows is not None else windows
        return {k: np.stack([w[k] for w in picked]) for k in windows[0]}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The cursor of the next conversation to place (a pending one, else the stream's)."""
        if self._pending is None:
            self._pending = self._next_document()
        epoch, shard, index = self._pending[0]
        # The render date is part of the position: `Current date` changes the tokens.
        return {"epoch": int(epoch), "shard": int(shard), "index": int(index), "offset": 0,
                "chat_date": self.renderer.date,
                **{f"chat_{k}": v for k, v in self.overflow_counts.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self._reset((int(sd["epoch"]), int(sd["shard"]), int(sd["index"])))
        self.renderer.date = sd.get("chat_date", self.renderer.date)
        for k in self.overflow_counts:
            self.overflow_counts[k] = int(sd.get(f"chat_{k}", 0))
