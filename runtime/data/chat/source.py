"""`data.dataset = "chat"`: conversations from JSONL files / HF datasets (or the embedded
chat sample) rendered, tokenized and masked into Documents packed one per window.

    [data]
    dataset = "chat"
    dataset_path = "chats/*.jsonl"   # files/dirs/globs; or hf_dataset = "org/name"; neither:
                                     # the embedded chat sample (runtime/assets/chat_sample)
    loss_on = "last_assistant"       # | "all_assistant" | "all"   (runtime.data.chat.masks)
    chat_overflow = "cut_turns"      # | "truncate" | "drop": conversations longer than seq_len
    max_dropped_fraction = 0.5       # more dropped conversations than this: stop (exit 2)
    pack = "sequential"              # | "best_fit" within pack_buffer documents
    chat_template = ""               # a .jinja file; "" = the tokenizer dir's, else built-in
    chat_date = ""                   # "Current date" of the system message; "" = today

Records: runtime.data.chat.records; rendering: runtime.data.chat.template; masks:
runtime.data.chat.masks; packing: runtime.data.chat.pack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from runtime.data.chat.masks import LOSS_ON, HarmonyIds, apply_overrides, trained_tokens
from runtime.data.chat.pack import WholeDocumentStream
from runtime.data.chat.records import ChatRecordError, Conversation, parse_record
from runtime.data.chat.template import ChatTemplateError, build_renderer
from runtime.errors import DataError
from runtime.data.packing import Document
from runtime.data.readers import read_json_records, resolve_files
from runtime.data.schema import DataConfig
from runtime.data.sources import ASSETS_DIR, FileSource, HFSource

CHAT_SAMPLE_DIR = ASSETS_DIR / "chat_sample"
CHAT_SAMPLE = {"train": CHAT_SAMPLE_DIR / "train.jsonl.gz",
               "validation": CHAT_SAMPLE_DIR / "validation.jsonl.gz"}


def _conversation(record, where: str, arrow: bool = False) -> Conversation:
    try:
        return parse_record(record, where, arrow=arrow)
    except ChatRecordError as e:
        raise DataError(str(e)) from None


class ChatEncoder:
    """Conversations -> Documents: render, encode with special tokens, mask (batched)."""

    def __init__(self, tokenizer, renderer, loss_on: str = "last_assistant"):
        if loss_on not in LOSS_ON:
            raise DataError(f"data.loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
        self.tokenizer, self.renderer, self.loss_on = tokenizer, renderer, loss_on
        try:
            self.harmony_ids = HarmonyIds.of(tokenizer)
        except ValueError as e:
            raise DataError(str(e)) from None

    @property
    def date(self) -> str:
        return self.renderer.date

    @date.setter
    def date(self, value: str) -> None:
        self.renderer.date = value

    def render(self, conversation: Conversation) -> str:
        try:
            return self.renderer.render(conversation.messages, tools=conversation.tools,
                                        reasoning_effort=conversation.reasoning_effort)
        except ChatTemplateError as e:
            raise DataError(f"{self.renderer.source}: {e}") from None

    def shorten(self, conversation: Conversation, max_tokens: int) -> Document | None:
        """The conversation with the fewest earlier turns cut (whole turns from the left, the
        system/developer message kept) whose tokens fit in `max_tokens`; None when even its
        last turn alone does not fit. A binary search: a few renders per conversation."""
        starts = conversation.turn_starts()
        lo, hi, best = 0, len(starts) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            doc = self([conversation.from_turn(starts[mid])])[0]
            if len(doc.tokens) <= max_tokens:
                best, hi = doc, mid - 1
            else:
                lo = mid + 1
        return best

    def __call__(self, conversations: list[Conversation]) -> list[Document]:
        texts = [self.render(c) for c in conversations]
        docs = []
        encoded = self.tokenizer.encode_batch(texts, allow_special=True)
        for conversation, ids in zip(conversations, encoded, strict=True):
            ids = np.asarray(ids, dtype=np.int64)
            mask = trained_tokens(ids, self.tokenizer.decode, self.harmony_ids, self.loss_on)
            self._override(conversation, ids, mask)
            docs.append(Document(ids, mask))
        return docs

    def _override(self, conversation: Conversation, ids: np.ndarray, mask: np.ndarray) -> None:
        """The per-message `train` flags of the record, applied to `mask` in place."""
        flags = [m.get("train") for m in conversation.messages if m["role"] == "assistant"]
        if all(flag is None for flag in flags):
            return
        found = apply_overrides(mask, ids, self.tokenizer.decode, self.harmony_ids, flags)
        if found != len(flags):
            raise DataError(f"{conversation.where or 'a chat record'}: {self.renderer.source} "
                            f"rendered {found} assistant messages for the record's "
                            f"{len(flags)}: its per-message 'train' flags cannot be placed")


def chat_encoder(tokenizer, data_cfg: DataConfig) -> ChatEncoder:
    """The ChatEncoder of a [data] config: its template (or the built-in renderer), date and
    data.loss_on."""
    try:
        renderer = build_renderer(
            tokenizer.directory, data_cfg.chat_template, date=data_cfg.chat_date,
            special_tokens={"bos_token": tokenizer.decode([tokenizer.bos_id]),
                            "eos_token": tokenizer.decode([tokenizer.eos_id])})
    except ChatTemplateError as e:
        raise DataError(str(e)) from None
    return ChatEncoder(tokenizer, renderer, data_cfg.loss_on)


class _ChatMixin:
    """What makes a source a chat source: conversation items, whole-document packing."""

    data_cfg: DataConfig = DataConfig()

    def keep(self, item) -> bool:
        return True  # every record is a conversation (parse_record rejected the others)

    def encoder(self, tokenizer) -> ChatEncoder:
        return chat_encoder(tokenizer, self.data_cfg)

    def packer(self, tokenizer, encode, seq_len: int, batch_docs: int,
               items=None, name: str | None = None) -> WholeDocumentStream:
        cfg = self.data_cfg
        return WholeDocumentStream(
            items or self.stream, encode, seq_len, pad_id=tokenizer.pad_id,
            overflow=cfg.chat_overflow, batch_docs=batch_docs,
            shorten=getattr(encode, "shorten", None),
            max_dropped_fraction=cfg.max_dropped_fraction,
            pack=cfg.pack, pack_buffer=cfg.pack_buffer,
            name=name or self.name)


class ChatFileSource(_ChatMixin, FileSource):
    """Conversations of local .jsonl / .json (+ .gz) files, one record per line."""

    def __init__(self, files, data_cfg: DataConfig | None = None, name: str | None = None):
        data_cfg = data_cfg or DataConfig()
        super().__init__(files, "messages", bool(data_cfg.shuffle),
                         int(data_cfg.shuffle_seed), name=name)
        self.data_cfg = data_cfg

    def read(self, path: Path, start: int = 0,
             byte_range: tuple[int, int] | None = None) -> Iterator[tuple[int, Conversation]]:
        for i, record, where in read_json_records(path, start, byte_range):
            yield i, _conversation(record, where)


class ChatHFSource(_ChatMixin, HFSource):
    """Conversations of an HF dataset whose examples hold `messages` (optional extra)."""

    def __init__(self, data_cfg: DataConfig):
        super().__init__(data_cfg.hf_dataset, data_cfg.hf_config,
                         data_cfg.hf_split, "messages",
                         bool(data_cfg.shuffle),
                         int(data_cfg.shuffle_seed),
                         int(data_cfg.shuffle_buffer),
                         bool(data_cfg.hf_streaming))
        self.data_cfg = data_cfg

    def item_of(self, example, where: str) -> Conversation:
        return _conversation(dict(example), where, arrow=True)


def build_chat_source(data_cfg: DataConfig | None, split: str = "train"):
    """The chat source a [data] (or [validation]) config names; with neither dataset_path
    nor hf_dataset, the `split` ("train" | "validation") of the embedded chat sample."""
    data_cfg = data_cfg or DataConfig()
    path, hf = data_cfg.dataset_path, data_cfg.hf_dataset
    if path and hf:
        raise DataError("data: both dataset_path and hf_dataset are set for chat data")
    if hf:
        return ChatHFSource(data_cfg)
    if path:
        return ChatFileSource(resolve_files(path), data_cfg)
    sample = CHAT_SAMPLE[split]
    if not sample.is_file():
        raise DataError(f"embedded chat sample missing: {sample} (run scripts/build_chat_sample.py)")
    return ChatFileSource([sample], data_cfg, name=f"embedded chat sample ({split})")
