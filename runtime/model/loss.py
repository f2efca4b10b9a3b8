"""The training loss: token cross entropy, summed (the trainer normalises it), with labels
equal to IGNORE_INDEX skipped. Two forms: `cross_entropy_sum` over logits (also vocab-sharded
DTensor logits under TP loss parallel, inside `loss_parallel_context`), and the fused output
projection + cross entropy below, chunked over tokens, never materialising the full
[tokens, vocab] logits.

With gpt-oss's 201,088-token vocabulary, 8,192 tokens of fp32 logits (plus their softmax and
gradient) take ~20 GiB. Here the forward walks the tokens in chunks; for each chunk it forms
the logits, their log-sum-exp and, right away, the gradient of the summed loss with respect to
the chunk's hidden states and to the head weight (softmax - onehot is all it needs). Backward
then only scales those stored gradients by the incoming gradient. Same FLOPs as the plain
path, peak extra memory one chunk of logits instead of all of them.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.distributed.tensor.parallel import loss_parallel

IGNORE_INDEX = -100  # label of a position that is not trained (padding, prompt tokens)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token loss in fp32: logits [B, S, V], labels [B, S] (IGNORE_INDEX skipped)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def loss_parallel_context(enabled: bool):
    """TP loss parallel: with the logits a vocab-sharded DTensor, the cross entropy AND its
    backward must both run inside this context (the summed loss is then a Replicate DTensor)."""
    if not enabled:
        return contextlib.nullcontext()
    return loss_parallel()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def _chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, grad_dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V] (fp32 or wider), labels [n] -> (summed loss of the chunk, d loss / d
    logits [n, V] in `grad_dtype`). Elementwise and reductions only: compiled, one fused pass
    writes the low-precision gradient directly (no fp32 [n, V] softmax in memory)."""
    valid = labels != IGNORE_INDEX
    target_ids = labels.clamp(min=0)[:, None]  # [n, 1]
    lse = torch.logsumexp(logits, dim=-1)  # [n]
    target = logits.gather(1, target_ids).squeeze(1)
    loss = torch.where(valid, lse - target, 0).sum()
    # d(sum loss)/d logits = softmax - onehot, zero on ignored rows
    grad = torch.exp(logits - lse[:, None])  # in place from here: one [n, V] buffer eagerly
    grad.scatter_add_(1, target_ids, -torch.ones_like(lse)[:, None])
    grad.mul_(valid[:, None])
    return loss, grad.to(grad_dtype)


@functools.cache
def _compiled_chunk_loss_and_grad():
    return torch.compile(_chunk_loss_and_grad)


def _accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, without a round trip of the product through a's dtype and a separate
    fp32 copy: for the [V, D] head gradient that round trip is ~3x the accumulator's traffic
    per chunk. CUDA GEMMs write fp32 from bf16 inputs (`out_dtype`, torch >= 2.8); CPU has no
    mixed-dtype GEMM (a test path: the product is cast)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += (a @ b).to(acc.dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, compiled: bool):
        # hidden [N, D], weight [V, D], labels [N] -> summed loss (>= fp32 scalar)
        dtype = _compute_dtype(hidden)
        acc = torch.promote_types(dtype, torch.float32)  # softmax/accumulation precision
        h, w = hidden.to(dtype), weight.to(dtype)
        grad_hidden = torch.empty_like(hidden, dtype=acc)
        # A frozen head (LoRA) needs no [V, D] fp32 gradient: neither its memory nor the
        # third of the head's matmuls that would fill it.
        grad_weight = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        loss_and_grad = _compiled_chunk_loss_and_grad() if compiled else _chunk_loss_and_grad
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                logits = (h[rows] @ w.T).to(acc)  # [n, V]
                loss, grad_logits = loss_and_grad(logits, labels[rows], dtype)  # [n, V] dtype
                total += loss
                grad_hidden[rows] = grad_logits @ w  # [n, D], cast on assignment
                if grad_weight is not None:
                    _accumulate_matmul(grad_weight, grad_logits.T, h[rows])  # [V, D]
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        weight_grad = None if grad_weight is None else (grad_weight * grad_out).to(weight_dtype)
        return (grad_hidden * grad_out).to(hidden_dtype), weight_grad, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_size: int = 1024, compiled: bool = False) -> torch.Tensor:
    """Sum over tokens of cross_entropy(hidden @ weight.T, labels) (IGNORE_INDEX skipped).
    hidden [..., D], weight [V, D], labels [...]. `compiled`: the per-chunk softmax/gradient
    chain runs as one torch.compile'd kernel (compile.components = ["loss"])."""
    return _FusedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                          labels.reshape(-1), chunk_size, compiled)
