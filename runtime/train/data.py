"""Documents -> packed token windows -> the same global batch on every data-parallel rank.

Pipeline
--------
1. A `DocumentSource` yields document texts in a deterministic order, epoch after
   epoch. Every document has a cursor `(epoch, shard, index)`:
     * `EmbeddedSource`: the corpus shipped in runtime/assets (no network).
     * `FileSource`: local files, a directory (recursive) or a glob, sorted by path.
       `.jsonl` / `.json` (+ `.gz`): one JSON object per line with a text key
       (a `.json` file may also be one JSON array of objects); `.parquet`: one row per
       document (needs pyarrow); `.txt` / `.md`: the whole file is ONE document.
     * `HFSource`: `datasets.load_dataset(...)`, streamed unless `hf_streaming = false`;
       only used when the user sets `hf_dataset`, and `datasets` is imported only then.
   Shuffling (optional, seeded, a new order each epoch): the shard (file) order is
   permuted, then the documents inside each shard; a shard is read whole only when
   shuffling. The embedded corpus is one shard, so it is fully shuffled. HF sources
   use `datasets`' buffered shuffle with `set_epoch` (a full permutation when not
   streaming). Empty/whitespace documents are skipped.
2. `PackedStream` tokenizes documents lazily in batches (`Tokenizer.encode_batch`) as
   `[BOS] + tokens + [EOS]`, concatenates them and cuts windows of `seq_len + 1`
   tokens with a stride of `seq_len`: consecutive windows share one token, so every
   token of the stream is a label exactly once (nothing skipped at window edges).
   For a window `w`:
     tokens = w[:-1], labels = w[1:]               (labels are never masked: the EOS
                                                    -> next BOS pair is a constant target)
     document_ids[i] = 0 for the segment the window starts in, +1 at each new document
     positions[i]    = index of token i since its segment started INSIDE THIS WINDOW:
                       0 at each BOS and 0 at the window start even when a document
                       continues from the previous window. The model never attends across
                       windows, so the continuation is a fresh context; this also keeps
                       positions < seq_len.
   With document masking off: positions = arange(seq_len), document_ids = 0.
3. `ParallelAwareDataLoader` draws `global_batch_size` consecutive windows per step and
   returns rank r's rows [r*B/dp, (r+1)*B/dp). Every rank reads and tokenizes the same
   global stream, so the global batch does not depend on the dp degree and the
   loader state is identical on all ranks.

Gradient accumulation: `next(loader)` returns the rank's whole slice of the global step
batch; the trainer cuts it into micro-batches with `split_microbatches`.

Resumption: `state_dict()` is a few integers, the cursor of the document at the head of
the token buffer plus how many of its tokens were consumed; `load_state_dict`
re-reads and re-tokenizes from that document, so the next batch equals the one the
uninterrupted loader would have produced. It does not depend on batch size or dp degree,
so a run may resume with a different layout (it then continues the same token stream).
"""

from __future__ import annotations

import glob as globlib
import gzip
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_CORPUS = ASSETS_DIR / "corpus.jsonl.gz"

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES

STATE_VERSION = 1

# A cursor names one document of the endless stream: (epoch, shard, index in shard).
Cursor = tuple  # (int, int, int)


@dataclass
class DataConfig:
    """The [data] keys this module reads; any object (runtime.train.config.DataSection) or
    dict with these names works, missing ones take these defaults."""

    dataset: str = ""  # "embedded" | "path" | "hf"; "" = hf if hf_dataset, path if dataset_path
    dataset_path: str | list[str] = ""  # file, directory or glob (or a list of them)
    text_key: str = "text"  # JSON key / parquet column / HF field holding the text
    hf_dataset: str = ""  # HF datasets name or local path; needs `datasets`
    hf_config: str = ""  # HF dataset config name ("" = default)
    hf_split: str = "train"
    hf_streaming: bool = True  # False: download/prepare the split, then read it by index
    document_mask: bool = True  # per-document positions and ids (else one long context)
    shuffle: bool = False  # a new seeded order each epoch
    shuffle_seed: int = 0
    shuffle_buffer: int = 10000  # HF streaming shuffle buffer (documents)
    tokenize_batch_docs: int = 64  # documents per encode_batch call


