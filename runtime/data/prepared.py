"""Prepared data: a source tokenized once into memory-mapped token files plus a document index,
so that any rank reads exactly its own windows by offset.

`prepare(source, encode, out_dir)` writes (never pickles; numpy raw files and JSON only):

  meta.json          format, version, token dtype, counts, tokenizer fingerprint, shards
  tokens-NNNNN.bin   the documents' tokens back to back (uint16 when the vocab fits, else
                     uint32), [BOS] ... [EOS] included; a document never spans two files
  trained.bin        uint8 per token, 1 = a loss target (only when a source masks tokens)
  doc_offsets.npy    int64 [docs + 1]  global token offset of each document (+ the end)
  doc_shard.npy      int64 [docs]      the source shard (file) of each document
  doc_record.npy     int64 [docs]      its ordinal among the shard's records
  doc_index.npy      int64 [docs]      its record index (the cursor index when not shuffled)
  shard_records.npy  int64 [shards]    records per shard, blank ones included

`PreparedStream` serves exactly the stream `PackedStream` builds from the same source (same
documents, same order, same shuffles, blank documents skipped, cursor-compatible state),
but by arithmetic: the stream of epoch e is the epoch's document order laid end to end, so
window w starts at token w * seq_len of that endless stream and a rank gathers only its rows
(a searchsorted over the epoch's cumulative lengths, then one fancy index into the memory map).
The per-rank cost of a step depends on the local batch only, never on the dp degree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from runtime.data.errors import DataError, DataFileNotFoundError
from runtime.data.packing import Document
from runtime.data.sources import DocumentSource, permutation

FORMAT = "gptoss-runtime-prepared"
VERSION = 1
DEFAULT_FILE_TOKENS = 1 << 31  # ~4 GiB of uint16 per token file
INDEX_ARRAYS = ("doc_offsets", "doc_shard", "doc_record", "doc_index", "shard_records")


def tokenizer_info(tokenizer) -> dict:
    return {
        "fingerprint": getattr(tokenizer, "fingerprint", None),
        "vocab_size": int(tokenizer.vocab_size),
        "bos_id": int(tokenizer.bos_id),
        "eos_id": int(tokenizer.eos_id),
    }


# ============================================================================ writing
class _Writer:
    """Appends documents to token files of at most `file_tokens` tokens, records the index."""

    def __init__(self, out: Path, dtype: np.dtype, file_tokens: int):
        self.out, self.dtype, self.file_tokens = out, dtype, file_tokens
        self.files: list[dict] = []
        self._fh = None
        self._trained = open(out / "trained.bin", "wb")
        self.masked = False
        self.offsets, self.shard, self.record, self.index = [0], [], [], []
        self.max_id = -1

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"tokens-{len(self.files):05d}.bin"
        self.files.append({"name": name, "tokens": 0})
        self._fh = open(self.out / name, "wb")

    def add(self, doc: Document, shard: int, record: int, index: int) -> None:
        tokens = np.asarray(doc.tokens)
        n = len(tokens)
        if self._fh is None or (self.files[-1]["tokens"] and
                                self.files[-1]["tokens"] + n > self.file_tokens):
            self._open_next()
        if n and int(tokens.min()) < 0:
            raise DataError(f"data: negative token id in shard {shard} record {index}")
        self.max_id = max(self.max_id, int(tokens.max()) if n else -1)
        self._fh.write(tokens.astype(self.dtype).tobytes())
        trained = np.ones(n, np.uint8) if doc.trained is None else np.asarray(doc.trained, np.uint8)
        self.masked |= doc.trained is not None and not trained.all()
        self._trained.write(trained.tobytes())
        self.files[-1]["tokens"] += n
        self.offsets.append(self.offsets[-1] + n)
        self.shard.append(shard)
        self.record.append(record)
        self.index.append(index)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._trained.close()
        if not self.masked:
            (self.out / "trained.bin").unlink()


def _records(source: DocumentSource) -> Iterator[tuple[int, int, int, object]]:
    """(shard, record ordinal, record index, item) of every kept document in natural order,
    plus a (shard, count, -1, None) marker at the end of each shard."""
    for shard in range(source.num_shards()):
        count = 0
        for record, (index, item) in enumerate(source.shard_items(shard)):
            count = record + 1
            if source.keep(item):
                yield shard, record, index, item
        yield shard, count, -1, None


def prepare(
    source: DocumentSource,
    encode: Callable[[list], list[Document]],
    out_dir: str | os.PathLike,
    tokenizer,
    *,
    batch_docs: int = 256,
    file_tokens: int = DEFAULT_FILE_TOKENS,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Tokenize `source` once into `out_dir` (written to a temporary sibling, then renamed:
    a crash never leaves a half-written dataset). Returns the meta dict."""
    out = Path(out_dir)
    if out.exists():
        raise DataError(f"{out}: already exists; remove it or choose another output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta = _write(source, encode, tmp, tokenizer, batch_docs, file_tokens, log)
        os.replace(tmp, out)  # atomic on one filesystem; fails if another process won
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write(source, encode, tmp: Path, tokenizer, batch_docs, file_tokens, log) -> dict:
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    writer = _Writer(tmp, dtype, file_tokens)
    shard_records: list[int] = []
    pending: list[tuple[int, int, int, object]] = []

    def flush():
        docs = encode([item for *_, item in pending])
        for (shard, record, index, _), doc in zip(pending, docs, strict=True):
            writer.add(doc, shard, record, index)
        pending.clear()

    for shard, record, index, item in _records(source):
        if index == -1:  # end of a shard
            shard_records.append(record)
            if log:
                log(f"prepared shard {shard + 1}/{source.num_shards()}: "
                    f"{len(writer.shard) + len(pending)} documents so far")
            continue
        pending.append((shard, record, index, item))
        if len(pending) >= batch_docs:
            flush()
    if pending:
        flush()
    writer.close()
    if not writer.shard:
        raise DataError(f"data: no non-empty documents in {source.name}")
    arrays = {"doc_offsets": writer.offsets, "doc_shard": writer.shard,
              "doc_record": writer.record, "doc_index": writer.index,
              "shard_records": shard_records}
    for name, values in arrays.items():
        np.save(tmp / f"{name}.npy", np.asarray(values, dtype=np.int64), allow_pickle=False)
    meta = {
        "format": FORMAT, "version": VERSION, "source": source.name, "dtype": dtype.name,
        "num_tokens": writer.offsets[-1], "num_docs": len(writer.shard),
        "max_token_id": writer.max_id, "masked": writer.masked, "token_files": writer.files,
        "tokenizer": tokenizer_info(tokenizer),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# ============================================================================ reading
class PreparedDataset:
    """A prepared folder opened read-only: memory-mapped tokens and the document index."""

    def __init__(self, path: str | os.PathLike, shuffle: bool = False, seed: int = 0,
                 name: str | None = None):
        self.path = Path(path).expanduser()
        self.meta = _read_meta(self.path)
        self.shuffle, self.seed = shuffle, seed
        # The original source's name: a streamed run's checkpoint resumes here without a warning.
        self.name = name or str(self.meta["source"])
        idx = {n: _load_index(self.path, n) for n in INDEX_ARRAYS}
        self.offsets, self.shard, self.index = idx["doc_offsets"], idx["doc_shard"], idx["doc_index"]
        self.shard_records = idx["shard_records"]
        self.num_docs, self.num_tokens = int(self.meta["num_docs"]), int(self.meta["num_tokens"])
        if len(self.offsets) != self.num_docs + 1 or int(self.offsets[-1]) != self.num_tokens:
            raise DataError(f"{self.path}: doc_offsets.npy does not match meta.json (damaged?)")
        self.lengths = np.diff(self.offsets)  # [docs]
        # ordinal -> document id (-1: a blank record), shard by shard, for shuffled epochs
        self.record_start = np.concatenate([[0], np.cumsum(self.shard_records)])
        self.doc_of_record = np.full(int(self.record_start[-1]), -1, dtype=np.int64)
        self.doc_of_record[self.record_start[self.shard] + idx["doc_record"]] = np.arange(
            self.num_docs)
        self._tokens = self._map_tokens()
        self._trained = self._map("trained.bin", np.uint8, self.num_tokens) if self.meta[
            "masked"] else None

    def _map(self, name: str, dtype, count: int) -> np.ndarray:
        path = self.path / name
        expected = count * np.dtype(dtype).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise DataError(f"{path}: missing or not {expected} bytes (damaged prepared data?)")
        if count == 0:
            return np.empty(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    def _map_tokens(self) -> list[np.ndarray]:
        dtype = np.dtype(self.meta["dtype"])
        files = self.meta["token_files"]
        self.file_starts = np.cumsum([0] + [int(f["tokens"]) for f in files])  # [files + 1]
        if int(self.file_starts[-1]) != self.num_tokens:
            raise DataError(f"{self.path}/meta.json: token file sizes do not add up")
        return [self._map(f["name"], dtype, int(f["tokens"])) for f in files]

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a run whose tokenizer would not produce these token ids."""
        have, want = self.meta["tokenizer"], tokenizer_info(tokenizer)
        if have.get("fingerprint") and want["fingerprint"] and have != want:
            raise DataError(
                f"{self.path}: prepared with tokenizer {have['fingerprint']} (vocab "
                f"{have['vocab_size']}), this run's is {want['fingerprint']} (vocab "
                f"{want['vocab_size']}); prepare the data again with model.tokenizer_path")
        if int(self.meta["max_token_id"]) >= want["vocab_size"]:
            raise DataError(f"{self.path}: token id {self.meta['max_token_id']} is outside the "
                            f"tokenizer's vocabulary ({want['vocab_size']})")

    def tokens_at(self, offsets: np.ndarray) -> np.ndarray:
        """int64 tokens at global token offsets (any shape)."""
        if len(self._tokens) == 1:
            return self._tokens[0][offsets].astype(np.int64)
        out = np.empty(offsets.shape, dtype=np.int64)
        which = np.searchsorted(self.file_starts, offsets, side="right") - 1
        for f in np.unique(which):
            m = which == f
            out[m] = self._tokens[f][offsets[m] - self.file_starts[f]]
        return out

    def trained_at(self, offsets: np.ndarray) -> np.ndarray | None:
        return None if self._trained is None else self._trained[offsets].astype(bool)


def _read_meta(path: Path) -> dict:
    meta_file = path / "meta.json"
    if not path.is_dir():
        raise DataFileNotFoundError(f"data.dataset_path: prepared data folder {path} does not "
                                    f"exist (python -m runtime.data prepare writes it)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{meta_file}: missing; {path} is not prepared data "
                        f"(python -m runtime.data prepare writes it)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_file}: unreadable: {' '.join(str(e).split())}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{meta_file}: not a {FORMAT} folder")
    if meta.get("version") != VERSION:
        raise DataError(f"{meta_file}: version {meta.get('version')!r}, this runtime reads "
                        f"{VERSION}; prepare the data again")
    return meta


def _load_index(path: Path, name: str) -> np.ndarray:
    file = path / f"{name}.npy"
    try:
        arr = np.load(file, allow_pickle=False)  # never unpickle a user-replaceable file
    except (OSError, ValueError) as e:
        raise DataError(f"{file}: unreadable: {' '.join(str(e).split())}") from None
    if arr.dtype != np.int64 or arr.ndim != 1:
        raise DataError(f"{file}: expected a 1-D int64 array, got {arr.dtype} {arr.shape}")
    return arr


class _EpochOrder:
    """The documents of one epoch in stream order, with their cursors and cumulative ends."""

    def __init__(self, ds: PreparedDataset, epoch: int):
        if not ds.shuffle:
            self.docs = np.arange(ds.num_docs)
            self.cursor_shard, self.cursor_index = ds.shard, ds.index
        else:  # FileSource's order: shards permuted, then the records inside each shard
            n_shards = len(ds.shard_records)
            docs, shards, index = [], [], []
            for s, f in enumerate(permutation(n_shards, ds.seed, epoch)):
                n = int(ds.shard_records[f])
                in_shard = ds.doc_of_record[ds.record_start[f]: ds.record_start[f] + n]
                picked = in_shard[permutation(n, ds.seed, epoch, s + 1)]  # [n], -1 = blank
                kept = np.flatnonzero(picked >= 0)
                docs.append(picked[kept])
                index.append(kept)
                shards.append(np.full(len(kept), s, dtype=np.int64))
            self.docs = np.concatenate(docs)
            self.cursor_shard, self.cursor_index = np.concatenate(shards), np.concatenate(index)
        self.ends = np.cumsum(ds.lengths[self.docs])  # [docs] end offset inside the epoch

    def find(self, shard: int, index: int) -> int | None:
        """Position in this epoch of the document with cursor (shard, index), or None."""
        lo, hi = np.searchsorted(self.cursor_shard, [shard, shard + 1])
        k = lo + int(np.searchsorted(self.cursor_index[lo:hi], index))
        return k if k < hi and int(self.cursor_index[k]) == index else None


class PreparedStream:
    """`PackedStream`'s interface over prepared data: a token position, no buffer."""

    def __init__(self, dataset: PreparedDataset, seq_len: int):
        if seq_len < 1:
            raise DataError(f"data: seq_len must be >= 1, got {seq_len}")
        self.ds, self.seq_len = dataset, seq_len
        self.position = 0  # the next window's first token in the endless stream
        self._orders: dict[int, _EpochOrder] = {}

    def _order(self, epoch: int) -> _EpochOrder:
        if not self.ds.shuffle:
            epoch = 0  # every epoch has the same order
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a step spans at most a few epochs: keep the last ones
                self._orders.pop(min(self._orders))
            self._orders[epoch] = _EpochOrder(self.ds, epoch)
        return self._orders[epoch]

    def _gather(self, starts: np.ndarray, length: int) -> tuple[np.ndarray, ...]:
        """tokens, document serials, trained at stream positions starts[:, None] + arange."""
        T = self.ds.num_tokens
        q = starts[:, None] + np.arange(length, dtype=np.int64)[None, :]  # [r, L]
        first, last = int(q.min()) // T, int(q.max()) // T
        if first == last:  # the common case: every window inside one epoch
            offsets, serials = self._locate(first, q - first * T)
        else:
            epochs = q // T
            offsets, serials = np.empty_like(q), np.empty_like(q)
            for e in range(first, last + 1):
                m = epochs == e
                offsets[m], serials[m] = self._locate(e, q[m] - e * T)
        trained = self.ds.trained_at(offsets)
        if trained is None:
            trained = np.ones(q.shape, dtype=bool)
        return self.ds.tokens_at(offsets), serials, trained

    def _locate(self, epoch: int, within: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(global token offsets, document serials) of positions `within` epoch `epoch`."""
        order = self._order(epoch)
        k = np.searchsorted(order.ends, within, side="right")  # position in the epoch's order
        doc = order.docs[k]
        offsets = self.ds.offsets[doc] + within - (order.ends[k] - self.ds.lengths[doc])
        return offsets, epoch * self.ds.num_docs + k

    def next_windows(self, n: int, rows: slice | None = None) -> tuple[np.ndarray, ...]:
        """The next `n` windows (only `rows` of them gathered); advances n * seq_len tokens."""
        S = self.seq_len
        starts = self.position + np.arange(n, dtype=np.int64)[rows if rows is not None
                                                              else slice(None)] * S  # [r]
        out = self._gather(starts, S + 1)
        self.position += n * S
        return out

    def state_dict(self) -> dict:
        """The cursor `PackedStream` would report at this position (same keys, same values)."""
        epoch, within = divmod(self.position, self.ds.num_tokens)
        order = self._order(epoch)
        k = int(np.searchsorted(order.ends, within, side="right"))
        start = int(order.ends[k] - self.ds.lengths[order.docs[k]])
        return {"epoch": int(epoch), "shard": int(order.cursor_shard[k]),
                "index": int(order.cursor_index[k]), "offset": int(within - start)}

    def load_state_dict(self, sd: dict) -> None:
        epoch, shard, index = int(sd["epoch"]), int(sd["shard"]), int(sd["index"])
        offset = int(sd["offset"])
        order = self._order(epoch)
        k = order.find(shard, index)
        if k is None:
            raise DataError(f"data: resume cursor (epoch {epoch}, shard {shard}, index {index}) "
                            f"names no document of {self.ds.name}: was the data changed?")
        length = int(self.ds.lengths[order.docs[k]])
        if offset >= length:
            raise DataError(f"data: resume offset {offset} is past the end of document "
                            f"{(epoch, shard, index)} ({length} tokens): was the data or the "
                            f"tokenizer changed?")
        self.position = epoch * self.ds.num_tokens + int(order.ends[k]) - length + offset


# ============================================================================ the embedded corpus
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gptoss-runtime" / "data"


def cached_prepared(source: DocumentSource, source_file: Path, tokenizer, encode,
                    cache_dir: str | os.PathLike = "") -> Path:
    """`source` (one file, e.g. the embedded corpus) prepared for `tokenizer` in the cache,
    keyed by the file's and the tokenizer's hashes; prepared on first use. Several ranks
    may race: each writes its own temporary folder and the first rename wins."""
    digest = hashlib.sha256(source_file.read_bytes()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = root / f"{source_file.name.split('.')[0]}-{digest}-{tokenizer.fingerprint}"
    if (out / "meta.json").is_file():
        return out
    try:
        prepare(source, encode, out, tokenizer)
    except OSError:
        if not (out / "meta.json").is_file():  # not "another rank finished first"
            raise
    except DataError:
        if not (out / "meta.json").is_file():
            raise
    return out
