"""GptOssModel: embeddings -> N x (attention block, MoE block) -> norm -> output head.

Build on the meta device, materialise, then initialise:

    with torch.device("meta"):
        model = GptOssModel(args)
    model.to_empty(device="cuda")
    model.init_weights()

Parameters stay fp32 (master weights); the forward computes in `args.compute_dtype`
(bfloat16 on CUDA by default) through autocast, or in whatever dtype FSDP's mixed
precision hands it. Layers live in a ModuleDict keyed "0".."N-1" so parallel passes
(FSDP per block, pipeline stage splitting) can address and delete them by name.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                  create_selective_checkpoint_contexts)

from runtime.model import init
from runtime.model.args import ModelArgs
from runtime.model.attention import Attention, resolve_attn_backend
from runtime.model.loss import fused_linear_cross_entropy
from runtime.model.masks import MaskInputs, build_attention_masks
from runtime.model.moe import MoE
from runtime.model.rope import RotaryEmbedding

# Config dtype names -> torch dtypes (model.compute_dtype, training.mixed_precision_*).
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """A model.compute_dtype name as a torch dtype; "auto": bfloat16 on CUDA, else float32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[name]


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, result cast back to the input dtype (as gpt-oss/HF do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self) -> None:
        init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * normed).to(x.dtype)


def _selective_checkpoint_context():
    """Op-level AC: keep matmul outputs (expensive to recompute), recompute the rest
    (norms, RoPE, activations, routing arithmetic: cheap and memory-hungry)."""
    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.matmul.default,
            aten.linear.default}
    if hasattr(aten, "_grouped_mm"):
        save.add(aten._grouped_mm.default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        # "none" | "full" | "op": set by runtime.parallel.activation_checkpoint.apply_ac
        self.activation_checkpoint = "none"
        self.sliding = args.is_sliding(layer_id)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, sliding=self.sliding)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.moe = MoE(args)

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(std)
        init.trunc_normal_(self.attention.wo.weight, std=out_std)
        self.moe.init_weights(std, out_std)

    def forward(self, x: torch.Tensor, rope, masks, backend: str) -> torch.Tensor:
        if self.activation_checkpoint == "none" or not torch.is_grad_enabled():
            return self._forward(x, rope, masks, backend)
        # Recomputation re-runs the MoE forward and so counts its tokens twice; the expert
        # bias update only uses sign(mean - load), which a uniform factor leaves unchanged.
        extra = {"context_fn": _selective_checkpoint_context} if self.activation_checkpoint == "op" else {}
        return checkpoint(self._forward, x, rope, masks, backend, use_reentrant=False, **extra)

    def _forward(self, x: torch.Tensor, rope, masks, backend: str) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, masks.for_layer(self.sliding), backend)
        return x + self.moe(self.ffn_norm(x))


class GptOssModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.rope = RotaryEmbedding(args)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Set by runtime.parallel.context_parallel.apply_cp; inputs are then this rank's
        # sequence shard and `positions` is required. The model's own runtime state (its
        # forward reads it, as it reads its weights); callers get the handle from
        # parallelize()'s record, not from here.
        self.context_parallel = None
        # (backend, seq_len, device, cp) -> AttentionMasks without document ids: they depend
        # on no data, so one build serves every forward.
        self._static_masks: dict[tuple, object] = {}
        # Set by runtime.parallel.compile.apply_compile_loss (compile.components has "loss"):
        # the fused loss's per-chunk softmax/gradient chain runs compiled.
        self.compile_loss = False

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter and buffer (safe after `to_empty`). Pipeline stages may
        have dropped the embeddings/head (set to None): those are skipped.

        With a `seed`, every parameter is drawn from generators keyed by (seed, its name), so
        one seed gives the same model on any mesh and any pipeline split
        (runtime/model/init.py); without one, from the global RNG."""
        scope = init.seeded_init(self, seed) if seed is not None else contextlib.nullcontext()
        with scope:
            self._init_weights()

    def _init_weights(self) -> None:
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.n_layers)  # residual-branch outputs, GPT-2 style
        self.rope.init_weights()
        if self.tok_embeddings is not None:
            init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers.values():
            block.init_weights(std, out_std)
        if self.norm is not None:
            self.norm.init_weights()
        if self.output is not None:
            init.trunc_normal_(self.output.weight, std=std)

    def _attention_masks(self, backend: str, seq_len: int, document_ids: torch.Tensor | None,
                         device: torch.device):
        window = self.args.sliding_window
        if document_ids is not None:  # new documents every batch: build each forward
            return build_attention_masks(backend, self._mask_inputs(seq_len, document_ids, device),
                                         window)
        key = (backend, seq_len, str(device), id(self.context_parallel))
        masks = self._static_masks.get(key)
        if masks is None:
            inputs = self._mask_inputs(seq_len, None, device)
            masks = self._static_masks[key] = build_attention_masks(backend, inputs, window)
        return masks

    def _mask_inputs(self, seq_len: int, document_ids: torch.Tensor | None,
                     device: torch.device) -> MaskInputs:
        cp = self.context_parallel
        if cp is None:
            return MaskInputs.full_sequence(seq_len, document_ids, device)
        full_len = seq_len * cp.size
        doc_kv = cp.gather_ids(document_ids) if document_ids is not None else None
        return MaskInputs(q_index=cp.local_indices(full_len, device),
                          kv_index=cp.gathered_indices(full_len, device),
                          doc_q=document_ids, doc_kv=doc_kv)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                loss_chunk_size: int = 1024) -> torch.Tensor:
        """tokens: [B, S] int ids (or [B, S, D] hidden states on a pipeline stage without
        embeddings); positions: [B, S] (default arange, restart per document for packing);
        document_ids: [B, S] (attention stays within a document) -> logits [B, S, V]
        (or hidden states on a stage without the output head). With `labels` [B, S] the
        output head and cross entropy run fused and chunked (runtime/model/loss.py) and the
        summed token loss (fp32 scalar) is returned instead of the logits."""
        # Take the length from positions when given: a pipeline stage under sequence parallelism
        # receives hidden states [B, S/tp, D] while masks and RoPE need the full sequence.
        bsz, seq_len = positions.shape if positions is not None else tokens.shape[:2]
        device = tokens.device
        if positions is None:
            if self.context_parallel is not None:
                raise ValueError("context parallel forward needs the positions of the local tokens")
            positions = torch.arange(seq_len, device=device).expand(bsz, seq_len)
        backend = resolve_attn_backend(self.args.attn_backend, device)
        masks = self._attention_masks(backend, seq_len, document_ids, device)
        dtype = resolve_compute_dtype(self.args.compute_dtype, device)
        autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast:
            h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
            rope = self.rope(positions)
            for block in self.layers.values():
                h = block(h, rope, masks, backend)
            h = self.norm(h) if self.norm is not None else h
            if self.output is None:
                return h
            if labels is not None:
                return fused_linear_cross_entropy(h, self.output.weight, labels, loss_chunk_size,
                                                  compiled=self.compile_loss)
            return self.output(h)


def count_parameters(model: nn.Module, args: ModelArgs) -> tuple[int, int]:
    """(total, active per token), the way OpenAI's model card counts them: active takes
    top_k of num_experts experts and leaves out the token embedding table (a lookup, not a
    matmul); router, attention, norms and the output head always count."""
    total, expert, embedding = 0, 0, 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".moe.experts." in f".{name}":
            expert += p.numel()
        elif name.startswith("tok_embeddings."):
            embedding += p.numel()
    active = total - embedding - expert + expert * args.top_k // args.num_experts
    return total, active
