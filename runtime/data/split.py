"""A held-out split of a source by content: `validation.split_fraction` of the training data.

A document belongs to the validation side when a hash of its content (text, or the
conversation's messages/tools/effort) falls below the fraction; the training side sees the
rest. The choice depends on content only, not on order, epoch, shuffling or dp degree, so
the two sides never share a document and stay the same across resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from runtime.errors import DataError
from runtime.data.sources import DocumentSource

SIDES = ("train", "validation")


def _content_key(item) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if dataclasses.is_dataclass(item):  # a chat Conversation
        item = dataclasses.asdict(item)
    return json.dumps(item, sort_keys=True, ensure_ascii=False).encode("utf-8")


def held_out(item, fraction: float) -> bool:
    digest = hashlib.blake2b(_content_key(item), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * (1 << 64)


class HeldOutSplit(DocumentSource):
    """One side of a content-hash split of `base` (items, encoder and packing are base's)."""

    def __init__(self, base: DocumentSource, fraction: float, side: str):
        if not 0.0 < fraction < 1.0:
            raise DataError(f"validation.split_fraction must be in (0, 1), got {fraction}")
        if side not in SIDES:
            raise DataError(f"split side must be one of {SIDES}, got {side!r}")
        self.base, self.fraction, self.side = base, fraction, side
        self.name = f"{base.name} ({side} side of a {fraction:g} split)"

    def documents(self, epoch: int, shard: int, index: int):
        want = self.side == "validation"
        for s, i, item in self.base.documents(epoch, shard, index):
            if self.base.keep(item) and held_out(item, self.fraction) == want:
                yield s, i, item

    def keep(self, item) -> bool:
        return self.base.keep(item)

    def encoder(self, tokenizer):
        return self.base.encoder(tokenizer)

    def packer(self, tokenizer, encode, seq_len: int, batch_docs: int, items=None, name=None):
        return self.base.packer(tokenizer, encode, seq_len, batch_docs, items or self.stream,
                                name=name or self.name)
