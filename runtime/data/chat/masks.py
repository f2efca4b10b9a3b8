"""Which tokens of a rendered conversation are trained, found from the token ids.

A harmony conversation is a run of messages `<|start|>{header}<|message|>{content}{stop}`,
stop one of <|end|> / <|return|> / <|call|>. A *turn* of the assistant is a maximal run of
consecutive assistant messages (e.g. analysis then final, or analysis then a tool call).
The model generates everything of a turn after its opening `<|start|>assistant`: the rest of
the header (`<|channel|>final`, ` to=functions.f<|channel|>commentary json`), the content,
the stop token, and the whole `<|start|>assistant...` of the turn's further messages. Those
tokens are trained; every other token is context (IGNORE_INDEX in the labels).

`data.loss_on`:
  "last_assistant" (default)  the last assistant turn (the gpt-oss template renders the
                              thinking of that turn only, so earlier turns are not what
                              the model saw at inference)
  "last_user_turn"            every assistant turn after the last user message: tool calls
                              (with the analysis the template keeps for them) and the final
                              answer, i.e. all the model generated to answer that message
  "all_assistant"             every assistant turn
  "all"                       every token after the first

A record's per-message `"train": true/false` (runtime.data.chat.records) overrides that
for the tokens its assistant message rendered to (apply_overrides): the k-th assistant
message of the record is the k-th run of rendered assistant messages that ends in one not on
the analysis channel (its thinking, if rendered, then its final answer or tool call).

The message boundaries come from the special-token ids and each header's role from
decoding the header ids alone; no substring is re-tokenized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

LOSS_ON = ("last_assistant", "last_user_turn", "all_assistant", "all")
ASSISTANT = "assistant"


@dataclass(frozen=True)
class HarmonyIds:
    start: int
    message: int
    stops: frozenset  # <|end|>, <|return|>, <|call|>

    @classmethod
    def of(cls, tokenizer) -> "HarmonyIds":
        """The ids of a tokenizer with the harmony tokens (a one-line error otherwise)."""
        names = ("<|start|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>")
        ids = [tokenizer.token_to_id(n) for n in names]
        missing = [n for n, i in zip(names, ids, strict=True) if i is None]
        if missing:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'source', '')}: no harmony "
                             f"token(s) {', '.join(missing)}: chat data needs them")
        return cls(ids[0], ids[1], frozenset(ids[2:]))


def _messages(ids: np.ndarray, hid: HarmonyIds) -> list[tuple[int, int, int]]:
    """(start, header_end, stop) of each message: ids[start] = <|start|>, ids[header_end] =
    <|message|>, ids[stop] = its stop token (or the last id of an unfinished message)."""
    starts = np.flatnonzero(ids == hid.start).tolist()
    out = []
    for k, s in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(ids)
        seg = ids[s:end]
        header = np.flatnonzero(seg == hid.message)
        stop = np.flatnonzero(np.isin(seg, list(hid.stops)))
        out.append((s, s + int(header[0]) if len(header) else end,
                    s + int(stop[0]) if len(stop) else end - 1))
    return out


def _role_length(header: list[int], decode) -> int | None:
    """How many header tokens spell the role "assistant" (None when the role is another):
    the smallest prefix whose text reaches the end of the word."""
    for k in range(1, len(header) + 1):
        text = decode(header[:k])
        if len(text) >= len(ASSISTANT):
            word = text[: len(ASSISTANT)]
            rest = text[len(ASSISTANT):]
            if word != ASSISTANT or (rest and rest[0] not in " <"):
                return None
            return k
    return None


def last_user_stop(ids, decode, hid: HarmonyIds) -> int:
    """Index of the stop token of the last user message (-1 without one)."""
    ids = np.asarray(ids, dtype=np.int64)
    for start, header_end, stop in reversed(_messages(ids, hid)):
        if decode(ids[start + 1: header_end].tolist()).strip() == "user":
            return stop
    return -1


def assistant_turns(ids, decode, hid: HarmonyIds) -> list[tuple[int, int]]:
    """[first, last] token indices (inclusive) generated in each assistant turn."""
    ids = np.asarray(ids, dtype=np.int64)
    turns: list[list[int]] = []
    previous_stop = None
    for start, header_end, stop in _messages(ids, hid):
        role_len = _role_length(ids[start + 1: header_end].tolist(), decode)
        if role_len is None:
            previous_stop = None
            continue
        if previous_stop is not None and previous_stop == start - 1:
            turns[-1][1] = stop  # the same turn continues with another assistant message
        else:
            turns.append([start + 1 + role_len, stop])
        previous_stop = stop
    return [(a, b) for a, b in turns]


_ANALYSIS = re.compile(r"<\|channel\|>\s*analysis(\s|$)")


def assistant_messages(ids, decode, hid: HarmonyIds) -> list[tuple[int, int]]:
    """[first, last] token indices the model generated for each assistant message of the
    record: its analysis (when rendered) and its final answer or tool call. `first` is right
    after `<|start|>assistant` when the message opens a turn, else its `<|start|>` (the
    model generates that inside a turn)."""
    ids = np.asarray(ids, dtype=np.int64)
    out: list[tuple[int, int]] = []
    previous_stop, first = None, None
    for start, header_end, stop in _messages(ids, hid):
        header = ids[start + 1: header_end].tolist()
        role_len = _role_length(header, decode)
        if role_len is None:
            previous_stop, first = None, None
            continue
        if first is None:
            first = start if previous_stop == start - 1 else start + 1 + role_len
        if not _ANALYSIS.search(decode(header)):
            out.append((first, stop))
            first = None
        previous_stop = stop
    return out


def apply_overrides(mask: np.ndarray, ids, decode, hid: HarmonyIds,
                    flags: list[bool | None]) -> int:
    """Set (True) or clear (False) `mask` over the tokens of each assistant message whose
    flag is not None; `flags` has one entry per assistant message of the record. Returns the
    number of assistant messages found in the rendered ids (the caller checks it)."""
    spans = assistant_messages(ids, decode, hid)
    if len(spans) == len(flags):
        for (first, last), flag in zip(spans, flags, strict=True):
            if flag is not None:
                mask[first: last + 1] = flag
    return len(spans)


def trained_tokens(ids, decode, hid: HarmonyIds, loss_on: str = "last_assistant") -> np.ndarray:
    """bool [len(ids)]: True where the token is a training target."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"data.loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    n = len(ids)
    mask = np.zeros(n, dtype=bool)
    if loss_on == "all":
        mask[1:] = True
        return mask
    turns = assistant_turns(ids, decode, hid)
    if loss_on == "last_assistant":
        turns = turns[-1:]
    elif loss_on == "last_user_turn":
        after = last_user_stop(ids, decode, hid)
        turns = [(first, last) for first, last in turns if first > after]
    for first, last in turns:
        mask[first: last + 1] = True
    return mask
