"""Documents -> one endless token stream -> packed windows of seq_len + 1 tokens.

A `Document` is the token ids one source item contributes to the stream (specials
included) plus, optionally, which of them are trained as labels (`trained`, a per-token
loss mask; None trains every token). Text becomes `[BOS] tokens [EOS]`, all trained
(`TextEncoder`); a chat source trains only the assistant tokens.

`PackedStream` encodes documents lazily in batches, concatenates them and cuts windows of
`seq_len + 1` tokens with a stride of `seq_len`: consecutive windows share one token, so
every token of the stream is a label exactly once (nothing skipped at window edges).
For a window `w` (`window_batch`):
  tokens = w[:-1], labels = w[1:]       (IGNORE_INDEX where the label token is untrained;
                                         for text never: EOS -> next BOS is a constant target)
  document_ids[i] = 0 for the segment the window starts in, +1 at each new document
  positions[i]    = index of token i since its segment started INSIDE THIS WINDOW: 0 at
                    each document start and 0 at the window start even when a document
                    continues from the previous window. The model never attends across
                    windows, so the continuation is a fresh context; this also keeps
                    positions < seq_len.
With document masking off: positions = arange(seq_len) and no document_ids at all (one
long context: the model then reuses one cached causal/sliding mask instead of building
batch-sized document masks every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from runtime.errors import DataError


@dataclass
class Document:
    """One document as it enters the packed stream."""

    tokens: np.ndarray  # int64 [n], specials included
    trained: np.ndarray | None = None  # bool [n]: token i is a loss target; None = all are
    # chat `prepare`: tokens the conversation encoded to before data.chat_overflow (the
    # stored tokens are what is packed; none when it is dropped); None elsewhere
    length: int | None = None

    def __len__(self) -> int:
        return len(self.tokens)


class TextEncoder:
    """Texts -> `[BOS] ids [EOS]` documents, every token trained (one encode_batch call)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> list[Document]:
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        docs = []
        for ids in self.tokenizer.encode_batch(list(texts)):
            seq = np.empty(len(ids) + 2, dtype=np.int64)  # [BOS] ids [EOS]
            seq[0], seq[1:-1], seq[-1] = bos, ids, eos
            docs.append(Document(seq))
        return docs


class PackedStream:
    """Endless stream of documents cut into overlapping windows of seq_len + 1.

    `items`: a function of a cursor returning the endless (cursor, item) iterator from
    there (`DocumentSource.stream`); `encode`: a batch of items -> Documents.
    Buffer: `_tokens` / `_docs` (document serial of each token) / `_trained` hold the unread
    tail of the stream; `_heads` has one [cursor, offset, left] per buffered document
    (offset = tokens of that document before its first buffered token, left = its tokens
    still buffered), so the state can name the head document and the offset inside it.
    """

    def __init__(
        self,
        items: Callable[[tuple], Iterator[tuple[tuple, object]]],
        encode: Callable[[list], list[Document]],
        seq_len: int,
        batch_docs: int = 64,
    ):
        if seq_len < 1:
            raise DataError(f"data: seq_len must be >= 1, got {seq_len}")
        self.items, self.encode, self.seq_len = items, encode, seq_len
        self.batch_docs = max(1, int(batch_docs))
        self._reset((0, 0, 0), 0)

    def _reset(self, cursor: tuple, offset: int) -> None:
        self._items_iter = self.items(cursor)
        self._tokens = np.empty(0, dtype=np.int64)
        self._docs = np.empty(0, dtype=np.int64)
        self._trained = np.empty(0, dtype=bool)
        self._heads: list[list] = []
        self._skip = offset  # tokens of the first document consumed before a resume
        self._next_serial = 0

    def _append(self, cursor: tuple, doc: Document, parts: list[list]) -> int:
        skip, self._skip = self._skip, 0
        n = len(doc.tokens)
        if skip >= n:
            raise DataError(
                f"data: resume offset {skip} is past the end of document {cursor} "
                f"({n} tokens): was the data or the tokenizer changed?"
            )
        trained = np.ones(n, dtype=bool) if doc.trained is None else np.asarray(doc.trained, bool)
        parts[0].append(np.asarray(doc.tokens, dtype=np.int64)[skip:])
        parts[1].append(np.full(n - skip, self._next_serial, dtype=np.int64))
        parts[2].append(trained[skip:])
        self._heads.append([cursor, skip, n - skip])
        self._next_serial += 1
        return n - skip

    def _fill(self, need: int) -> None:
        """Encode documents until the buffer holds at least `need` tokens."""
        parts = [[self._tokens], [self._docs], [self._trained]]
        have = len(self._tokens)
        while have < need:
            batch = [next(self._items_iter) for _ in range(self.batch_docs)]
            docs = self.encode([item for _, item in batch])
            for (cursor, _), doc in zip(batch, docs, strict=True):
                have += self._append(cursor, doc, parts)
        self._tokens, self._docs, self._trained = (np.concatenate(p) for p in parts)

    def _consume(self, n: int) -> None:
        self._tokens, self._docs, self._trained = (
            self._tokens[n:], self._docs[n:], self._trained[n:])
        while n:
            head = self._heads[0]
            take = min(n, head[2])
            head[1] += take
            head[2] -= take
            n -= take
            if head[2] == 0:
                self._heads.pop(0)

    def next_windows(self, n: int, rows: slice | None = None) -> tuple[np.ndarray, ...]:
        """The next `n` windows; the stream advances by n * seq_len tokens.

        Returns (tokens, doc_serials, trained), each [len(rows), seq_len + 1] (int64, int64,
        bool); only the rows in `rows` (default all) are materialized.
        """
        S = self.seq_len
        self._fill(n * S + 1)
        starts = np.arange(n, dtype=np.int64)[rows if rows is not None else slice(None)] * S  # [r]
        idx = starts[:, None] + np.arange(S + 1, dtype=np.int64)[None, :]  # [r, S+1]
        out = self._tokens[idx], self._docs[idx], self._trained[idx]
        self._consume(n * S)
        return out

    def state_dict(self) -> dict:
        if not self._heads:
            self._fill(1)  # name the next document (encoding it is deterministic)
        (epoch, shard, index), offset, _ = self._heads[0]
        return {"epoch": int(epoch), "shard": int(shard), "index": int(index),
                "offset": int(offset)}

    def load_state_dict(self, sd: dict) -> None:
        self._reset((int(sd["epoch"]), int(sd["shard"]), int(sd["index"])), int(sd["offset"]))


