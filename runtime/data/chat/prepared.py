"""Prepared chat data: conversations rendered, tokenized, masked and overflow-handled once by
`prepare`, then packed whole by offset, exactly as the streamed chat path packs them.

Writing (`python -m runtime.data prepare` with data.dataset = "chat"): `ChatPrepareEncoder`
renders each conversation with the configured template, encodes it, computes its loss mask
(data.loss_on, per-message `train` flags) and applies data.chat_overflow for
training.seq_len with the streamed path's own rule (pack.overflow_outcome: cut_turns
re-renders, truncate, drop; a conversation that trains no token is dropped). The folder
(runtime.data.prepared, version 4) stores the packed tokens, trained.bin (the mask, one byte
per token) and doc_rendered.npy (each conversation's length before the overflow rule); a
dropped conversation is a document of 0 tokens, so the stream still counts it as seen and
dropped. seq_len, chat_overflow, loss_on, the render date and the template's sha256 are
recorded in meta.json "chat".

Reading (data.dataset = "prepared" on such a folder): `PreparedChat` yields the documents in
the streamed source's order (the same shard and record permutations, the same cursors), and
`PreparedChatStream` is the streamed path's WholeDocumentStream with the overflow step read
from the folder instead of computed: the same windows, the same packing (sequential or
best_fit, read-time keys), the same counts, drop checks and loader state (a streamed run's
checkpoint resumes on the prepared folder and back). Windows are placed from the lengths
alone; a rank reads the tokens and masks of its own rows only. A run whose training.seq_len,
data.chat_overflow, data.loss_on, data.chat_template (by content) or explicit data.chat_date
differs from the folder's is refused in one line naming the key.

Nothing here imports torch: `prepare` workers unpickle ChatPrepareEncoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterator

import numpy as np

from runtime.data.chat.pack import WholeDocumentStream, overflow_outcome
from runtime.data.chat.source import chat_encoder
from runtime.data.chat.template import ChatTemplateError, find_template, today
from runtime.data.packing import Document
from runtime.data.prepared import PreparedDataset, _EpochOrder, _load_index
from runtime.data.schema import DataConfig
from runtime.errors import DataError

# [data] keys that only change how prepared chat data is read (packing, order, checks)
CHAT_READ_TIME_KEYS = ("shuffle", "shuffle_seed", "shuffle_buffer", "prefetch", "cache_dir",
                       "document_mask", "max_dropped_fraction", "pack", "pack_buffer",
                       "tokenize_batch_docs")


# ============================================================================ writing
def template_info(tokenizer, data_cfg: DataConfig) -> dict:
    """Which template renders the conversations: its source and sha256 (the built-in
    renderer: "built-in")."""
    try:
        found = find_template(tokenizer.directory, data_cfg.chat_template)
    except ChatTemplateError as e:
        raise DataError(str(e)) from None
    if found is None:
        return {"source": "built-in harmony renderer", "sha256": "built-in"}
    text, source = found
    return {"source": source, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def chat_prepare_settings(data_cfg: DataConfig, seq_len: int, tokenizer) -> tuple[DataConfig, dict]:
    """(the [data] config with its render date fixed, the plan settings of a chat prepare):
    every shard and worker renders the same date, and the folder records it."""
    data_cfg = dataclasses.replace(data_cfg, chat_date=data_cfg.chat_date or today())
    chat = {"seq_len": int(seq_len), "chat_overflow": data_cfg.chat_overflow,
            "loss_on": data_cfg.loss_on, "chat_date": data_cfg.chat_date,
            "template": template_info(tokenizer, data_cfg)}
    data = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in CHAT_READ_TIME_KEYS}
    return data_cfg, {"data": data, "chat": chat}


class ChatPrepareEncoder:
    """Conversations -> the Documents a prepared chat folder stores: rendered, masked, and
    data.chat_overflow applied for `seq_len` (a dropped conversation: no tokens). Each
    Document's `length` is the conversation's length before the overflow rule. Picklable
    (the template renderer is built again in each worker process)."""

    def __init__(self, tokenizer, data_cfg: DataConfig, seq_len: int):
        self.tokenizer, self.data_cfg, self.seq_len = tokenizer, data_cfg, int(seq_len)
        self._encoder = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_encoder": None}

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = chat_encoder(self.tokenizer, self.data_cfg)
        return self._encoder

    def __call__(self, conversations: list) -> list[Document]:
        enc, out = self.encoder, []
        for conversation, doc in zip(conversations, enc(conversations), strict=True):
            kept, n, _ = overflow_outcome(conversation, doc, self.seq_len,
                                          self.data_cfg.chat_overflow, enc.shorten)
            if kept is None:
                out.append(Document(np.zeros(0, np.int64), np.zeros(0, bool), length=n))
            else:
                trained = (np.ones(len(kept), bool) if kept.trained is None
                           else np.asarray(kept.trained, bool))
                out.append(Document(np.asarray(kept.tokens, np.int64), trained, length=n))
        return out


# ============================================================================ reading
class _Stored:
    """One stored conversation, read only when its window is filled."""

    __slots__ = ("ds", "start", "n")

    def __init__(self, ds: "PreparedChat", start: int, n: int):
        self.ds, self.start, self.n = ds, start, n

    def __len__(self) -> int:
        return self.n

    @property
    def tokens(self) -> np.ndarray:
        return self.ds.tokens_at(np.arange(self.start, self.start + self.n, dtype=np.int64))

    @property
    def trained(self) -> np.ndarray | None:
        return self.ds.trained_at(np.arange(self.start, self.start + self.n, dtype=np.int64))


class _StoredEncoder:
    """The stream's `encode`: document ids -> stored documents (nothing is rendered). `date`
    is the folder's render date; a resume state with another one is refused."""

    def __init__(self, ds: "PreparedChat"):
        self.ds = ds

    def __call__(self, docs: list[int]) -> list[_Stored]:
        ds = self.ds
        return [_Stored(ds, int(ds.offsets[d]), int(ds.offsets[d + 1] - ds.offsets[d]))
                for d in docs]

    @property
    def date(self) -> str:
        return self.ds.chat["chat_date"]

    @date.setter
    def date(self, value: str) -> None:
        if value != self.date:
            raise DataError(f"data: the resumed run rendered chat with date {value}, "
                            f"{self.ds.path} was prepared with {self.date}: prepare it again "
                            f"with --data.chat_date={value}")


