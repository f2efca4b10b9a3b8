"""Document sources: a deterministic, resumable, endless sequence of documents.

Every document has a cursor `(epoch, shard, index)`:
  * `EmbeddedSource`: the corpus shipped in runtime/assets (no network).
  * `FileSource`: local files (runtime.data.readers), a directory (recursive) or a glob,
    sorted by path; a shard is one file.
  * `HFSource`: `datasets.load_dataset(...)`, streamed unless `hf_streaming = false`;
    only used when the user sets `hf_dataset`, and `datasets` is imported only then.
Shuffling (optional, seeded, a new order each epoch): the shard (file) order is permuted,
then the documents inside each shard; a shard is read whole only when shuffling. The
embedded corpus is one shard, so it is fully shuffled. HF sources use `datasets`' buffered
shuffle with `set_epoch` (a full permutation when not streaming). Empty/whitespace
documents are skipped.

A source yields items (text for these sources); `source.encoder(tokenizer)` turns a batch
of items into `Document`s (token ids + optional per-token loss mask), so a source of other
items (chat conversations) plugs into the same packing by overriding `encoder`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from runtime.errors import DataDependencyError, DataError, DataFileNotFoundError
from runtime.data.packing import Document, PackedStream, TextEncoder
from runtime.data.readers import (cut_points, range_length, read_docs, resolve_files,
                                  splittable, text_of)
from runtime.data.schema import DataConfig

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_CORPUS = ASSETS_DIR / "corpus.jsonl.gz"

# A cursor names one document of the endless stream: (epoch, shard, index in shard).
Cursor = tuple  # (int, int, int)


def permutation(n: int, *key: int) -> np.ndarray:
    """A reproducible permutation of range(n) for (seed, epoch, shard...)."""
    # SeedSequence over the key: independent, reproducible orders. It rejects negative
    # ints, so keys are taken modulo 2**64.
    entropy = [int(k) % (1 << 64) for k in key]
    return np.random.Generator(np.random.PCG64(entropy)).permutation(n)


def _derived_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) % (1 << 64) for k in key]).generate_state(1)[0])


class DocumentSource:
    """A deterministic, resumable sequence of documents for each epoch."""

    name = "?"

    def documents(self, epoch: int, shard: int, index: int) -> Iterator[tuple[int, int, object]]:
        """Yield (shard, index, item) of `epoch` starting at document (shard, index)."""
        raise NotImplementedError

    def keep(self, item) -> bool:
        """Whether an item is a document (blank texts are not)."""
        return bool(item) and not item.isspace()

    def num_shards(self) -> int:
        """Shards in their natural (unshuffled) order; `prepare` reads them one by one."""
        raise NotImplementedError

    def shard_items(self, shard: int) -> Iterator[tuple[int, object]]:
        """(index, item) of every record of natural shard `shard`, blank ones included."""
        raise NotImplementedError

    def shard_size(self, shard: int) -> tuple[int, bool] | None:
        """(bytes, whether ranges of it can be read alone) of natural shard `shard`, or None
        when unknown (a streamed dataset): `prepare` plans its parts with it."""
        return None

    def cut_points(self, shard: int, every: int) -> list[int]:
        """Range bounds [0, ..., end] cutting a splittable shard about every `every` bytes
        (a file: at line starts; a dataset: in rows)."""
        raise NotImplementedError

    def range_items(self, shard: int, bounds: tuple[int, int]) -> Iterator[tuple[int, object]]:
        """shard_items of the records in one range of a splittable shard, indexed from 0 at
        the range's first record."""
        raise NotImplementedError

    def range_length(self, shard: int, bounds: tuple[int, int]) -> int:
        """Record indices one range covers (blank lines included): where the next starts."""
        raise NotImplementedError

    def encoder(self, tokenizer) -> Callable[[list], list[Document]]:
        """Items -> Documents (batched): text is [BOS] tokens [EOS], every token trained."""
        return TextEncoder(tokenizer)

    def packer(self, tokenizer, encode, seq_len: int, batch_docs: int, items=None, name=None):
        """The stream that packs this source's Documents into windows: one token stream cut
        into seq_len windows (text); a chat source keeps each conversation whole. `items`
        replaces `self.stream` and `name` the source's name in messages (a wrapper such as a
        held-out split filters it)."""
        return PackedStream(items or self.stream, encode, seq_len, batch_docs)

    def stream(self, cursor: Cursor = (0, 0, 0)) -> Iterator[tuple[Cursor, object]]:
        """Endless (cursor, item) stream over epochs starting at `cursor`; skips blank docs."""
        epoch, shard, index = cursor
        while True:
            yielded = False
            for s, i, item in self.documents(epoch, shard, index):
                if self.keep(item):
                    yielded = True
                    yield (epoch, s, i), item
            if not yielded and (shard, index) == (0, 0):
                raise DataError(f"data: no non-empty documents in {self.name}")
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
            raise DataError("data: no input files")
        for f in self.files:
            if not f.is_file():
                raise DataFileNotFoundError(f"data: {f} does not exist")
        self.text_key, self.shuffle, self.seed = text_key, shuffle, seed
        self.name = name or (
            str(self.files[0]) if len(self.files) == 1 else f"{len(self.files)} files"
        )

    def shard_order(self, epoch: int) -> list[Path]:
        if not self.shuffle:
            return self.files
        return [self.files[i] for i in permutation(len(self.files), self.seed, epoch)]

    def read(self, path: Path, start: int = 0,
             byte_range: tuple[int, int] | None = None) -> Iterator[tuple[int, object]]:
        """(index, item) of one file from `start`, or of its lines in `byte_range` (a chat
        source reads conversations)."""
        return read_docs(path, self.text_key, start, byte_range)

    def num_shards(self) -> int:
        return len(self.files)

    def shard_items(self, shard: int) -> Iterator[tuple[int, object]]:
        return self.read(self.files[shard])

    def shard_size(self, shard: int) -> tuple[int, bool]:
        path = self.files[shard]
        return path.stat().st_size, splittable(path)

    def cut_points(self, shard: int, every: int) -> list[int]:
        return cut_points(self.files[shard], every)

    def range_items(self, shard: int, bounds: tuple[int, int]) -> Iterator[tuple[int, object]]:
        return self.read(self.files[shard], 0, bounds)

    def range_length(self, shard: int, bounds: tuple[int, int]) -> int:
        return range_length(self.files[shard], *bounds)

    def documents(self, epoch: int, shard: int, index: int) -> Iterator[tuple[int, int, object]]:
        order = self.shard_order(epoch)
        for s in range(shard, len(order)):
            start = index if s == shard else 0
            if not self.shuffle:
                for i, text in self.read(order[s], start):
                    yield s, i, text
                continue
            # Shuffling needs the whole shard: `index` counts positions in the permuted order.
            docs = [text for _, text in self.read(order[s])]
            perm = permutation(len(docs), self.seed, epoch, s + 1)
            for i in range(start, len(docs)):
                yield s, i, docs[perm[i]]