def window_batch(
    windows: np.ndarray,
    doc_serials: np.ndarray,
    document_masking: bool = True,
    trained: np.ndarray | None = None,
) -> dict:
    """Model inputs of packed windows.

    windows, doc_serials: int64 [R, S+1]; trained: bool [R, S+1] or None (all trained)
    -> dict of int64 tensors [R, S]: tokens, labels, positions and, with document masking,
    document_ids (see the module docstring for the rules).
    """
    # Imported here, not at the top: a `prepare` worker process (Documents, TextEncoder) never
    # loads torch (seconds of start-up and hundreds of MB per worker).
    import torch

    from runtime.model.loss import IGNORE_INDEX

    R, S = windows.shape[0], windows.shape[1] - 1
    cols = np.broadcast_to(np.arange(S, dtype=np.int64), (R, S))  # [R, S]
    if document_masking:
        docs = doc_serials[:, :-1]  # [R, S]; a label belongs to its input token's document
        document_ids = docs - docs[:, :1]  # 0 for the segment the window starts in
        is_start = np.ones((R, S), dtype=bool)
        is_start[:, 1:] = docs[:, 1:] != docs[:, :-1]
        seg_start = np.maximum.accumulate(np.where(is_start, cols, 0), axis=1)  # [R, S]
        positions = cols - seg_start
    else:
        positions, document_ids = cols, None
    labels = windows[:, 1:]
    if trained is not None and not trained[:, 1:].all():
        labels = np.where(trained[:, 1:], labels, IGNORE_INDEX)
    batch = {
        "tokens": torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
        "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        "positions": torch.from_numpy(np.ascontiguousarray(positions)),
    }
    if document_ids is not None:
        batch["document_ids"] = torch.from_numpy(np.ascontiguousarray(document_ids))
    return batch


def split_microbatches(batch: dict, num_microbatches: int) -> list[dict]:
    """Cut a rank's step batch [rows, S] into `num_microbatches` equal [rows/n, S] pieces."""
    rows = next(iter(batch.values())).shape[0]
    if num_microbatches < 1 or rows % num_microbatches:
        raise ValueError(
            f"data: {rows} rows per rank cannot be split into {num_microbatches} micro-batches"
        )
    chunks = {k: v.chunk(num_microbatches, dim=0) for k, v in batch.items()}
    return [{k: c[i] for k, c in chunks.items()} for i in range(num_microbatches)]
