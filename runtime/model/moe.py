"""Mixture of experts: top-k router with an aux-loss-free expert bias, clamped-SwiGLU experts.

Token flow for T tokens, top-k routing, E experts:
  route:   logits [T, E] -> top-k expert ids [T, k] and weights [T, k] (softmax over the k)
  permute: the T*k (token, expert) pairs sorted by expert -> rows [T*k, D], counts [E]
  experts: one grouped GEMM per projection over the sorted rows
  combine: rows * weights, summed back onto their tokens -> [T, D]
Expert parallelism (runtime/parallel) swaps the permute/combine steps for all-to-alls.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from runtime.model import init
from runtime.model.args import ModelArgs


class Router(nn.Module):
    """Linear with bias over all experts; selection may add the load-balancing bias,
    the weights never do (softmax over the selected experts' raw logits)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.top_k
        self.gate = nn.Linear(args.dim, args.num_experts, bias=True)

    def init_weights(self, std: float) -> None:
        init.trunc_normal_(self.gate.weight, std=std)
        init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor | None):
        # Routing decisions are sensitive to rounding: keep the router in fp32 even under autocast.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float(), self.gate.bias.float())  # [T, E]
        choice = logits if expert_bias is None else logits + expert_bias
        expert_ids = torch.topk(choice, self.top_k, dim=-1).indices  # [T, k]
        weights = torch.softmax(logits.gather(-1, expert_ids), dim=-1)  # [T, k]
        return weights, expert_ids, logits


def clamped_swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss activation on interleaved [gate, linear] columns: [N, 2F] -> [N, F]."""
    gate, linear = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


def _grouped_mm_aligned(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned row strides; tiny test shapes may not have them.
    Every operand runs in x's dtype (LoRA ranks: a multiple of 8 in bf16)."""
    return all(t.shape[-1] * x.element_size() % 16 == 0 for t in (x, *tensors))


