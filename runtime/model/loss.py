"""Fused output projection + cross entropy, chunked over tokens, never materialising the
full [tokens, vocab] logits.

With gpt-oss's 201,088-token vocabulary, 8,192 tokens of fp32 logits (plus their softmax and
gradient) take ~20 GiB. Here the forward walks the tokens in chunks; for each chunk it forms
the logits, their log-sum-exp and, right away, the gradient of the summed loss with respect to
the chunk's hidden states and to the head weight (softmax - onehot is all it needs). Backward
then only scales those stored gradients by the incoming gradient. Same FLOPs as the plain
path, peak extra memory one chunk of logits instead of all of them.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int):
        # hidden [N, D], weight [V, D], labels [N] -> summed loss (>= fp32 scalar)
        dtype = _compute_dtype(hidden)
        acc = torch.promote_types(dtype, torch.float32)  # softmax/accumulation precision
        h, w = hidden.to(dtype), weight.to(dtype)
        grad_hidden = torch.empty_like(hidden, dtype=acc)
        grad_weight = torch.zeros_like(weight, dtype=acc)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                y = labels[rows]
                valid = y != IGNORE_INDEX
                logits = (h[rows] @ w.T).to(acc)  # [n, V]
                lse = torch.logsumexp(logits, dim=-1)  # [n]
                target = logits.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
                total += torch.where(valid, lse - target, 0).sum()
                # d(sum loss)/d logits = softmax - onehot, zero on ignored rows
                grad_logits = torch.exp(logits - lse[:, None])
                grad_logits.scatter_add_(1, y.clamp(min=0)[:, None], -torch.ones_like(lse)[:, None])
                grad_logits *= valid[:, None]
                grad_logits = grad_logits.to(dtype)
                grad_hidden[rows] = (grad_logits @ w).to(acc)
                grad_weight += (grad_logits.T @ h[rows]).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * grad_out).to(hidden_dtype), (grad_weight * grad_out).to(weight_dtype),
                None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_size: int = 1024) -> torch.Tensor:
    """Sum over tokens of cross_entropy(hidden @ weight.T, labels) (IGNORE_INDEX skipped).
    hidden [..., D], weight [V, D], labels [...]."""
    return _FusedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                          labels.reshape(-1), chunk_size)