class EmbeddedSource(FileSource):
    """The small real-text corpus shipped in runtime/assets (see its README)."""

    def __init__(self, shuffle: bool = False, seed: int = 0):
        if not EMBEDDED_CORPUS.is_file():
            raise DataFileNotFoundError(
                f"embedded corpus missing: {EMBEDDED_CORPUS} (run scripts/build_assets.py)"
            )
        super().__init__([EMBEDDED_CORPUS], "text", shuffle, seed, name="embedded corpus")


def _saved_dataset_kind(dataset: str) -> str:
    """'dataset' | 'dict' when `dataset` is a local folder written by datasets' save_to_disk
    (its state.json / dataset_dict.json), else ''."""
    path = Path(dataset).expanduser()
    if not path.is_dir():
        return ""
    if (path / "dataset_dict.json").is_file():
        return "dict"
    return "dataset" if (path / "state.json").is_file() else ""


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
            import datasets  # noqa: F401  (optional dependency, imported only for HF data)
        except ImportError:
            raise DataDependencyError(
                f"data.hf_dataset={dataset!r} needs the `datasets` package: "
                "pip install 'gptoss-runtime[data]'"
            ) from None
        self.dataset, self.config, self.split, self.streaming = dataset, config, split, streaming
        self.text_key, self.shuffle, self.seed = text_key, shuffle, seed
        self.shuffle_buffer = shuffle_buffer
        self.name = f"hf:{dataset}" + (f"/{config}" if config else "") + f"[{split}]"
        # A folder written by save_to_disk: Arrow files read by index (load_from_disk),
        # which load_dataset refuses.
        self.saved = _saved_dataset_kind(dataset)
        if self.saved:
            self.streaming = False

    def _load(self):
        import datasets  # optional dependency, imported only for HF data

        try:
            if self.saved:
                return self._load_saved(datasets)
            return datasets.load_dataset(
                self.dataset, self.config or None, split=self.split, streaming=self.streaming
            )
        except DataError:
            raise
        except Exception as e:  # datasets raises many types (FileNotFound, ValueError, hub errors)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"data.hf_dataset={self.dataset!r}: cannot load: {first}") from None

    def _load_saved(self, datasets):
        """The split of a saved DatasetDict; a saved Dataset is the "train" split only (a
        validation source naming another split must not silently read the training rows)."""
        ds = datasets.load_from_disk(str(Path(self.dataset).expanduser()))
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise DataError(f"data.hf_dataset={self.dataset!r}: saved DatasetDict has no "
                                f"split {self.split!r} (it has {', '.join(ds)})")
            return ds[self.split]
        if self.split != "train":
            raise DataError(f"data.hf_dataset={self.dataset!r} is one saved Dataset (no splits): "
                            f"split {self.split!r} asked; save a DatasetDict, or give the "
                            "held-out rows their own folder")
        return ds

    def num_shards(self) -> int:
        return 1

    def shard_items(self, shard: int) -> Iterator[tuple[int, object]]:
        for i, example in enumerate(self._load()):
            yield i, self.item_of(example, f"{self.name} example {i}")

    # A dataset read by index (a save_to_disk folder, or not streamed) is cut into row ranges
    # for `prepare`'s workers; a streamed one is one part.
    def shard_size(self, shard: int) -> tuple[int, bool] | None:
        if self.streaming:
            return None
        return int(self._load().data.nbytes), True

    def cut_points(self, shard: int, every: int) -> list[int]:
        ds = self._load()
        rows, nbytes = len(ds), max(int(ds.data.nbytes), 1)
        step = max(1, rows * every // nbytes)
        return sorted({0, rows, *range(step, rows, step)})

    def range_items(self, shard: int, bounds: tuple[int, int]) -> Iterator[tuple[int, object]]:
        lo, hi = bounds
        for i, example in enumerate(self._load().select(range(lo, hi))):
            yield i, self.item_of(example, f"{self.name} example {lo + i}")

    def range_length(self, shard: int, bounds: tuple[int, int]) -> int:
        return bounds[1] - bounds[0]

    def documents(self, epoch: int, shard: int, index: int) -> Iterator[tuple[int, int, object]]:
        ds = self._load()
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
            yield 0, i, self.item_of(example, f"{self.name} example {i}")

    def item_of(self, example, where: str):
        """The item of one dataset example (its text; a chat source parses a conversation)."""
        return text_of(example, self.text_key, where)


def source_kind(data_cfg: DataConfig | None) -> str:
    """'embedded' | 'path' | 'hf' | 'chat' | 'prepared'. The DataConfig (None: the defaults)
    must pass its own cross-key rules; an empty `dataset` (a [validation] source that keeps
    the training kind) is inferred from the paths given."""
    data_cfg = data_cfg or DataConfig()
    for key, problem in data_cfg.problems():
        raise DataError(f"data.{key} {problem}")
    if data_cfg.dataset:
        return data_cfg.dataset
    path, hf = data_cfg.dataset_path, data_cfg.hf_dataset
    if hf and path:
        raise DataError("data: both dataset_path and hf_dataset are set; choose data.dataset")
    return "hf" if hf else "path" if path else "embedded"


def build_source(data_cfg: DataConfig | None = None) -> DocumentSource:
    """The DocumentSource a [data] config names (the embedded corpus by default)."""
    data_cfg = data_cfg or DataConfig()
    kind = source_kind(data_cfg)
    shuffle = bool(data_cfg.shuffle)
    seed = int(data_cfg.shuffle_seed)
    text_key = data_cfg.text_key
    if kind == "embedded":
        return EmbeddedSource(shuffle, seed)
    if kind == "path":
        path = data_cfg.dataset_path
        if not path:
            raise DataError("data.dataset is 'path' but data.dataset_path is empty")
        return FileSource(resolve_files(path), text_key, shuffle, seed)
    if kind == "hf":
        hf = data_cfg.hf_dataset
        if not hf:
            raise DataError("data.dataset is 'hf' but data.hf_dataset is empty")
        return HFSource(
            hf,
            data_cfg.hf_config,
            data_cfg.hf_split,
            text_key,
            shuffle,
            seed,
            int(data_cfg.shuffle_buffer),
            bool(data_cfg.hf_streaming),
        )
    raise DataError(f"data.dataset must be 'embedded', 'path', 'hf' or 'chat', got {kind!r}")
