"""Prepared data: a source tokenized once into memory-mapped token files plus a document index,
so that any rank reads exactly its own windows by offset.

`prepare(source, encode, out_dir)` (runtime.data.preparing) writes (never pickles; numpy raw
files and JSON only):

  meta.json          format, version, token dtype, counts, tokenizer, token files, checksums
  tokens-NNNNN.bin   the documents' tokens back to back (uint16 when the vocab fits, else
                     uint32), [BOS] ... [EOS] included; a document never spans two files;
                     one or more per part of the prepare (runtime.data.prepare_parts)
  trained.bin        uint8 per token, 1 = a loss target (only when a source masks tokens)
  doc_offsets.npy    int64 [docs + 1]  global token offset of each document (+ the end)
  doc_record.npy     int64 [docs]      its ordinal among its shard's records
  doc_index.npy      int64 [docs]      its record index (the cursor index when not shuffled)
  shard_records.npy  int64 [shards]    records per shard (file), blank ones included
  shard_docs.npy     int64 [shards]    documents per shard (documents are stored shard by shard)

meta.json (format 3), every key:
  "format": "gptoss-runtime-prepared", "version": 3, "source": the source's name,
  "dtype": "uint16" | "uint32", "num_tokens", "num_docs", "max_token_id", "masked": bool
  (trained.bin exists), "token_files": [{"name": "tokens-00000.bin", "tokens": n}, ...] in
  stream order, "tokenizer": {"fingerprint", "vocab_size", "bos_id", "eos_id"},
  "files": {name: {"size": bytes, "crc32": "8 hex digits"}} for EVERY other file of the
  folder (token files, trained.bin, the .npy index): the checkpoint manifest's record
  (runtime/checksums.py), so the same helpers write and check both. Version 2 folders (no
  "files") are still read, unverified. A writer that adds files lists them in "files" too.

Version 4 is a prepared *chat* folder (runtime.data.chat.prepared): version 3 plus
  "chat": {"seq_len", "chat_overflow", "loss_on", "chat_date", "template": {"source",
  "sha256"}, "conversations", "cut", "dropped"} (the prepare-time settings the reader checks,
  and counts) and doc_rendered.npy int64 [docs] (each conversation's length before
  data.chat_overflow; a dropped one is stored with 0 tokens, so every record is a document).

Trust: `PreparedDataset.verify(rank, world)` stats every file against "files" and checksums
this rank's share of them (`files_for_rank`, as checkpoints are); the trainer runs it on
every rank before the model is built and agrees on the first problem. A token id >= the
vocabulary that still reaches a read (an unverified folder, a file changed after the start)
is a DataError naming the file and offset, never an index error in the embedding (a
device-side assert on a GPU). Writing (worker pools, shards, resuming, the atomic publish
and its lock): runtime.data.preparing.

`PreparedStream` serves exactly the stream `PackedStream` builds from the same source (same
documents, same order, same shuffles, blank documents skipped, cursor-compatible state),
but by arithmetic: the stream of epoch e is the epoch's shard order laid end to end, each
shard its documents in the epoch's order, so window w starts at token w * seq_len of that
endless stream and a rank gathers only its rows (a searchsorted over the epoch's shard ends,
one over the shard's document ends, then one fancy index into the memory map). The index
arrays are memory-mapped too, and a shard's shuffled order is built only when the stream
reaches it: memory is O(shards + one shard's records), the per-rank cost of a step depends
on the local batch only, never on the dp degree.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from runtime.checksums import check_checksums, check_sizes, files_for_rank, valid_records
from runtime.errors import DataError, DataFileNotFoundError
from runtime.data.sources import permutation

FORMAT = "gptoss-runtime-prepared"
VERSION = 3  # 3: meta.json "files" (size + CRC32); 2: shard_docs.npy, index memory-mapped
CHAT_VERSION = 4  # 3 + chat conversations: meta.json "chat", doc_rendered.npy (older
# runtimes refuse it instead of packing conversations as text)
READABLE_VERSIONS = (2, 3, 4)  # 2: read without checksums (a warning says so)
DEFAULT_FILE_TOKENS = 1 << 31  # ~4 GiB of uint16 per token file
MAX_OPEN_TOKEN_FILES = 64  # token files mapped at once per dataset (one descriptor each)
INDEX_ARRAYS = ("doc_offsets", "doc_record", "doc_index", "shard_records", "shard_docs")


def tokenizer_info(tokenizer) -> dict:
    return {
        "fingerprint": getattr(tokenizer, "fingerprint", None),
        "vocab_size": int(tokenizer.vocab_size),
        "bos_id": int(tokenizer.bos_id),
        "eos_id": int(tokenizer.eos_id),
    }


def chat_counts(arrays: dict, seq_len: int) -> dict:
    """meta.json "chat" counts of a prepared chat folder's index arrays."""
    stored = np.diff(arrays["doc_offsets"])  # [docs]; 0 = dropped
    longer = arrays["doc_rendered"] > seq_len
    return {"conversations": int(len(stored)), "cut": int(((stored > 0) & longer).sum()),
            "dropped": int((stored == 0).sum())}


