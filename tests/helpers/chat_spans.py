"""Loss masks found in the rendered text alone (regular expressions over the harmony
markup), independent of runtime.data.chat_masks: what the chat mask tests compare with."""

from __future__ import annotations

import re

import numpy as np

MESSAGE_RE = re.compile(r"<\|start\|>(.*?)<\|message\|>.*?(?:<\|end\|>|<\|return\|>|<\|call\|>)",
                        re.DOTALL)


def char_spans(text: str, loss_on: str) -> list[tuple[int, int]]:
    """Trained character spans found in the text alone: assistant turns from right after
    `<|start|>assistant` to the end of their last message's stop token."""
    turns, prev_end = [], None
    for m in MESSAGE_RE.finditer(text):
        if not m.group(1).startswith("assistant"):
            prev_end = None
            continue
        if prev_end == m.start():
            turns[-1][1] = m.end()
        else:
            turns.append([m.start() + len("<|start|>assistant"), m.end()])
        prev_end = m.end()
    if loss_on == "last_assistant":
        turns = turns[-1:]
    if loss_on == "last_user_turn":
        last_user = max(m.end() for m in MESSAGE_RE.finditer(text) if m.group(1) == "user")
        turns = [t for t in turns if t[0] > last_user]
    return [tuple(t) for t in turns]


def mask_from_text(tok, text: str, loss_on: str) -> tuple[list[int], np.ndarray]:
    """(ids, trained mask) of `text` with the mask from char_spans: each token trained
    when it lies inside a trained span."""
    backend = tok.backend
    backend.encode_special_tokens = False
    try:
        enc = backend.encode(text, add_special_tokens=False)
    finally:
        backend.encode_special_tokens = True
    spans = char_spans(text, loss_on)
    mask = np.array([any(a <= s and e <= b for a, b in spans) for s, e in enc.offsets])
    return enc.ids, mask
