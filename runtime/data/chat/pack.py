"""Whole-document packing for chat: each conversation stays inside one window.

Windows of `seq_len` tokens are filled with whole Documents; what is left of a window is
padding (pad tokens, untrained, a document of its own). The windows have the text stream's
layout, [seq_len + 1] tokens / document serials / trained flags, so `window_batch` turns
them into model inputs the same way: per-document positions and ids, and labels
IGNORE_INDEX where the label token is untrained. The extra last column is padding, so a
document's last token predicts nothing.

`data.pack`:
  "sequential"  documents in stream order; one that does not fit what is left of a window
                starts the next window.
  "best_fit"    each window starts with the oldest waiting document, then takes, while any
                fits, the longest one that fits among the next `pack_buffer` documents
                (ties: the older). Every document is placed within `pack_buffer` windows.

A conversation longer than seq_len (`data.chat_overflow`):
  "cut_turns"   earlier turns are cut from the left, whole turns at a time, keeping the
                system/developer message and the tools (the `shorten` callable re-renders)
  "truncate"    its first seq_len tokens
  "drop"        skipped
A conversation that would train no token (all its trained tokens cut, or none to begin
with) is dropped: it is never trained on as pure prompt. Counts (conversations seen, cut,
dropped: counted when encoded; window and padding tokens) are in the loader state and the
step log. Dropping
every conversation of an epoch, or more than `max_dropped_fraction` of them (checked once
100 were seen or an epoch was), is a DataError: one line, exit 2, never an endless search.

State: the cursor of the oldest document not yet placed plus the stream ordinals (relative
to it) of later documents already consumed (placed out of order by best_fit, or dropped);
a resumed stream re-encodes from the cursor, skips those, and yields exactly the windows it
would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from runtime.errors import DataError
from runtime.data.packing import Document

OVERFLOW = ("cut_turns", "truncate", "drop")
PACKING = ("sequential", "best_fit")
FRACTION_MIN_SEEN = 100  # conversations seen before data.max_dropped_fraction is enforced
COUNTS = ("seen", "truncated", "dropped", "window_tokens", "padding_tokens")


@dataclass
class _Drops:
    """Why conversations were dropped (since this stream started), for the messages."""

    too_long: int = 0
    untrained: int = 0
    longest: int = 0

    def add(self, n: int, too_long: bool) -> None:
        self.too_long += too_long
        self.untrained += not too_long
        self.longest = max(self.longest, n)


@dataclass
class _Epoch:
    """What one epoch of the stream did so far (for the all-dropped check)."""

    epoch: int
    whole: bool  # seen from its first document
    kept: int = 0
    drops: _Drops = field(default_factory=_Drops)


@dataclass
class _Waiting:
    ordinal: int  # stream position since the last reset
    cursor: tuple
    doc: Document
    cut: bool  # shortened to fit
    length: int = field(init=False)

    def __post_init__(self):
        self.length = len(self.doc)


def _trains(doc: Document) -> bool:
    return doc.trained is None or bool(np.asarray(doc.trained).any())


def overflow_outcome(item, doc: Document, seq_len: int, overflow: str,
                     shorten: Callable[[object, int], Document | None] | None
                     ) -> tuple[Document | None, int, bool]:
    """(the document as packed, or None when it is dropped; its encoded length; whether it
    was longer than seq_len) of one encoded item under `overflow`. The one rule for the
    streamed path and `prepare` (runtime.data.chat.prepared), so both keep the same tokens."""
    n, cut = len(doc), False
    if n > seq_len:
        cut = True
        if overflow == "truncate":
            doc = Document(np.asarray(doc.tokens)[:seq_len],
                           None if doc.trained is None else np.asarray(doc.trained)[:seq_len])
        elif overflow == "cut_turns":
            doc = shorten(item, seq_len)
        else:
            doc = None
    if doc is None or not _trains(doc):
        return None, n, cut
    return doc, n, cut


class WholeDocumentStream:
    """The `PackedStream` interface (next_windows / state_dict / load_state_dict) for
    documents that must not be split across windows."""

    def __init__(self, items: Callable[[tuple], Iterator[tuple[tuple, object]]],
                 encode: Callable[[list], list[Document]], seq_len: int, *, pad_id: int,
                 overflow: str = "cut_turns", batch_docs: int = 64,
                 shorten: Callable[[object, int], Document | None] | None = None,
                 max_dropped_fraction: float = 1.0, pack: str = "sequential",
                 pack_buffer: int = 64, name: str = "the data"):
        if overflow not in OVERFLOW:
            raise DataError(f"data.chat_overflow must be one of {', '.join(OVERFLOW)}, "
                            f"got {overflow!r}")
        if pack not in PACKING:
            raise DataError(f"data.pack must be one of {', '.join(PACKING)}, got {pack!r}")
        if overflow == "cut_turns" and shorten is None:
            raise DataError("data.chat_overflow = 'cut_turns' needs conversations to shorten")
        if seq_len < 2:
            raise DataError(f"data: seq_len must be >= 2 for whole documents, got {seq_len}")
        self.items, self.encode, self.seq_len = items, encode, seq_len
        self.pad_id, self.overflow, self.shorten = pad_id, overflow, shorten
        self.batch_docs = max(1, int(batch_docs))
        self.max_dropped_fraction = float(max_dropped_fraction)
        self.pack, self.pack_buffer = pack, max(1, int(pack_buffer))
        self.name = name
        self.counts = dict.fromkeys(COUNTS, 0)
        self._reset((0, 0, 0), ())

    @property
    def overflow_counts(self) -> dict:
        return {"truncated": self.counts["truncated"], "dropped": self.counts["dropped"]}

    def _reset(self, cursor: tuple, consumed) -> None:
        self._items_iter = self.items(tuple(cursor))
        self._next_ordinal = 0
        self._consumed = set(int(o) for o in consumed)  # ordinals after the oldest waiting
        self._waiting: list[_Waiting] = []  # encoded, not yet placed, in stream order
        self._epoch: _Epoch | None = None
        self._drops = _Drops()
        self._start_cursor = tuple(cursor)

    # ------------------------------------------------------------------ documents
    def _fill(self, n: int) -> None:
        """Encode documents until `n` wait to be placed (dropped ones are consumed here)."""
        while len(self._waiting) < n:
            batch = []
            while len(batch) < self.batch_docs:
                cursor, item = next(self._items_iter)
                ordinal, self._next_ordinal = self._next_ordinal, self._next_ordinal + 1
                if ordinal in self._consumed:
                    continue  # placed or dropped before the resume
                batch.append((ordinal, cursor, item))
            docs = self.encode([item for _, _, item in batch])
            for (ordinal, cursor, item), doc in zip(batch, docs, strict=True):
                self._admit(ordinal, cursor, item, doc)

    def _admit(self, ordinal: int, cursor: tuple, item, doc: Document) -> None:
        self._watch(cursor)
        doc, n, cut = self._outcome(item, doc)
        self.counts["seen"] += 1
        if doc is None:
            self._consumed.add(ordinal)
            self._epoch.drops.add(n, too_long=cut)
            self._drops.add(n, too_long=cut)
            self.counts["dropped"] += 1
        else:
            self._epoch.kept += 1
            self.counts["truncated"] += cut
            self._waiting.append(_Waiting(ordinal, cursor, doc, cut))
        if self.counts["seen"] >= FRACTION_MIN_SEEN:
            self._check_fraction()

    def _outcome(self, item, doc: Document) -> tuple[Document | None, int, bool]:
        """data.chat_overflow applied to one encoded item (prepared chat data: applied when
        it was prepared, runtime.data.chat.prepared)."""
        return overflow_outcome(item, doc, self.seq_len, self.overflow, self.shorten)

    def _watch(self, cursor: tuple) -> None:
        epoch = int(cursor[0])
        if self._epoch is None:
            self._epoch = _Epoch(epoch, whole=tuple(cursor) == (epoch, 0, 0)
                                 or self._start_cursor == (epoch, 0, 0))
        elif epoch != self._epoch.epoch:
            finished = self._epoch
            dropped = finished.drops.too_long + finished.drops.untrained
            if finished.whole and not finished.kept:
                raise DataError(f"data: every conversation of {self.name} is dropped ({dropped} "
                                f"in one epoch: {self._describe(finished.drops)}): nothing to "
                                "train on")
            self._check_fraction()  # an epoch was seen: the share is known
            self._epoch = _Epoch(epoch, whole=True)

    def _describe(self, drops: _Drops) -> str:
        parts = []
        if drops.too_long:
            parts.append(f"{drops.too_long} longer than training.seq_len = {self.seq_len} with "
                         f"data.chat_overflow = {self.overflow!r}, the longest has "
                         f"{drops.longest} tokens")
        if drops.untrained:
            parts.append(f"{drops.untrained} with no trained token (data.loss_on, 'train' flags)")
        return "; ".join(parts)

    def _check_fraction(self) -> None:
        seen, dropped = self.counts["seen"], self.counts["dropped"]
        if self.max_dropped_fraction >= 1.0 or dropped <= self.max_dropped_fraction * seen:
            return
        raise DataError(
            f"data: {dropped} of {seen} conversations of {self.name} dropped "
            f"({100 * dropped / seen:.0f}%), more than data.max_dropped_fraction = "
            f"{self.max_dropped_fraction:g} ({self._describe(self._drops)}); raise "
            "training.seq_len, use data.chat_overflow = 'cut_turns', or raise the fraction")

    def _place(self, k: int) -> Document:
        waiting = self._waiting.pop(k)
        if k:
            self._consumed.add(waiting.ordinal)
        elif self._waiting:  # the oldest moved on: forget what lies before it
            oldest = self._waiting[0].ordinal
            self._consumed = {o for o in self._consumed if o > oldest}
        return waiting.doc

    def _choose(self, room: int, used: int) -> int | None:
        """Index in the waiting list of the next document of the window, or None."""
        if self.pack == "sequential" or not used:
            self._fill(1)
            return 0 if self._waiting[0].length <= room else None
        self._fill(self.pack_buffer)
        best = None
        for k, w in enumerate(self._waiting[: self.pack_buffer]):
            if w.length <= room and (best is None or w.length > self._waiting[best].length):
                best = k
        return best

    # ------------------------------------------------------------------ windows
    def _pack_window(self) -> list[Document]:
        """The documents of the next window, placed (the counts advance)."""
        docs, used = [], 0
        while (k := self._choose(self.seq_len - used, used)) is not None:
            docs.append(self._place(k))
            used += len(docs[-1])
        self.counts["window_tokens"] += self.seq_len
        self.counts["padding_tokens"] += self.seq_len - used
        return docs

    def _window(self, docs: list[Document]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens, document serials, trained [seq_len + 1] of one window's documents."""
        width = self.seq_len + 1
        tokens = np.full(width, self.pad_id, dtype=np.int64)
        serials = np.zeros(width, dtype=np.int64)
        trained = np.zeros(width, dtype=bool)
        used = 0
        for i, doc in enumerate(docs):
            n = len(doc)
            tokens[used: used + n] = doc.tokens
            serials[used: used + n] = i
            mask = doc.trained
            trained[used: used + n] = True if mask is None else mask
            used += n
        serials[used:] = len(docs)  # padding (and the extra last column) is one more document
        return tokens, serials, trained

    def next_windows(self, n: int, rows: slice | None = None) -> tuple[np.ndarray, ...]:
        """The next `n` windows, (tokens, doc_serials, trained) each [len(rows), seq_len + 1];
        all n are placed (each starts where the previous one stopped), only `rows` filled
        (prepared data reads only their tokens)."""
        placed = [self._pack_window() for _ in range(n)]
        picked = placed[rows] if rows is not None else placed
        return tuple(np.stack(column) for column in
                     zip(*(self._window(docs) for docs in picked), strict=True))

    def state_dict(self) -> dict:
        self._fill(1)  # the oldest document not yet placed names the position
        oldest = self._waiting[0]
        epoch, shard, index = oldest.cursor
        counts = dict(self.counts)  # the waiting documents are counted again after a resume
        counts["seen"] -= len(self._waiting)
        counts["truncated"] -= sum(w.cut for w in self._waiting)
        state = {"epoch": int(epoch), "shard": int(shard), "index": int(index), "offset": 0,
                 **{f"chat_{k}": v for k, v in counts.items()}}
        later = sorted(o - oldest.ordinal for o in self._consumed if o > oldest.ordinal)
        if later:
            state["chat_consumed"] = later
        if getattr(self.encode, "date", None):  # a chat render date changes the tokens
            state["chat_date"] = self.encode.date
        return state

    def load_state_dict(self, sd: dict) -> None:
        self._reset((int(sd["epoch"]), int(sd["shard"]), int(sd["index"])),
                    sd.get("chat_consumed", ()))
        for k in self.counts:
            self.counts[k] = int(sd.get(f"chat_{k}", 0))
        if sd.get("chat_date") and hasattr(self.encode, "date"):
            self.encode.date = sd["chat_date"]
