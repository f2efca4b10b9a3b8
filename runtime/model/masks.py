"""Attention masks shared by every layer of one forward pass.

Two layer kinds exist (sliding window, full causal), each optionally restricted to the
query's own document (packed sequences). The masks are built once per forward and
handed to every block: a boolean tensor for the math backend, a BlockMask for flex.
Masks without document ids depend on no data: the model builds them once per length and
reuses them (GptOssModel._attention_masks); document masks change with every batch and are rebuilt each forward (on CUDA
by a compiled `create_block_mask`, which avoids the eager path's [B, 1, S, S] temporaries).

Masks are defined on *global* sequence indices: without context parallelism the queries
and keys are both `arange(S)`; under context parallelism a rank holds a load-balanced
subset of the queries (`q_index`) and the keys gathered from every rank in rank order
(`kv_index`, a permutation of `arange(S)`), and the same predicate applies unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import create_block_mask


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


@dataclass
class MaskInputs:
    """Global indices of the local queries [Sq] and keys [Skv], and their document ids
    ([B, Sq], [B, Skv]) or None without document masking."""

    q_index: torch.Tensor
    kv_index: torch.Tensor
    doc_q: torch.Tensor | None = None
    doc_kv: torch.Tensor | None = None

    @classmethod
    def full_sequence(cls, seq_len: int, document_ids: torch.Tensor | None,
                      device: torch.device) -> "MaskInputs":
        idx = torch.arange(seq_len, device=device)
        return cls(idx, idx, document_ids, document_ids)


def dense_mask(m: MaskInputs, window: int | None) -> torch.Tensor:
    """Boolean mask [B or 1, 1, Sq, Skv], True where attention is allowed."""
    q_idx, kv_idx = m.q_index[:, None], m.kv_index[None, :]
    if m.doc_q is None:
        return mask_predicate(q_idx, kv_idx, window)[None, None]
    doc_q, doc_kv = m.doc_q[:, :, None], m.doc_kv[:, None, :]  # [B, Sq, 1], [B, 1, Skv]
    return mask_predicate(q_idx, kv_idx, window, doc_q, doc_kv)[:, None]


def flex_block_mask(m: MaskInputs, window: int | None):
    q_index, kv_index, doc_q, doc_kv = m.q_index, m.kv_index, m.doc_q, m.doc_kv
    if doc_q is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask_predicate(q_index[q_idx], kv_index[kv_idx], window)
        batch = None
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask_predicate(q_index[q_idx], kv_index[kv_idx], window,
                                  doc_q[b, q_idx], doc_kv[b, kv_idx])
        batch = doc_q.shape[0]
    # Compiled on CUDA (as torchtitan does): the eager builder evaluates the mask over dense
    # [B, 1, S, S] index grids. Eager on CPU, where flex is a test path only.
    return create_block_mask(mask_mod, batch, None, len(q_index), len(kv_index),
                             device=q_index.device, _compile=q_index.device.type == "cuda")


@dataclass
class AttentionMasks:
    """Per-forward masks keyed by layer kind; `sliding`/`full` are backend-specific objects."""

    sliding: object
    full: object

    def for_layer(self, sliding: bool):
        return self.sliding if sliding else self.full


def build_attention_masks(backend: str, inputs: MaskInputs, window: int) -> AttentionMasks:
    build = flex_block_mask if backend == "flex" else dense_mask
    return AttentionMasks(sliding=build(inputs, window), full=build(inputs, None))