def _cfg(cfg, name: str):
    default = getattr(DataConfig, name)
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _permutation(n: int, *key: int) -> np.ndarray:
    # SeedSequence over (seed, epoch, shard): independent, reproducible orders. It rejects
    # negative ints, so seeds are taken modulo 2**64.
    entropy = [int(k) % (1 << 64) for k in key]
    return np.random.Generator(np.random.PCG64(entropy)).permutation(n)


def _derived_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) % (1 << 64) for k in key]).generate_state(1)[0])


# ============================================================================ readers
def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _text_of(obj, text_key: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise ValueError(
            f"{where}: expected a JSON object with key {text_key!r}, got {type(obj).__name__}"
        )
    if text_key not in obj:
        keys = ", ".join(sorted(map(str, obj)))[:200]
        raise ValueError(f"{where}: no {text_key!r} key (keys: {keys}); set data.text_key")
    text = obj[text_key]
    if not isinstance(text, str):
        raise ValueError(f"{where}: {text_key!r} is {type(text).__name__}, expected a string")
    return text


def read_json_docs(path: Path, text_key: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """(index, text) for each line from `start`; blank lines keep their index but yield nothing."""
    with _open_text(path) as f:
        if path.name.lower().endswith((".json", ".json.gz")):
            content = f.read()
            if content.lstrip().startswith("["):
                try:
                    items = json.loads(content)
                except ValueError as e:
                    raise ValueError(f"{path}: invalid JSON: {e}") from None
                for i in range(start, len(items)):
                    yield i, _text_of(items[i], text_key, f"{path}[{i}]")
                return
            lines: Iterator[str] = iter(content.splitlines())
        else:
            lines = f
        for i, line in enumerate(lines):
            if i < start or not line.strip():
                continue  # skipping unparsed lines keeps resumption cheap
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{i + 1}: invalid JSON: {e}") from None
            yield i, _text_of(obj, text_key, f"{path}:{i + 1}")


def _import_pyarrow_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow: pip install 'gptoss-runtime[data]' (or pyarrow)"
        ) from None
    return pq


def read_parquet_docs(path: Path, text_key: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """(row, text) from `start`; whole row groups before `start` are never decoded."""
    pq = _import_pyarrow_parquet(path)
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_key not in names:
        raise ValueError(
            f"{path}: no column {text_key!r} (columns: {', '.join(names)}); set data.text_key"
        )
    row0 = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if row0 + n > start:
            column = pf.read_row_group(rg, columns=[text_key]).column(0).to_pylist()
            for j in range(max(start - row0, 0), n):
                text = column[j]
                if text is not None and not isinstance(text, str):
                    raise ValueError(f"{path}: row {row0 + j}: {text_key!r} is not a string")
                yield row0 + j, text or ""
        row0 += n


def read_text_doc(path: Path, start: int = 0) -> Iterator[tuple[int, str]]:
    """A text file is one document (index 0)."""
    if start == 0:
        yield 0, path.read_text(encoding="utf-8")


def read_docs(path: Path, text_key: str, start: int = 0) -> Iterator[tuple[int, str]]:
    if _has_suffix(path, JSON_SUFFIXES):
        return read_json_docs(path, text_key, start)
    if _has_suffix(path, PARQUET_SUFFIXES):
        return read_parquet_docs(path, text_key, start)
    if _has_suffix(path, TEXT_SUFFIXES):
        return read_text_doc(path, start)
    raise ValueError(f"{path}: unsupported data file type (use {', '.join(SUPPORTED_SUFFIXES)})")


def _is_data_file(path: Path, root: Path) -> bool:
    # Hidden files and folders (.git, .cache of HF downloads) are never data.
    hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
    return not hidden and path.is_file() and _has_suffix(path, SUPPORTED_SUFFIXES)


def resolve_files(spec: str | Sequence[str]) -> list[Path]:
    """Files named by a path, a directory (recursive, supported types), a glob, or a list."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    files: list[Path] = []
    for s in specs:
        s = os.path.expanduser(str(s))
        if globlib.has_magic(s):
            matches = sorted(globlib.glob(s, recursive=True))
            if not matches:
                raise FileNotFoundError(f"data.dataset_path: no files match {s!r}")
        elif os.path.exists(s):
            matches = [s]
        else:
            raise FileNotFoundError(f"data.dataset_path: {s} does not exist")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                found = sorted(
                    (q for q in p.rglob("*") if _is_data_file(q, p)),
                    key=lambda q: q.relative_to(p).as_posix(),
                )
                if not found and not globlib.has_magic(s):
                    raise FileNotFoundError(
                        f"data.dataset_path: no {'/'.join(SUPPORTED_SUFFIXES)} files under {p}"
                    )
                files.extend(found)
            elif _has_suffix(p, SUPPORTED_SUFFIXES):
                files.append(p)
            elif not globlib.has_magic(s):
                raise ValueError(
                    f"{p}: unsupported data file type (use {', '.join(SUPPORTED_SUFFIXES)})"
                )
    if not files:
        raise FileNotFoundError(f"data.dataset_path: no supported data files in {spec!r}")
    return files


# ============================================================================ sources
class DocumentSource:
    """A deterministic, resumable sequence of documents for each epoch."""

    name = "?"

    def documents(self, epoch: int, shard: int, index: int) -> Iterator[tuple[int, int, str]]:
        """Yield (shard, index, text) of `epoch` starting at document (shard, index)."""
        raise NotImplementedError

    def stream(self, cursor: Cursor = (0, 0, 0)) -> Iterator[tuple[Cursor, str]]:
        """Endless (cursor, text) stream over epochs starting at `cursor`; skips blank docs."""
        epoch, shard, index = cursor
        while True:
            yielded = False
            for s, i, text in self.documents(epoch, shard, index):
                if text and not text.isspace():
                    yielded = True
                    yield (epoch, s, i), text
            if not yielded and (shard, index) == (0, 0):
                raise ValueError(f"data: no non-empty documents in {self.name}")
            epoch, shard, index = epoch + 1, 0, 0


class FileSource(DocumentSource):
    """Documents of local files, read shard (file) by shard in the given order."""

    def __init__(
        self,
        files: Sequence[Path],
        text_key: str = "text",
        shuffle: bool = False,
        seed: int = 0,
        name: str | None = None,
    ):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("data: no input files")
        for f in self.files:
            if not f.is_file():
                raise FileNotFoundError(f"data: {f} does not exist")
        self.text_key, self.shuffle, self.seed = text_key, shuffle, seed
        self.name = name or (
            str(self.files[0]) if len(self.files) == 1 else f"{len(self.files)} files"
        )

    def _shard_order(self, epoch: int) -> list[Path]:
        if not self.shuffle:
            return self.files
        return [self.files[i] for i in _permutation(len(self.files), self.seed, epoch)]

    def documents(self, epoch: int, shard: int, index: int) -> Iterator[tuple[int, int, str]]:
        order = self._shard_order(epoch)
        for s in range(shard, len(order)):
            start = index if s == shard else 0
            if not self.shuffle:
                for i, text in read_docs(order[s], self.text_key, start):
                    yield s, i, text
                continue
            # Shuffling needs the whole shard: `index` counts positions in the permuted order.
            docs = [text for _, text in read_docs(order[s], self.text_key)]
            perm = _permutation(len(docs), self.seed, epoch, s + 1)
            for i in range(start, len(docs)):
                yield s, i, docs[perm[i]]


class EmbeddedSource(FileSource):
    """The small real-text corpus shipped in runtime/assets (see its README)."""

    def __init__(self, shuffle: bool = False, seed: int = 0):
        if not EMBEDDED_CORPUS.is_file():
            raise FileNotFoundError(
                f"embedded corpus missing: {EMBEDDED_CORPUS} (run scripts/build_assets.py)"
            )
        super().__init__([EMBEDDED_CORPUS], "text", shuffle, seed, name="embedded corpus")


class HFSource(DocumentSource):
    """HF `datasets`: streamed (default) or a prepared split read by index.

    Resumes at document `index` of the epoch's order by skipping that many examples
    (streaming) or by index (prepared). Shuffling reshuffles every epoch: a buffered
    shuffle seeded by (seed, epoch) when streaming, a full permutation otherwise.
    """

    def __init__(
        self,
        dataset: str,
        config: str = "",
        split: str = "train",
        text_key: str = "text",
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 10000,
        streaming: bool = True,
    ):
        try:
            import datasets  # noqa: F401  (optional dependency)
        except ImportError:
            raise ImportError(
                f"data.hf_dataset={dataset!r} needs the `datasets` package: "
                "pip install 'gptoss-runtime[data]'"
            ) from None
        self.dataset, self.config, self.split, self.streaming = dataset, config, split, streaming
        self.text_key, self.shuffle, self.seed = text_key, shuffle, seed
        self.shuffle_buffer = shuffle_buffer
        self.name = f"hf:{dataset}" + (f"/{config}" if config else "") + f"[{split}]"

    def documents(self, epoch: int, shard: int, index: int) -> Iterator[tuple[int, int, str]]:
        import datasets

        ds = datasets.load_dataset(
            self.dataset, self.config or None, split=self.split, streaming=self.streaming
        )
        if self.streaming:
            if self.shuffle:
                ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
                ds.set_epoch(epoch)  # seeds the buffer and shard order with seed + epoch
            examples = ds.skip(index) if index else ds
        else:
            if self.shuffle:
                ds = ds.shuffle(seed=_derived_seed(self.seed, epoch))
            examples = ds.select(range(index, len(ds))) if index else ds
        for i, example in enumerate(examples, start=index):
            yield 0, i, _text_of(example, self.text_key, f"{self.name} example {i}")


def build_source(data_cfg=None) -> DocumentSource:
    """The DocumentSource a [data] config names (the embedded corpus by default)."""
    kind, path, hf = (_cfg(data_cfg, k) for k in ("dataset", "dataset_path", "hf_dataset"))
    shuffle, seed = bool(_cfg(data_cfg, "shuffle")), int(_cfg(data_cfg, "shuffle_seed"))
    text_key = _cfg(data_cfg, "text_key")
    if not kind:
        if hf and path:
            raise ValueError("data: both dataset_path and hf_dataset are set; choose data.dataset")
        kind = "hf" if hf else "path" if path else "embedded"
    if kind == "embedded":
        return EmbeddedSource(shuffle, seed)
    if kind == "path":
        if not path:
            raise ValueError("data.dataset is 'path' but data.dataset_path is empty")
        return FileSource(resolve_files(path), text_key, shuffle, seed)
    if kind == "hf":
        if not hf:
            raise ValueError("data.dataset is 'hf' but data.hf_dataset is empty")
        return HFSource(
            hf,
            _cfg(data_cfg, "hf_config"),
            _cfg(data_cfg, "hf_split"),
            text_key,
            shuffle,
            seed,
            int(_cfg(data_cfg, "shuffle_buffer")),
            bool(_cfg(data_cfg, "hf_streaming")),
        )
    raise ValueError(f"data.dataset must be 'embedded', 'path' or 'hf', got {kind!r}")


# ============================================================================ packing
class PackedStream:
    """Endless stream of [BOS] doc [EOS] tokens cut into overlapping windows of seq_len + 1.

    Buffer: `_tokens` / `_docs` (document serial of each token) hold the unread tail of the
    stream; `_heads` has one [cursor, offset, left] per buffered document (offset = tokens
    of that document before its first buffered token, left = its tokens still buffered),
    so the state can name the head document and the offset inside it.
    """

    def __init__(
        self, source: DocumentSource, tokenizer, seq_len: int, tokenize_batch_docs: int = 64
    ):
        if seq_len < 1:
            raise ValueError(f"data: seq_len must be >= 1, got {seq_len}")
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.batch_docs = max(1, int(tokenize_batch_docs))
        self._reset((0, 0, 0), 0)

    def _reset(self, cursor: Cursor, offset: int) -> None:
        self._docs_iter = self.source.stream(cursor)
        self._tokens = np.empty(0, dtype=np.int64)
        self._docs = np.empty(0, dtype=np.int64)
        self._heads: list[list] = []
        self._skip = offset  # tokens of the first document consumed before a resume
        self._next_serial = 0

    def _fill(self, need: int) -> None:
        """Tokenize documents until the buffer holds at least `need` tokens."""
        toks, docs = [self._tokens], [self._docs]
        have = len(self._tokens)
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        while have < need:
            batch = [next(self._docs_iter) for _ in range(self.batch_docs)]
            for (cursor, _), ids in zip(
                batch, self.tokenizer.encode_batch([t for _, t in batch]), strict=True
            ):
                seq = np.empty(len(ids) + 2, dtype=np.int64)  # [BOS] ids [EOS]
                seq[0], seq[1:-1], seq[-1] = bos, ids, eos
                skip, self._skip = self._skip, 0
                if skip >= len(seq):
                    raise ValueError(
                        f"data: resume offset {skip} is past the end of document {cursor} "
                        f"({len(seq)} tokens): was the data or the tokenizer changed?"
                    )
                seq = seq[skip:]
                toks.append(seq)
                docs.append(np.full(len(seq), self._next_serial, dtype=np.int64))
                self._heads.append([cursor, skip, len(seq)])
                self._next_serial += 1
                have += len(seq)
        self._tokens, self._docs = np.concatenate(toks), np.concatenate(docs)

    def _consume(self, n: int) -> None:
        self._tokens, self._docs = self._tokens[n:], self._docs[n:]
        while n:
            head = self._heads[0]
            take = min(n, head[2])
            head[1] += take
            head[2] -= take
            n -= take
            if head[2] == 0:
                self._heads.pop(0)

    def next_windows(self, n: int, rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The next `n` windows; the stream advances by n * seq_len tokens.

        Returns (tokens, doc_serials), both int64 [len(rows), seq_len + 1]; only the rows in
        `rows` (default all) are materialized, so each rank builds just its slice.
        """
        S = self.seq_len
        self._fill(n * S + 1)
        starts = np.arange(n, dtype=np.int64)[rows if rows is not None else slice(None)] * S  # [r]
        idx = starts[:, None] + np.arange(S + 1, dtype=np.int64)[None, :]  # [r, S+1]
        out = self._tokens[idx], self._docs[idx]
        self._consume(n * S)
        return out

    def state_dict(self) -> dict:
        if not self._heads:
            self._fill(1)  # name the next document (tokenizing it is deterministic)
        (epoch, shard, index), offset, _ = self._heads[0]
        return {
            "epoch": int(epoch),
            "shard": int(shard),
            "index": int(index),
            "offset": int(offset),
        }

    def load_state_dict(self, sd: dict) -> None:
        self._reset((int(sd["epoch"]), int(sd["shard"]), int(sd["index"])), int(sd["offset"]))


def window_batch(
    windows: np.ndarray, doc_serials: np.ndarray, document_masking: bool = True
) -> dict:
    """Model inputs of packed windows.

    windows, doc_serials: int64 [R, S+1] -> dict of int64 tensors [R, S]:
    tokens, labels, positions, document_ids (see the module docstring for the rules).
    """
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
        positions, document_ids = cols, np.zeros((R, S), dtype=np.int64)
    return {
        "tokens": torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
        "labels": torch.from_numpy(np.ascontiguousarray(windows[:, 1:])),
        "positions": torch.from_numpy(np.ascontiguousarray(positions)),
        "document_ids": torch.from_numpy(np.ascontiguousarray(document_ids)),
    }


def split_microbatches(batch: dict, num_microbatches: int) -> list[dict]:
    """Cut a rank's step batch [rows, S] into `num_microbatches` equal [rows/n, S] pieces."""
    rows = next(iter(batch.values())).shape[0]
    if num_microbatches < 1 or rows % num_microbatches:
        raise ValueError(
            f"data: {rows} rows per rank cannot be split into {num_microbatches} micro-batches"
        )
    chunks = {k: v.chunk(num_microbatches, dim=0) for k, v in batch.items()}
    return [{k: c[i] for k, c in chunks.items()} for i in range(num_microbatches)]


# ============================================================================ loader
class ParallelAwareDataLoader:
    """Iterator of this rank's slice of the global step batch.

    Every step consumes `global_batch_size` windows from one global `PackedStream`; rank
    r receives rows [r*B/dp, (r+1)*B/dp) as a dict of int64 tensors [B/dp, seq_len]
    (`tokens`, `labels`, `positions`, `document_ids`). The trainer splits it into
    micro-batches for gradient accumulation (`split_microbatches`).
    """

    def __init__(
        self,
        source: DocumentSource,
        tokenizer,
        seq_len: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        *,
        document_masking: bool = True,
        tokenize_batch_docs: int = 64,
    ):
        if global_batch_size < 1:
            raise ValueError(f"data: global_batch_size must be >= 1, got {global_batch_size}")
        if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise ValueError(
                f"data: dp_rank {dp_rank} is not in [0, dp_world_size={dp_world_size})"
            )
        if global_batch_size % dp_world_size:
            raise ValueError(
                f"data: global_batch_size ({global_batch_size}) is not divisible by the "
                f"data-parallel degree ({dp_world_size})"
            )
        self.source, self.seq_len = source, seq_len
        self.global_batch_size, self.dp_rank, self.dp_world_size = (
            global_batch_size,
            dp_rank,
            dp_world_size,
        )
        self.local_batch_size = global_batch_size // dp_world_size
        self.document_masking = document_masking
        self.stream = PackedStream(source, tokenizer, seq_len, tokenize_batch_docs)
        self.step = 0  # batches drawn (informational; resumption uses the stream cursor)

    def __iter__(self) -> "ParallelAwareDataLoader":
        return self

    def __next__(self) -> dict:
        b = self.local_batch_size
        rows = slice(self.dp_rank * b, (self.dp_rank + 1) * b)
        windows, serials = self.stream.next_windows(self.global_batch_size, rows)  # [b, S+1] each
        self.step += 1
        return window_batch(windows, serials, self.document_masking)

    @property
    def epoch(self) -> int:
        """Epoch of the next token to be read."""
        return self.stream.state_dict()["epoch"]

    def state_dict(self) -> dict:
        """JSON-serializable and identical on every rank."""
        return {
            "version": STATE_VERSION,
            "source": self.source.name,
            "step": self.step,
            **self.stream.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        if int(sd.get("version", STATE_VERSION)) != STATE_VERSION:
            raise ValueError(f"data: unsupported loader state version {sd.get('version')!r}")
        if sd.get("source", self.source.name) != self.source.name:
            warnings.warn(
                f"data: resuming a {sd['source']!r} position on {self.source.name!r}", stacklevel=2
            )
        self.stream.load_state_dict(sd)
        self.step = int(sd.get("step", 0))


def build_dataloader(
    data_cfg,
    tokenizer,
    seq_len: int,
    global_batch_size: int,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    *,
    document_masking: bool | None = None,
) -> ParallelAwareDataLoader:
    """The loader a [data] config describes (`data_cfg`: DataConfig, dict, any object, or None)."""
    if document_masking is None:
        document_masking = bool(_cfg(data_cfg, "document_mask"))
    return ParallelAwareDataLoader(
        build_source(data_cfg),
        tokenizer,
        seq_len,
        global_batch_size,
        dp_rank,
        dp_world_size,
        document_masking=document_masking,
        tokenize_batch_docs=int(_cfg(data_cfg, "tokenize_batch_docs")),
    )
