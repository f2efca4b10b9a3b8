"""Attention masks shared by every layer of one forward pass.

Two layer kinds exist (sliding window, full causal), each optionally restricted to the
query's own document (packed sequences). The masks are built once per forward and
handed to every block: a boolean tensor for the math backend, a BlockMask for flex.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def mask_predicate(q_idx, kv_idx, window: int | None, doc_q=None, doc_kv=None):
    """The one definition of who may attend to whom (works on tensors of indices).

    Causal, optionally within `window` keys counting the query itself
    (q - kv < window), optionally within the same document.
    """
    allowed = kv_idx <= q_idx
    if window is not None:
        allowed = allowed & (q_idx - kv_idx < window)
    if doc_q is not None:
        allowed = allowed & (doc_q == doc_kv)
    return allowed


def dense_mask(seq_len: int, window: int | None, document_ids: torch.Tensor | None,
               device: torch.device) -> torch.Tensor:
    """Boolean mask [B or 1, 1, S, S], True where attention is allowed."""
    idx = torch.arange(seq_len, device=device)
    q_idx, kv_idx = idx[:, None], idx[None, :]
    if document_ids is None:
        return mask_predicate(q_idx, kv_idx, window)[None, None]
    doc_q, doc_kv = document_ids[:, :, None], document_ids[:, None, :]  # [B, S, 1], [B, 1, S]
    return mask_predicate(q_idx, kv_idx, window, doc_q, doc_kv)[:, None]


def flex_block_mask(seq_len: int, window: int | None, document_ids: torch.Tensor | None,
                    device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    if document_ids is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask_predicate(q_idx, kv_idx, window)
        batch = None
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask_predicate(q_idx, kv_idx, window, document_ids[b, q_idx], document_ids[b, kv_idx])
        batch = document_ids.shape[0]
    return create_block_mask(mask_mod, batch, None, seq_len, seq_len, device=device)


@dataclass
class AttentionMasks:
    """Per-forward masks keyed by layer kind; `sliding`/`full` are backend-specific objects."""

    sliding: object
    full: object

    def for_layer(self, sliding: bool):
        return self.sliding if sliding else self.full


def build_attention_masks(backend: str, seq_len: int, window: int,
                          document_ids: torch.Tensor | None, device: torch.device) -> AttentionMasks:
    build = flex_block_mask if backend == "flex" else dense_mask
    return AttentionMasks(
        sliding=build(seq_len, window, document_ids, device),
        full=build(seq_len, None, document_ids, device),
    )
