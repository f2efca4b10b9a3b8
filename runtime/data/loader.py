"""The stateful loader: this data-parallel rank's rows of the same global batch every step.

`ParallelAwareDataLoader` draws `global_batch_size` consecutive windows per step from one
`PackedStream` and returns rank r's rows [r*B/dp, (r+1)*B/dp). Every rank reads and
encodes the same global stream, so the global batch does not depend on the dp degree and
the loader state is identical on all ranks. Ranks and degrees are plain ints.

Gradient accumulation: `next(loader)` returns the rank's whole slice of the global step
batch; the trainer cuts it into micro-batches with `split_microbatches`.

Resumption: `state_dict()` is a few integers, the cursor of the document at the head of
the token buffer plus how many of its tokens were consumed; `load_state_dict` re-reads and
re-encodes from that document, so the next batch equals the one the uninterrupted loader
would have produced. It does not depend on batch size or dp degree, so a run may resume
with a different layout (it then continues the same token stream).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Callable

from runtime.errors import DataError
from runtime.data.chat.source import build_chat_source
from runtime.data.packing import Document, window_batch
from runtime.data.prefetch import Prefetcher
from runtime.data.prepared import PreparedDataset, PreparedStream, read_meta
from runtime.data.chat.prepared import PreparedChat
from runtime.data.preparing import cached_prepared
from runtime.data.schema import DataConfig, ValidationConfig
from runtime.data.sources import (
    EMBEDDED_CORPUS,
    DocumentSource,
    EmbeddedSource,
    build_source,
    source_kind,
)
from runtime.data.split import HeldOutSplit

STATE_VERSION = 1


class ParallelAwareDataLoader:
    """Iterator of this rank's slice of the global step batch.

    Every step consumes `global_batch_size` windows from one global stream; rank r receives
    rows [r*B/dp, (r+1)*B/dp) as a dict of int64 tensors [B/dp, seq_len] (`tokens`, `labels`,
    `positions`, `document_ids`).

    `source`: a DocumentSource (streamed: every rank encodes the global stream; `encoder`,
    default the source's built from `tokenizer`, turns a batch of items into Documents) or a
    PreparedDataset (read by offset: a rank gathers only its rows). `prefetch` > 0 produces
    that many batches ahead on a background thread; the state stays that of the batches
    handed out.
    """

    def __init__(
        self,
        source: DocumentSource | PreparedDataset,
        tokenizer,
        seq_len: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        *,
        document_masking: bool = True,
        tokenize_batch_docs: int = 64,
        encoder: Callable[[list], list[Document]] | None = None,
        prefetch: int = 0,
    ):
        if global_batch_size < 1:
            raise DataError(f"data: global_batch_size must be >= 1, got {global_batch_size}")
        if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise DataError(
                f"data: dp_rank {dp_rank} is not in [0, dp_world_size={dp_world_size})"
            )
        if global_batch_size % dp_world_size:
            raise DataError(
                f"data: global_batch_size ({global_batch_size}) is not divisible by the "
                f"data-parallel degree ({dp_world_size})"
            )
        self.source, self.seq_len = source, seq_len
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.local_batch_size = global_batch_size // dp_world_size
        self.document_masking = document_masking
        if isinstance(source, PreparedDataset) and not isinstance(source, PreparedChat):
            self.stream = PreparedStream(source, seq_len)
        else:
            encode = encoder or source.encoder(tokenizer)
            self.stream = source.packer(tokenizer, encode, seq_len, tokenize_batch_docs)
        self.step = 0  # batches handed out (informational; resumption uses the stream cursor)
        self._prefetcher = Prefetcher(self._produce, prefetch) if prefetch > 0 else None
        self._handed_state: dict | None = None  # stream state after the last batch handed out

    def _produce(self) -> tuple[dict, dict]:
        """The next batch of this rank and the stream state right after it."""
        b = self.local_batch_size
        rows = slice(self.dp_rank * b, (self.dp_rank + 1) * b)
        windows, serials, trained = self.stream.next_windows(self.global_batch_size, rows)
        batch = window_batch(windows, serials, self.document_masking, trained)  # [b, S] each
        return batch, (self.stream.state_dict() if self._prefetcher else None)

    def __iter__(self) -> "ParallelAwareDataLoader":
        return self

    def __next__(self) -> dict:
        if self._prefetcher is None:
            batch, _ = self._produce()
        else:
            batch, self._handed_state = self._prefetcher.get()
        self.step += 1
        return batch

    def _stream_state(self) -> dict:
        if self._handed_state is not None:
            return self._handed_state  # the producer thread owns the stream
        return self.stream.state_dict()

    @property
    def epoch(self) -> int:
        """Epoch of the next token to be read."""
        return self._stream_state()["epoch"]

    def stats(self) -> dict:
        """Running statistics of the batches handed out, for the step log: chat conversations
        cut and dropped (counts and shares of those seen) and the padding share of the
        windows. Empty for text (no padding, nothing dropped)."""
        state = self._stream_state()
        seen, windows = state.get("chat_seen", 0), state.get("chat_window_tokens", 0)
        out = {}
        if seen:
            out = {"chat_truncated": state["chat_truncated"], "chat_dropped": state["chat_dropped"],
                   "chat_cut_share": state["chat_truncated"] / seen,
                   "chat_dropped_share": state["chat_dropped"] / seen}
        if windows:
            out["padding_share"] = state["chat_padding_tokens"] / windows
        return out

    def state_dict(self) -> dict:
        """JSON-serializable and identical on every rank."""
        return {
            "version": STATE_VERSION,
            "source": self.source.name,
            "step": self.step,
            **self._stream_state(),
        }

    def load_state_dict(self, sd: dict) -> None:
        if int(sd.get("version", STATE_VERSION)) != STATE_VERSION:
            raise DataError(f"data: unsupported loader state version {sd.get('version')!r}")
        if sd.get("source", self.source.name) != self.source.name:
            warnings.warn(
                f"data: resuming a {sd['source']!r} position on {self.source.name!r}", stacklevel=2
            )
        self.close()
        self.stream.load_state_dict(sd)
        self.step = int(sd.get("step", 0))

    def close(self) -> None:
        """Stop prefetching (drops batches produced ahead; the state is unaffected)."""
        if self._prefetcher is not None:
            self._prefetcher.stop()
            if self._handed_state is not None:
                self.stream.load_state_dict(self._handed_state)
            self._handed_state = None


def open_source(data_cfg: DataConfig | None, tokenizer, split: str = "train",
                streamed: bool = False) -> DocumentSource | PreparedDataset:
    """What a [data] config reads: prepared data (data.dataset = 'prepared', and the embedded
    corpus, prepared into the cache on first use unless `streamed`) or a streamed
    DocumentSource. `split` picks the embedded chat sample's split when chat data names no
    files."""
    data_cfg = data_cfg or DataConfig()
    kind = source_kind(data_cfg)
    if kind == "chat":
        return build_chat_source(data_cfg, split)
    shuffle = bool(data_cfg.shuffle)
    seed = int(data_cfg.shuffle_seed)
    if kind == "prepared":
        if streamed:
            raise DataError("validation.split_fraction needs a streamed source, not prepared "
                            "data: prepare a held-out validation set and name it in [validation]")
        path = data_cfg.dataset_path
        if not path or not isinstance(path, str):
            raise DataError("data.dataset is 'prepared' but data.dataset_path is not one folder")
        if "chat" in read_meta(Path(path).expanduser()):  # conversations, packed whole
            dataset = PreparedChat(path, data_cfg)
        else:
            dataset = PreparedDataset(path, shuffle, seed)
    elif kind == "embedded" and not streamed and getattr(tokenizer, "fingerprint", None):
        source = EmbeddedSource()
        folder = cached_prepared(source, EMBEDDED_CORPUS, tokenizer, source.encoder(tokenizer),
                                 data_cfg.cache_dir)
        dataset = PreparedDataset(folder, shuffle, seed, name=source.name)
    else:
        return build_source(data_cfg)
    dataset.check_tokenizer(tokenizer)
    return dataset


def build_dataloader(
    data_cfg: DataConfig | None,
    tokenizer,
    seq_len: int,
    global_batch_size: int,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    *,
    document_masking: bool | None = None,
    split: str = "train",
    holdout: float = 0.0,
    prefetch: int = 0,
) -> ParallelAwareDataLoader:
    """The loader a [data] config describes (`data_cfg`: a DataConfig, None: the defaults).
    `split` ("train" | "validation") picks the embedded chat sample's split when chat data
    names no files, and the side of a content-hash split when `holdout` (a fraction) > 0.
    `prefetch` batches are produced ahead on a background thread (the trainer passes
    data.prefetch; 0, the default, produces on the caller's thread)."""
    data_cfg = data_cfg or DataConfig()
    if document_masking is None:
        document_masking = bool(data_cfg.document_mask)
    if holdout:  # a content-hash split filters documents: streamed
        source = HeldOutSplit(open_source(data_cfg, tokenizer, "train", streamed=True),
                              holdout, split)
    else:
        source = open_source(data_cfg, tokenizer, split)
    return ParallelAwareDataLoader(
        source,
        tokenizer,
        seq_len,
        global_batch_size,
        dp_rank,
        dp_world_size,
        document_masking=document_masking,
        tokenize_batch_docs=int(data_cfg.tokenize_batch_docs),
        prefetch=prefetch,
    )


def _prepared_chat(data_cfg: DataConfig) -> dict | None:
    """meta.json "chat" of a prepared chat folder the config trains on, else None."""
    if data_cfg.dataset != "prepared" or not data_cfg.dataset_path:
        return None
    try:
        return read_meta(Path(data_cfg.dataset_path).expanduser()).get("chat")
    except DataError:
        return None  # the training loader reports it


VALIDATION_SOURCE_KEYS = ("dataset", "dataset_path", "hf_dataset", "hf_config", "hf_split")


def validation_data_config(val_cfg: ValidationConfig,
                           data_cfg: DataConfig) -> tuple[DataConfig, float]:
    """(data config, holdout fraction) of the [validation] source.

    `val_cfg` holds enable/freq/steps and these keys: `split_fraction` (> 0: that fraction
    of the training source, by content hash, never trained on), or a held-out source
    (`dataset`, `dataset_path`, `hf_dataset`, `hf_config`, `hf_split`; an empty
    `dataset` keeps the training kind, so chat stays chat, prepared chat data included). The
    other [data] keys (loss_on,
    chat template, text_key, ...) are the training data's. With neither, chat data on the
    embedded sample validates on the sample's validation split."""
    # the same validation batches at every evaluation
    merged = dataclasses.replace(data_cfg, shuffle=False, shuffle_seed=0)
    fraction = float(val_cfg.split_fraction or 0.0)
    named = {k: getattr(val_cfg, k) for k in VALIDATION_SOURCE_KEYS
             if getattr(val_cfg, k) != getattr(ValidationConfig, k)}
    if fraction and (named.keys() - {"dataset"}):
        raise DataError("validation: give either split_fraction or a held-out source, not both")
    if fraction:
        return merged, fraction
    if named.keys() - {"dataset"}:
        chat = merged.dataset == "chat"
        prepared_chat = _prepared_chat(merged)
        if prepared_chat is not None:  # held-out conversations are rendered as it was
            chat = True
            merged = dataclasses.replace(
                merged, chat_date=merged.chat_date or prepared_chat["chat_date"])
        # the held-out source replaces the training one; '' infers the kind from its paths
        merged = dataclasses.replace(merged, **{k: getattr(val_cfg, k)
                                                for k in VALIDATION_SOURCE_KEYS})
        merged.dataset = named.get("dataset") or ("chat" if chat else "")
        return merged, 0.0
    embedded_chat = source_kind(merged) == "chat" and not (
        merged.dataset_path or merged.hf_dataset)
    if not embedded_chat:
        raise DataError("validation.enable needs validation.dataset_path (or hf_dataset) or "
                        "validation.split_fraction")
    return merged, 0.0
