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

import warnings
from typing import Callable

from runtime.data.errors import DataError
from runtime.data.packing import Document, window_batch
from runtime.data.schema import DataConfig, ValidationConfig, data_option, validation_option
from runtime.data.chat_source import build_chat_source
from runtime.data.sources import DocumentSource, build_source, source_kind
from runtime.data.split import HeldOutSplit

STATE_VERSION = 1


class ParallelAwareDataLoader:
    """Iterator of this rank's slice of the global step batch.

    Every step consumes `global_batch_size` windows from one global `PackedStream`; rank
    r receives rows [r*B/dp, (r+1)*B/dp) as a dict of int64 tensors [B/dp, seq_len]
    (`tokens`, `labels`, `positions`, `document_ids`). `encoder` (default: the source's,
    built from `tokenizer`) turns a batch of source items into Documents.
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
        encoder: Callable[[list], list[Document]] | None = None,
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
        encode = encoder or source.encoder(tokenizer)
        self.stream = source.packer(tokenizer, encode, seq_len, tokenize_batch_docs)
        self.step = 0  # batches drawn (informational; resumption uses the stream cursor)

    def __iter__(self) -> "ParallelAwareDataLoader":
        return self

    def __next__(self) -> dict:
        b = self.local_batch_size
        rows = slice(self.dp_rank * b, (self.dp_rank + 1) * b)
        windows, serials, trained = self.stream.next_windows(self.global_batch_size, rows)
        self.step += 1
        return window_batch(windows, serials, self.document_masking, trained)  # [b, S] each

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
            raise DataError(f"data: unsupported loader state version {sd.get('version')!r}")
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
    split: str = "train",
    holdout: float = 0.0,
) -> ParallelAwareDataLoader:
    """The loader a [data] config describes (`data_cfg`: DataConfig, dict, any object, or None).
    `split` ("train" | "validation") picks the embedded chat sample's split when chat data
    names no files, and the side of a content-hash split when `holdout` (a fraction) > 0."""
    if document_masking is None:
        document_masking = bool(data_option(data_cfg, "document_mask"))
    chat = source_kind(data_cfg) == "chat"
    source = build_chat_source(data_cfg, "train" if holdout else split) if chat else build_source(data_cfg)
    if holdout:
        source = HeldOutSplit(source, holdout, split)
    return ParallelAwareDataLoader(
        source,
        tokenizer,
        seq_len,
        global_batch_size,
        dp_rank,
        dp_world_size,
        document_masking=document_masking,
        tokenize_batch_docs=int(data_option(data_cfg, "tokenize_batch_docs")),
    )


VALIDATION_SOURCE_KEYS = ("dataset", "dataset_path", "hf_dataset", "hf_config", "hf_split")


def validation_data_config(val_cfg, data_cfg) -> tuple[dict, float]:
    """(data config, holdout fraction) of the [validation] source.

    `val_cfg` holds enable/freq/steps and these keys: `split_fraction` (> 0: that fraction
    of the training source, by content hash, never trained on), or a held-out source
    (`dataset`, `dataset_path`, `hf_dataset`, `hf_config`, `hf_split`; an empty
    `dataset` keeps the training kind, so chat stays chat). The other [data] keys (loss_on,
    chat template, text_key, ...) are the training data's. With neither, chat data on the
    embedded sample validates on the sample's validation split."""
    merged = {name: data_option(data_cfg, name) for name in DataConfig.__dataclass_fields__}
    merged["shuffle"] = False  # the same validation batches at every evaluation
    fraction = float(validation_option(val_cfg, "split_fraction") or 0.0)
    named = {k: validation_option(val_cfg, k) for k in VALIDATION_SOURCE_KEYS
             if validation_option(val_cfg, k) != getattr(ValidationConfig, k)}
    if fraction and (named.keys() - {"dataset"}):
        raise DataError("validation: give either split_fraction or a held-out source, not both")
    if fraction:
        return merged, fraction
    if named.keys() - {"dataset"}:
        chat = merged["dataset"] == "chat"
        for key in VALIDATION_SOURCE_KEYS:  # the held-out source replaces the training one
            merged[key] = validation_option(val_cfg, key)
        merged["dataset"] = named.get("dataset") or ("chat" if chat else "")
        return merged, 0.0
    embedded_chat = source_kind(merged) == "chat" and not (
        merged["dataset_path"] or merged["hf_dataset"])
    if not embedded_chat:
        raise DataError("validation.enable needs validation.dataset_path (or hf_dataset) or "
                        "validation.split_fraction")
    return merged, 0.0
