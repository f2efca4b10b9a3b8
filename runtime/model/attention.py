"""Grouped-query attention with learned sinks, sliding-window/full layers and two backends.

Sink semantics (gpt-oss): each head h has a learned logit s_h appended as an extra
"key" column; softmax runs over [scores, s_h] and the sink column is dropped. So the
rows sum to less than one. Backends:
- math: the literal definition (dense scores, sink column). CPU default and the reference.
- flex: FlexAttention without the sink, then the exact identity
  softmax-with-sink = softmax-without-sink * sigmoid(lse - s_h), where lse is the
  log-sum-exp of the row's scores. Gradients flow into the sink and into q/k through lse.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

from runtime.model import init
from runtime.model.args import ModelArgs
from runtime.model.rope import apply_rotary_emb


def resolve_attn_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "flex" if device.type == "cuda" else "math"
    return backend


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Softmax statistics in at least fp32 (fp64 stays fp64 for reference tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def math_sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                        mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, H, S, D]; k, v: [B, KV, S, D]; sinks: [H]; mask: bool [B|1, 1, S, S]."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)  # query head h reads kv head h // n_rep
    v = v.repeat_interleave(n_rep, dim=1)
    scores = _upcast(torch.matmul(q, k.transpose(-2, -1))) * scale  # [B, H, S, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
    logits = torch.cat([scores, sink], dim=-1)  # [B, H, S, S + 1]
    probs = torch.softmax(logits, dim=-1)[..., :-1]  # drop the sink column
    return torch.matmul(probs.to(v.dtype), v)  # [B, H, S, D]


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def flex_sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                        block_mask, scale: float) -> torch.Tensor:
    """Same contract as `math_sink_attention`, with a BlockMask."""
    # eager flex on CPU: forward only (torch refuses its backward on CPU)
    flex = _compiled_flex_attention() if q.device.type == "cuda" else flex_attention
    out, aux = flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True,
                    return_aux=AuxRequest(lse=True))  # (return_lse is deprecated)
    lse = aux.lse
    # out: [B, H, S, D]; lse: [B, H, S] (natural log, fp32)
    keep = torch.sigmoid(_upcast(lse) - sinks.to(_upcast(lse).dtype).view(1, -1, 1))  # mass not on the sink
    return (_upcast(out) * keep.unsqueeze(-1)).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, sliding: bool):
        super().__init__()
        self.head_dim = args.head_dim
        self.sliding = sliding
        self.scale = args.head_dim ** -0.5
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=True)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=True)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=True)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=True)
        self.sinks = nn.Parameter(torch.empty(args.n_heads))
        # Set by runtime.parallel.context_parallel.apply_cp: keys/values are gathered over it.
        self.context_parallel = None

    def init_weights(self, std: float) -> None:
        for linear in (self.wq, self.wk, self.wv, self.wo):
            init.trunc_normal_(linear.weight, std=std)
            init.zeros_(linear.bias)
            if hasattr(linear, "init_lora_weights"):  # a LoRALinear (runtime/model/lora.py)
                linear.init_lora_weights()
        init.normal_(self.sinks, std=std)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask,
                backend: str) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(bsz, seq_len, -1, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.wk(x).view(bsz, seq_len, -1, self.head_dim).transpose(1, 2)  # [B, KV, S, D]
        v = self.wv(x).view(bsz, seq_len, -1, self.head_dim).transpose(1, 2)  # [B, KV, S, D]
        cos, sin = rope
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        if self.context_parallel is not None:  # local queries attend to the whole sequence
            k = self.context_parallel.gather_sequence(k, dim=2)  # [B, KV, S, D]
            v = self.context_parallel.gather_sequence(v, dim=2)

        sinks = self.sinks
        if hasattr(sinks, "to_local"):  # DTensor sharded by head under TP
            sinks = sinks.to_local()
        attend = flex_sink_attention if backend == "flex" else math_sink_attention
        out = attend(q, k, v.to(q.dtype), sinks, mask, self.scale)  # [B, H, S, D]
        out = out.transpose(1, 2).reshape(bsz, seq_len, -1)
        return self.wo(out)