class GroupedExperts(nn.Module):
    """E experts stored as stacked weights: mlp1 [E, 2F, D] (+bias), mlp2 [E, D, F] (+bias)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_experts = args.num_experts
        self.alpha, self.limit = args.swiglu_alpha, args.swiglu_limit
        self.impl = args.moe_impl
        # Multiplies the weights' gradients (expert parallelism sets 1/ep, see moe_parallel.py).
        self.grad_scale = 1.0
        self._compiled_grouped = None  # set by compile_math
        E, D, F_ = args.num_experts, args.dim, args.moe_inter_dim
        self.mlp1_weight = nn.Parameter(torch.empty(E, 2 * F_, D))
        self.mlp1_bias = nn.Parameter(torch.empty(E, 2 * F_))
        self.mlp2_weight = nn.Parameter(torch.empty(E, D, F_))
        self.mlp2_bias = nn.Parameter(torch.empty(E, D))
        # LoRA (runtime/model/lora.py): per-expert adapters of mlp1 / mlp2, and their scale.
        self.lora_targets: tuple[str, ...] = ()
        self.lora_scaling = 0.0

    def init_weights(self, std: float, out_std: float) -> None:
        init.trunc_normal_(self.mlp1_weight, std=std)
        init.trunc_normal_(self.mlp2_weight, std=out_std)
        init.zeros_(self.mlp1_bias)
        init.zeros_(self.mlp2_bias)
        self.init_lora_weights()

    def add_lora(self, targets: list[str], rank: int, scaling: float) -> None:
        """Per-expert adapters for "mlp1" and/or "mlp2", in the weights' own [out, in]
        orientation: mlp1_lora_A [E, r, D], mlp1_lora_B [E, 2F, r], mlp2_lora_A [E, r, F],
        mlp2_lora_B [E, D, r]; delta W_e = scaling * B_e @ A_e."""
        E, two_f, D = self.mlp1_weight.shape
        device = self.mlp1_weight.device
        shapes = {"mlp1": ((E, rank, D), (E, two_f, rank)),
                  "mlp2": ((E, rank, two_f // 2), (E, D, rank))}
        for target in targets:
            shape_a, shape_b = shapes[target]
            setattr(self, f"{target}_lora_A", nn.Parameter(torch.empty(shape_a, device=device)))
            setattr(self, f"{target}_lora_B", nn.Parameter(torch.empty(shape_b, device=device)))
        self.lora_targets = tuple(t for t in ("mlp1", "mlp2") if t in targets)
        self.lora_scaling = scaling

    def init_lora_weights(self) -> None:
        """PEFT's default per expert: A ~ U(+-1/sqrt(fan_in)) (Kaiming-uniform, a = sqrt(5)),
        B = 0 (the adapted model starts as the base)."""
        for target in self.lora_targets:
            a = getattr(self, f"{target}_lora_A")
            init.uniform_(a, 1 / math.sqrt(a.shape[-1]))
            init.zeros_(getattr(self, f"{target}_lora_B"))

    def _lora_tensors(self) -> tuple[torch.Tensor | None, ...]:
        """(mlp1 A, mlp1 B, mlp2 A, mlp2 B) as local tensors, None where not adapted."""
        out = []
        for target in ("mlp1", "mlp2"):
            adapted = target in self.lora_targets
            out += [_local(getattr(self, f"{target}_lora_{m}")) if adapted else None
                    for m in ("A", "B")]
        return tuple(out)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [N, D] rows sorted by expert; counts: [E_local] rows per expert (sum == N)."""
        w1, b1, w2, b2 = (_local(p) for p in (self.mlp1_weight, self.mlp1_bias,
                                              self.mlp2_weight, self.mlp2_bias))
        lora = self._lora_tensors()
        if self.grad_scale != 1.0:  # (frozen tensors have no gradient to scale)
            w1, b1, w2, b2, *lora = (_ScaleGrad.apply(t, self.grad_scale)
                                     if t is not None and t.requires_grad else t
                                     for t in (w1, b1, w2, b2, *lora))
        # Autocast does not cover the grouped GEMM: cast the rows ourselves so the experts run
        # in the compute dtype (bf16 fast path) rather than in the fp32 residual stream's dtype.
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        # torch.compile only traces _grouped_mm in bf16 (eager CPU also takes fp32).
        compiled_fp32 = torch.compiler.is_compiling() and x.dtype != torch.bfloat16
        adapters = [t for t in lora if t is not None]
        if self.impl == "grouped" and _grouped_mm_aligned(x, w1, w2, *adapters) \
                and not compiled_fp32:
            grouped = self._grouped
            if self._compiled_grouped is not None and x.dtype == torch.bfloat16:
                grouped = self._compiled_grouped
            return grouped(x, counts, w1, b1, w2, b2, *lora)
        return self._loop(x, counts, w1, b1, w2, b2, *lora)

    def compile_math(self) -> None:
        """torch.compile the grouped-GEMM path alone (a pure function of its tensors: no
        hooks, no host syncs), used in bf16 (runtime/parallel/compile.py, regional mode)."""
        self._compiled_grouped = torch.compile(self._grouped, fullgraph=True)

    def _grouped(self, x, counts, w1, b1, w2, b2, a1=None, bl1=None, a2=None,
                 bl2=None) -> torch.Tensor:
        """a1/bl1, a2/bl2: the experts' LoRA A/B of mlp1 / mlp2 (None: not adapted), applied
        as two more grouped GEMMs each through the rank-r bottleneck."""
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E] end row of each group
        row_expert = torch.repeat_interleave(  # [N] expert id of every row, no host sync
            torch.arange(w1.shape[0], device=x.device), counts, output_size=x.shape[0])
        dtype = x.dtype

        def mm(rows, w):  # rows [N, in] x per-expert w [E, out, in] -> [N, out]
            return torch._grouped_mm(rows, w.to(dtype).transpose(-2, -1), offs=offsets)

        h = mm(x, w1)  # [N, 2F]
        if a1 is not None:
            h = h + mm(mm(x, a1) * self.lora_scaling, bl1)  # [N, r] -> [N, 2F]
        h = h + b1.to(dtype)[row_expert]
        a = clamped_swiglu(h, self.alpha, self.limit)  # [N, F]
        out = mm(a, w2)  # [N, D]
        if a2 is not None:
            out = out + mm(mm(a, a2) * self.lora_scaling, bl2)  # [N, r] -> [N, D]
        return out + b2.to(dtype)[row_expert]

    # Kept out of compiled graphs: its host sync and data-dependent slice sizes would be a
    # graph break plus dynamic shapes, which torch 2.11's symbolic shapes mis-refine under
    # FSDP x TP ("38 not in VR[0, 0]").
    @torch.compiler.disable
    def _loop(self, x, counts, w1, b1, w2, b2, a1=None, bl1=None, a2=None,
              bl2=None) -> torch.Tensor:
        """Reference: one dense matmul pair per expert (host sync on counts; tests only)."""
        outs, start, dtype, s = [], 0, x.dtype, self.lora_scaling
        for e, n in enumerate(counts.tolist()):
            rows = x[start:start + n]
            h = rows @ w1[e].to(dtype).T + b1[e].to(dtype)
            if a1 is not None:
                h = h + ((rows @ a1[e].to(dtype).T) * s) @ bl1[e].to(dtype).T
            a = clamped_swiglu(h, self.alpha, self.limit)
            out = a @ w2[e].to(dtype).T + b2[e].to(dtype)
            if a2 is not None:
                out = out + ((a @ a2[e].to(dtype).T) * s) @ bl2[e].to(dtype).T
            outs.append(out)
            start += n
        return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` in backward."""

    @staticmethod
    def forward(ctx, t, scale: float):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor parameter (expert/tensor parallel); identity otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


class _AddAuxiliaryLoss(torch.autograd.Function):
    """Returns x unchanged and makes backward also differentiate `aux` (with gradient 1),
    so the auxiliary loss trains the router without threading it through the model output."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_dtype, ctx.aux_device = aux.dtype, aux.device
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=ctx.aux_dtype, device=ctx.aux_device)


def switch_aux_loss(logits: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer balance loss E * sum_e f_e * P_e (the definition HF uses):
    f_e = tokens routed to e / T (sums to k), P_e = mean router probability of e."""
    num_tokens = logits.shape[0]
    counts = torch.zeros(num_experts, device=logits.device, dtype=torch.float32)
    counts.scatter_add_(0, expert_ids.flatten(), torch.ones_like(expert_ids.flatten(), dtype=torch.float32))
    probs = torch.softmax(logits.float(), dim=-1).mean(dim=0)  # [E]
    return num_experts * torch.sum(counts / num_tokens * probs)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_experts, self.top_k = args.num_experts, args.top_k
        self.router = Router(args)
        self.experts = GroupedExperts(args)
        self.load_balance_coeff = args.load_balance_coeff
        self.aux_loss_coeff = args.aux_loss_coeff
        # Set by the trainer to 1/number-of-microbatches so accumulated aux gradients average.
        self.aux_loss_scale = 1.0
        self.last_aux_loss: torch.Tensor | None = None  # detached, for metrics
        # Set by runtime.parallel.moe_parallel under EP: rows then go to their expert's rank.
        self.expert_parallel = None
        self.register_buffer("tokens_per_expert", torch.zeros(args.num_experts), persistent=False)
        if args.load_balance_coeff is not None:
            self.register_buffer("expert_bias", torch.zeros(args.num_experts), persistent=True)
        else:
            self.expert_bias = None

    def init_weights(self, std: float, out_std: float) -> None:
        self.router.init_weights(std)
        self.experts.init_weights(std, out_std)
        with torch.no_grad():
            self.tokens_per_expert.zero_()
            if self.expert_bias is not None:
                self.expert_bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, dim = x.shape
        x = x.reshape(-1, dim)  # [T, D]
        weights, expert_ids, logits = self.router(x, self.expert_bias)  # [T, k], [T, k], [T, E]

        flat_ids = expert_ids.flatten()  # [T*k], pair p = token p // k
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))  # no host sync (unlike bincount)
        with torch.no_grad():
            self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)

        order = torch.argsort(flat_ids, stable=True)  # pairs grouped by expert
        token_of_row = order // self.top_k  # [T*k]
        rows = x[token_of_row]  # [T*k, D] grouped by expert
        if self.expert_parallel is not None:
            rows = self.expert_parallel.run(self.experts, rows, counts)
        else:
            rows = self.experts(rows, counts)
        rows = rows * weights.flatten()[order].unsqueeze(-1).to(rows.dtype)
        out = torch.zeros_like(x, dtype=rows.dtype).index_add_(0, token_of_row, rows)  # [T, D]

        if self.aux_loss_coeff > 0 and self.training:
            aux = switch_aux_loss(logits, expert_ids, self.num_experts)
            self.last_aux_loss = aux.detach()
            out = _AddAuxiliaryLoss.apply(out, aux * (self.aux_loss_coeff * self.aux_loss_scale))
        return out.reshape(bsz, seq_len, dim)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_expert_bias(model: nn.Module, process_group=None) -> None:
    """Aux-loss-free balancing step: bias_e += coeff * sign(mean_load - load_e) per layer.

    Token counts are summed over `process_group` first (all ranks that routed different
    tokens), with one all-reduce for all layers, so every rank applies the same update.
    """
    layers = [m for m in moe_layers(model) if m.expert_bias is not None]
    if not layers:
        for m in moe_layers(model):
            m.tokens_per_expert.zero_()
        return
    counts = torch.stack([m.tokens_per_expert for m in layers])  # [L, E]
    if process_group is not None:
        dist.all_reduce(counts, group=process_group)
    for m, load in zip(layers, counts):
        bias = m.expert_bias
        bias += m.load_balance_coeff * torch.sign(load.mean() - load).to(bias.dtype)
        m.tokens_per_expert.zero_()