# ============================================================================ reading
class PreparedDataset:
    """A prepared folder opened read-only: memory-mapped tokens and document index."""

    def __init__(self, path: str | os.PathLike, shuffle: bool = False, seed: int = 0,
                 name: str | None = None):
        self.path = Path(path).expanduser()
        self.meta = read_meta(self.path)
        self.shuffle, self.seed = shuffle, seed
        # The original source's name: a streamed run's checkpoint resumes here without a warning.
        self.name = name or str(self.meta["source"])
        self.num_docs, self.num_tokens = int(self.meta["num_docs"]), int(self.meta["num_tokens"])
        idx = {n: _load_index(self.path, n) for n in INDEX_ARRAYS}
        self.offsets, self.record, self.index = idx["doc_offsets"], idx["doc_record"], idx["doc_index"]
        self.shard_records = np.asarray(idx["shard_records"])  # [shards], small
        shard_docs = np.asarray(idx["shard_docs"])
        if (len(self.offsets) != self.num_docs + 1 or int(self.offsets[-1]) != self.num_tokens
                or len(self.record) != self.num_docs or len(self.index) != self.num_docs
                or len(shard_docs) != len(self.shard_records)
                or int(shard_docs.sum()) != self.num_docs):
            raise DataError(f"{self.path}: the document index does not match meta.json (damaged?)")
        self.first_doc = np.concatenate([[0], np.cumsum(shard_docs)])  # [shards + 1]
        self.shard_tokens = np.diff(np.asarray(self.offsets[self.first_doc]))  # [shards]
        self._token_maps: OrderedDict[int, np.ndarray] = OrderedDict()  # file -> map, LRU
        self._maps_lock = threading.Lock()  # the prefetch thread and the trainer may both read
        self._check_token_files()
        self._trained = self._map("trained.bin", np.uint8, self.num_tokens) if self.meta[
            "masked"] else None
        # {name: {"size", "crc32"}}, or None for a version 2 folder (not verifiable)
        self.checksums: dict[str, dict] | None = self.meta.get("files")
        # ids at or above this are damage (lowered to the run's vocabulary by check_tokenizer)
        self.vocab_size = int(self.meta["tokenizer"]["vocab_size"])

    @property
    def num_shards(self) -> int:
        return len(self.shard_records)

    def lengths(self, docs: np.ndarray) -> np.ndarray:
        return self.offsets[docs + 1] - self.offsets[docs]

    def _map(self, name: str, dtype, count: int) -> np.ndarray:
        path = self.path / name
        expected = count * np.dtype(dtype).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise DataError(f"{path}: missing or not {expected} bytes (damaged prepared data?)")
        if count == 0:
            return np.empty(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    def _check_token_files(self) -> None:
        """Every token file there with its size (a stat each: no file stays open)."""
        files = self.meta["token_files"]
        self.file_starts = np.cumsum([0] + [int(f["tokens"]) for f in files])  # [files + 1]
        if int(self.file_starts[-1]) != self.num_tokens:
            raise DataError(f"{self.path}/meta.json: token file sizes do not add up")
        item = np.dtype(self.meta["dtype"]).itemsize
        for f in files:
            path, expected = self.path / f["name"], int(f["tokens"]) * item
            if not path.is_file() or path.stat().st_size != expected:
                raise DataError(f"{path}: missing or not {expected} bytes (damaged prepared "
                                f"data?)")

    def _token_file(self, f: int) -> np.ndarray:
        """Token file `f` memory-mapped. A map holds a file descriptor, and a folder of 1T
        tokens in 128 MB parts has ~30k token files (ulimit -n is often 1024): only the
        last MAX_OPEN_TOKEN_FILES used stay mapped (reads move through the files in order)."""
        with self._maps_lock:
            tokens = self._token_maps.get(f)
            if tokens is None:
                if len(self._token_maps) >= MAX_OPEN_TOKEN_FILES:
                    self._token_maps.popitem(last=False)  # unmapped with its last reference
                info = self.meta["token_files"][f]
                tokens = self._map(info["name"], self.meta["dtype"], int(info["tokens"]))
                self._token_maps[f] = tokens
            else:
                self._token_maps.move_to_end(f)
            return tokens

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a run whose tokenizer would not produce these token ids."""
        have, want = self.meta["tokenizer"], tokenizer_info(tokenizer)
        if have.get("fingerprint") and want["fingerprint"] and have != want:
            raise DataError(
                f"{self.path}: prepared with tokenizer {have['fingerprint']} (vocab "
                f"{have['vocab_size']}), this run's is {want['fingerprint']} (vocab "
                f"{want['vocab_size']}); prepare the data again with model.tokenizer_path")
        self.vocab_size = min(self.vocab_size, want["vocab_size"])
        if int(self.meta["max_token_id"]) >= want["vocab_size"]:
            raise DataError(f"{self.path}: token id {self.meta['max_token_id']} is outside the "
                            f"tokenizer's vocabulary ({want['vocab_size']})")

    def verify(self, rank: int = 0, world_size: int = 1) -> None:
        """Check every file's size and this rank's share of the checksums against meta.json
        (all of them with the defaults); a mismatch is a DataError naming the file. A version
        2 folder has no checksums: nothing to verify (`self.checksums` is None)."""
        if self.checksums is None:
            return
        names = sorted(self.checksums)
        problem = check_sizes(self.path, self.checksums, source="meta.json") or \
            check_checksums(self.path, self.checksums, files_for_rank(names, rank, world_size))
        if problem:
            raise DataError(f"{self.path}: {problem} (damaged prepared data; prepare it again)")

    def tokens_at(self, offsets: np.ndarray) -> np.ndarray:
        """int64 tokens at global token offsets (any shape); an id outside the vocabulary is
        a DataError naming the file and offset."""
        which = np.searchsorted(self.file_starts, offsets, side="right") - 1
        lo, hi = int(which.min()), int(which.max())
        if lo == hi:
            out = self._token_file(lo)[offsets - self.file_starts[lo]].astype(np.int64)
        else:
            out = np.empty(offsets.shape, dtype=np.int64)
            for f in np.unique(which):
                m = which == f
                out[m] = self._token_file(int(f))[offsets[m] - self.file_starts[f]]
        if out.size and int(out.max()) >= self.vocab_size:  # one pass over the gathered batch
            self._bad_token(out, offsets)
        return out

    def _bad_token(self, tokens: np.ndarray, offsets: np.ndarray) -> None:
        i = int(np.argmax(tokens.reshape(-1) >= self.vocab_size))
        offset = int(offsets.reshape(-1)[i])
        f = int(np.searchsorted(self.file_starts, offset, side="right") - 1)
        at = offset - int(self.file_starts[f])
        item = np.dtype(self.meta["dtype"]).itemsize
        raise DataError(
            f"{self.path / self.meta['token_files'][f]['name']}: token id "
            f"{int(tokens.reshape(-1)[i])} at byte offset {at * item} (token {at}) is outside "
            f"the vocabulary ({self.vocab_size}): damaged prepared data; prepare it again")

    def trained_at(self, offsets: np.ndarray) -> np.ndarray | None:
        return None if self._trained is None else self._trained[offsets].astype(bool)


def read_meta(path: Path) -> dict:
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
    if meta.get("version") not in READABLE_VERSIONS:
        raise DataError(f"{meta_file}: version {meta.get('version')!r}, this runtime reads "
                        f"{', '.join(map(str, READABLE_VERSIONS))}; prepare the data again")
    if meta["version"] >= 3 and not valid_records(meta.get("files")):
        raise DataError(f"{meta_file}: no valid \"files\" checksums (damaged?); prepare the "
                        f"data again")
    return meta


def _load_index(path: Path, name: str) -> np.ndarray:
    file = path / f"{name}.npy"
    try:  # memory-mapped; never unpickle a user-replaceable file
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{file}: unreadable: {' '.join(str(e).split())}") from None
    if arr.dtype != np.int64 or arr.ndim != 1:
        raise DataError(f"{file}: expected a 1-D int64 array, got {arr.dtype} {arr.shape}")
    return arr


class _ShardOrder:
    """One shard's documents in one epoch's order: ids, cursor indices, cumulative ends."""

    def __init__(self, ds: PreparedDataset, shard: int, perm: np.ndarray | None):
        lo, hi = int(ds.first_doc[shard]), int(ds.first_doc[shard + 1])
        if perm is None:  # natural order: the cursor index is the record index
            self.docs = np.arange(lo, hi, dtype=np.int64)
            self.cursor_index = np.asarray(ds.index[lo:hi])
            self.ends = np.asarray(ds.offsets[lo + 1:hi + 1]) - int(ds.offsets[lo])
        else:  # FileSource's order: the shard's records permuted, blank ones skipped
            doc_of_record = np.full(len(perm), -1, dtype=np.int64)
            doc_of_record[np.asarray(ds.record[lo:hi])] = np.arange(lo, hi)
            picked = doc_of_record[perm]  # [records], -1 = blank
            self.cursor_index = np.flatnonzero(picked >= 0)  # position in the permutation
            self.docs = picked[self.cursor_index]
            self.ends = np.cumsum(ds.lengths(self.docs))
        # global offset of a token = base[k] + its offset in the shard's stream (k: its doc)
        self.base = np.asarray(ds.offsets[self.docs]) - (self.ends - ds.lengths(self.docs))

    def find(self, index: int) -> int | None:
        k = int(np.searchsorted(self.cursor_index, index))
        return k if k < len(self.docs) and int(self.cursor_index[k]) == index else None


class _EpochOrder:
    """One epoch: the shard order and where each shard's tokens start; shard orders on demand."""

    def __init__(self, ds: PreparedDataset, epoch: int):
        self.ds, self.epoch = ds, epoch
        n = ds.num_shards
        self.files = permutation(n, ds.seed, epoch) if ds.shuffle else np.arange(n)  # [shards]
        self.ends = np.cumsum(ds.shard_tokens[self.files])  # [shards] end token in the epoch
        docs = np.asarray(ds.first_doc[1:] - ds.first_doc[:-1])[self.files]
        self.docs_before = np.concatenate([[0], np.cumsum(docs)[:-1]])  # [shards]
        self._shards: dict[int, _ShardOrder] = {}

    def shard(self, position: int) -> _ShardOrder:
        """The documents of the shard at `position` of this epoch's order (a few cached)."""
        if position not in self._shards:
            if len(self._shards) >= 8:
                self._shards.pop(next(iter(self._shards)))
            f = int(self.files[position])
            perm = None
            if self.ds.shuffle:  # FileSource seeds a shard by its position in the epoch
                perm = permutation(int(self.ds.shard_records[f]), self.ds.seed, self.epoch,
                                   position + 1)
            self._shards[position] = _ShardOrder(self.ds, f, perm)
        return self._shards[position]

    def start(self, position: int) -> int:
        """Token offset in the epoch where the shard at `position` starts."""
        return int(self.ends[position] - self.ds.shard_tokens[self.files[position]])


class PreparedStream:
    """`PackedStream`'s interface over prepared data: a token position, no buffer."""

    def __init__(self, dataset: PreparedDataset, seq_len: int):
        if seq_len < 1:
            raise DataError(f"data: seq_len must be >= 1, got {seq_len}")
        if "chat" in dataset.meta:  # zero-length dropped conversations, whole-document packing
            raise DataError(f"{dataset.path}: prepared chat data is read by "
                            f"runtime.data.chat.prepared, not as a text stream")
        self.ds, self.seq_len = dataset, seq_len
        self.position = 0  # the next window's first token in the endless stream
        self._orders: dict[int, _EpochOrder] = {}

    def _order(self, epoch: int) -> _EpochOrder:
        if not self.ds.shuffle:
            epoch = 0  # every epoch has the same order: built once
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
        pos = np.searchsorted(order.ends, within, side="right")  # shard position of each token
        lo, hi = int(pos.min()), int(pos.max())
        if lo == hi:
            offsets, k = self._locate_in_shard(order, lo, within)
        else:
            offsets, k = np.empty_like(within), np.empty_like(within)
            for p in np.unique(pos):
                m = pos == p
                offsets[m], k[m] = self._locate_in_shard(order, int(p), within[m])
        return offsets, epoch * self.ds.num_docs + order.docs_before[pos] + k  # serials

    def _locate_in_shard(self, order: _EpochOrder, position: int, within: np.ndarray):
        """(global token offsets, index in the shard's order) of tokens in one shard."""
        shard = order.shard(position)
        w = within - order.start(position)  # token offset inside the shard's stream
        k = np.searchsorted(shard.ends, w, side="right")  # the document of each token
        return shard.base[k] + w, k

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
        position = int(np.searchsorted(order.ends, within, side="right"))
        shard = order.shard(position)
        w = within - order.start(position)
        k = int(np.searchsorted(shard.ends, w, side="right"))
        length = int(self.ds.lengths(shard.docs[k]))
        return {"epoch": int(epoch), "shard": position, "index": int(shard.cursor_index[k]),
                "offset": int(w - (shard.ends[k] - length))}

    def load_state_dict(self, sd: dict) -> None:
        epoch, position, index = int(sd["epoch"]), int(sd["shard"]), int(sd["index"])
        offset = int(sd["offset"])
        order = self._order(epoch)
        k = order.shard(position).find(index) if 0 <= position < self.ds.num_shards else None
        if k is None:
            raise DataError(f"data: resume cursor (epoch {epoch}, shard {position}, index "
                            f"{index}) names no document of {self.ds.name}: was the data changed?")
        shard = order.shard(position)
        length = int(self.ds.lengths(shard.docs[k]))
        if offset >= length:
            raise DataError(f"data: resume offset {offset} is past the end of document "
                            f"{(epoch, position, index)} ({length} tokens): was the data or "
                            f"the tokenizer changed?")
        self.position = (epoch * self.ds.num_tokens + order.start(position)
                         + int(shard.ends[k]) - length + offset)