class PreparedChat(PreparedDataset):
    """A prepared chat folder: a PreparedDataset (verify, check_tokenizer) that streams its
    conversations like the chat source it was prepared from."""

    def __init__(self, path, data_cfg: DataConfig, name: str | None = None):
        super().__init__(path, bool(data_cfg.shuffle), int(data_cfg.shuffle_seed), name)
        if "chat" not in self.meta:
            raise DataError(f"{self.path}: not prepared chat data (prepared from text)")
        self.chat, self.data_cfg = self.meta["chat"], data_cfg
        self.rendered = _load_index(self.path, "doc_rendered")  # [docs]
        if len(self.rendered) != self.num_docs:
            raise DataError(f"{self.path}: doc_rendered.npy does not match meta.json (damaged?)")
        for key in ("chat_overflow", "loss_on"):
            if getattr(data_cfg, key) != self.chat[key]:
                raise DataError(f"data.{key} = {getattr(data_cfg, key)!r}, but {self.path} was "
                                f"prepared with {self.chat[key]!r}: prepare it again with "
                                f"--data.{key}={getattr(data_cfg, key)}")
        if data_cfg.chat_date and data_cfg.chat_date != self.chat["chat_date"]:
            raise DataError(f"data.chat_date = {data_cfg.chat_date!r}, but {self.path} was "
                            f"rendered with {self.chat['chat_date']!r}: prepare it again, or "
                            f"leave data.chat_date empty to use the folder's")

    def check_tokenizer(self, tokenizer) -> None:
        super().check_tokenizer(tokenizer)
        have = template_info(tokenizer, self.data_cfg)
        if have["sha256"] != self.chat["template"]["sha256"]:
            raise DataError(f"data.chat_template: this run renders with {have['source']}, "
                            f"{self.path} was prepared with another template "
                            f"({self.chat['template']['source']}): prepare it again")

    def stream(self, cursor: tuple = (0, 0, 0)) -> Iterator[tuple[tuple, int]]:
        """Endless (cursor, document id) in the streamed chat source's order from `cursor`."""
        epoch, position, index = (int(c) for c in cursor)
        while True:
            order = _EpochOrder(self, epoch)
            for p in range(position, self.num_shards):
                shard = order.shard(p)
                first = int(np.searchsorted(shard.cursor_index, index)) if p == position else 0
                for k in range(first, len(shard.docs)):
                    yield (epoch, p, int(shard.cursor_index[k])), int(shard.docs[k])
            epoch, position, index = epoch + 1, 0, 0

    def encoder(self, tokenizer) -> _StoredEncoder:
        return _StoredEncoder(self)

    def packer(self, tokenizer, encode, seq_len: int, batch_docs: int,
               items=None, name: str | None = None) -> "PreparedChatStream":
        if seq_len != int(self.chat["seq_len"]):
            raise DataError(f"training.seq_len = {seq_len}, but {self.path} was prepared for "
                            f"seq_len {self.chat['seq_len']} (conversations are cut or dropped "
                            f"when prepared): prepare it again with --training.seq_len={seq_len}")
        cfg = self.data_cfg
        return PreparedChatStream(
            self, items or self.stream, encode, seq_len, pad_id=tokenizer.pad_id,
            overflow=self.chat["chat_overflow"], batch_docs=batch_docs,
            max_dropped_fraction=cfg.max_dropped_fraction, pack=cfg.pack,
            pack_buffer=cfg.pack_buffer, name=name or self.name)


def _never(item, max_tokens):  # cut_turns ran when the folder was prepared
    raise AssertionError("prepared chat data is never re-rendered")


class PreparedChatStream(WholeDocumentStream):
    """WholeDocumentStream over stored conversations: data.chat_overflow's outcome is read
    from the folder (doc_rendered.npy, 0 stored tokens = dropped), not computed."""

    def __init__(self, ds: PreparedChat, items, encode, seq_len: int, **kw):
        super().__init__(items, encode, seq_len, shorten=_never, **kw)
        self.ds = ds

    def _outcome(self, item: int, doc: _Stored) -> tuple[_Stored | None, int, bool]:
        n = int(self.ds.rendered[item])
        return (doc if len(doc) else None), n, n > self.seq_len
