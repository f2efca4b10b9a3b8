"""Low-precision training (torchao Float8 / MXFP8).

Float8 (`quantize.mode = "float8"`, torchao >= 0.18):
    linears   `torchao.float8.convert_to_float8_training` with
              `Float8LinearConfig.from_recipe_name(quantize.float8_recipe)` ("tensorwise":
              one scale per tensor, e4m3 forward / e5m2 gradients; "rowwise": one scale per
              row, e4m3 everywhere). `quantize.emulate=true` runs the float8 casts with a
              high-precision matmul (any device: the CPU tests). Under tensor parallelism the
              tensorwise recipe uses torchao's float8 TP styles (`tensor_parallel_styles`),
              so sequence-parallel all-gathers move float8, not bf16. With
              `quantize.enable_fsdp_float8_all_gather=true` (tensorwise) FSDP all-gathers the
              float8 weights, and after every optimizer step the trainer calls
              `after_optimizer_step`, which precomputes their scales with one all-reduce
              (`torchao.float8.precompute_float8_dynamic_scale_for_fsdp`).
    experts   torchao's MoE training conversion (`torchao.prototype.moe_training`,
              `Float8TrainingOpConfig`): mlp1/mlp2 weights become
              `Float8TrainingWeightWrapperTensor`s, so the model's own `torch._grouped_mm`
              runs as a rowwise-scaled float8 grouped GEMM (whatever the linear recipe: it is
              the only grouped recipe torchao has). Needs CUDA SM90+ and token groups whose
              sizes are multiples of 16: `_AlignedTokenGroups` pads each expert's rows (the
              extra rows are zeros, dropped after the GEMMs). torchao has no emulated float8
              grouped GEMM, so with `quantize.emulate=true` the experts stay in high precision
              (a warning says so).
MXFP8 (`quantize.mode = "mxfp8"`, Blackwell SM100+; 32-element blocks with E8M0 scales):
    linears   `MXFP8Linear` (below): torchao's `_to_mxfp8_then_scaled_mm` with the bias added
              separately (torchao 0.18's MXFP8 weight wrapper drops a linear's bias), under TP
              on the rank-local shards. The weight-gradient GEMM reduces over tokens, so the
              tokens per micro-batch (local_batch_size x seq_len) must be a multiple of 32.
    experts   `MXFP8TrainingOpConfig` weight wrappers (torchao pads token groups to 32 rows
              on GPU).
    With `quantize.emulate=true` both use torchao's emulated kernels
    (`KernelPreference.EMULATED`, bf16 grouped GEMM outputs), which run on CPU.
Never converted: modules named by `quantize.filter_fqns` (substring match on the module's
fully qualified name; default "output", "router"; add "experts" to keep the experts in bf16),
linears whose GEMM dimensions per TP rank are not multiples of 16 (float8) / 32 (mxfp8),
experts whose dim / hidden size per TP rank are not (warned), the router gate
(the router computes in fp32 from its weight, not through the module), and the output head
while the fused chunked loss reads its weight directly (training.loss_chunk_size > 0, no TP).
Conversion happens on the meta model before TP/EP/FSDP (torchtitan's converter order);
parameter names do not change and state dicts hold plain tensors (`_plain_state_dict`), so
checkpoints stay interchangeable with unquantized runs. (CPU quirk: a compiled fp32 model
runs its experts through GroupedExperts' loop path, which reads plain weight slices, so the
experts are not quantized there; GPU runs compute in bf16 and take the grouped path.)

Every refusal is a one-line `ConfigError` naming the config keys.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import warnings

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Shard, _dispatch, _ops
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

from runtime.errors import ConfigError
from runtime.model.model import resolve_compute_dtype
from runtime.model.moe import GroupedExperts

__all__ = [
    "MXFP8Linear",
    "after_optimizer_step",
    "apply_quantization",
    "check_quantization",
    "tensor_parallel_styles",
]

FLOAT8_LINEAR_SM = (8, 9)   # torch._scaled_mm (Ada, Hopper and later)
FLOAT8_GROUPED_SM = (9, 0)  # torch._scaled_grouped_mm (Hopper and later)
MXFP8_SM = (10, 0)          # Blackwell
FLOAT8_ALIGN = 16           # float8 GEMM dimensions and grouped-GEMM token groups
MXFP8_BLOCK = 32            # MX scaling block

# Modules that are never converted, whatever quantize.filter_fqns says (see the docstring).
_ALWAYS_SKIPPED = ("router.gate",)


# --------------------------------------------------------------------------- device checks

def _capability(device: torch.device):
    """(major, minor) of the run's GPU; None on CPU; "unknown" for a CUDA device that this
    process cannot see (runtime.plan's dry runs of a GPU job on a CPU machine)."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "unknown"
    return torch.cuda.get_device_capability(device)


def _where(device: torch.device, cap) -> str:
    if cap is None:
        return f"this run's device is {device.type}"
    return f"this GPU is sm{cap[0]}{cap[1]}"


def _torchao_version() -> str:
    # torchao's wheel tries to load its CUDA kernels at import and logs a warning per library
    # on a CPU-only torch build: noise there, so quiet for that one import.
    log = logging.getLogger("torchao")
    level = log.level
    if torch.version.cuda is None:
        log.setLevel(logging.ERROR)
    try:  # optional dependency: imported only when quantize.mode asks for it
        import torchao
    except ImportError as e:
        raise ConfigError(
            "quantize.mode needs torchao (pip install 'gptoss-runtime[float8]', torchao>=0.18): "
            f"{e}") from None
    finally:
        log.setLevel(level)
    return getattr(torchao, "__version__", "unknown")


def check_quantization(cfg, device: torch.device) -> None:
    """Refuse quantize.* combinations this device cannot run (one line naming the keys)."""
    q = cfg.quantize
    if q.enable_fsdp_float8_all_gather and q.mode != "float8":
        raise ConfigError(
            f"quantize.enable_fsdp_float8_all_gather=true needs quantize.mode='float8' "
            f"(got '{q.mode}')")
    if q.mode == "none":
        return
    _torchao_version()
    if q.mode == "mxfp8":
        # torchao's own precondition for its MXFP8 training tensors (checked by an assert).
        if not (hasattr(_ops, "scaled_mm_single_dim_strategy")
                and hasattr(_dispatch, "is_pinned_handler")):
            raise ConfigError(
                f"quantize.mode='mxfp8' needs a newer torch than {torch.__version__} (torchao's "
                "MXFP8 training needs DTensor's scaled_mm_single_dim_strategy)")
    cap = _capability(device)
    if q.emulate or cap == "unknown":
        return
    if q.mode == "float8":
        if cap is None or cap < FLOAT8_LINEAR_SM:
            raise ConfigError(
                f"quantize.mode='float8' needs a CUDA GPU with compute capability >= 8.9 "
                f"({_where(device, cap)}); set quantize.emulate=true to emulate float8 "
                "(tests only, no speed-up)")
        if cap < FLOAT8_GROUPED_SM and not _filtered("layers.0.moe.experts", q.filter_fqns):
            raise ConfigError(
                f"quantize.mode='float8': the experts' float8 grouped GEMM needs compute "
                f"capability >= 9.0 ({_where(device, cap)}); add 'experts' to "
                "quantize.filter_fqns to keep them in bf16, or set quantize.emulate=true")
    elif q.mode == "mxfp8" and (cap is None or cap < MXFP8_SM):
        raise ConfigError(
            f"quantize.mode='mxfp8' needs a Blackwell GPU (compute capability >= 10.0; "
            f"{_where(device, cap)}); set quantize.emulate=true for torchao's emulated "
            "MXFP8 (tests only, slow)")


# --------------------------------------------------------------------------- conversion

def _filtered(fqn: str, filter_fqns) -> bool:
    return any(f and f in fqn for f in filter_fqns) or any(s in fqn for s in _ALWAYS_SKIPPED)


def _linear_filter(cfg, tp: int, align: int):
    """Which nn.Linear to convert: not filtered, and every GEMM dimension a multiple of
    `align` on each rank (under TP, tensor_parallel.py shards the attention output
    projection `wo` along its input features, every other linear along its outputs)."""
    skip = list(cfg.quantize.filter_fqns)
    if cfg.training.loss_chunk_size > 0 and tp == 1:
        skip.append("output")  # the fused loss reads output.weight, not the module

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or _filtered(fqn, skip):
            return False
        k, n = module.in_features, module.out_features
        if fqn.endswith(".wo"):
            k //= tp
        else:
            n //= tp
        return k % align == 0 and n % align == 0

    return keep


def _experts(model: nn.Module, filter_fqns, align: int, tp: int) -> list[tuple[str, nn.Module]]:
    """GroupedExperts to convert: not filtered, dim and (per TP rank) hidden size multiples
    of `align`; the others are left in high precision with a warning."""
    out = []
    for fqn, module in model.named_modules():
        if not isinstance(module, GroupedExperts) or _filtered(fqn, filter_fqns):
            continue
        _, two_f, d = module.mlp1_weight.shape
        hidden = two_f // 2 // tp  # TP shards the experts' hidden units (no EP with TP)
        if d % align or hidden % align:
            warnings.warn(f"quantize.mode: {fqn} left in high precision (dim {d} / hidden per "
                          f"rank {hidden} not multiples of {align})", stacklevel=3)
            continue
        out.append((fqn, module))
    return out


def apply_quantization(model: nn.Module, cfg, device: torch.device,
                       tp: int = 1) -> dict | None:
    """Convert `model` in place (on meta, before TP/EP/FSDP) for quantize.mode. `tp`: the
    tensor-parallel degree the model will be sharded over (GEMM shapes are checked per rank).
    Returns what was converted (mode, linears, experts, ...; for logs and tests; float8:
    "precompute_scales", whether `after_optimizer_step` is due), None for quantize.mode =
    "none"."""
    q = cfg.quantize
    check_quantization(cfg, device)
    if q.mode == "none":
        return None
    if q.mode == "float8":
        summary = _apply_float8(model, cfg, device, tp)
    else:
        summary = _apply_mxfp8(model, cfg, device, tp)
    model.register_state_dict_post_hook(_plain_state_dict)
    return summary


def _plain_state_dict(module, state_dict, prefix, local_metadata) -> None:
    """State dicts hold plain tensors (DTensors of plain tensors), never torchao's weight
    wrappers: checkpoints and HF exports stay interchangeable with unquantized runs. The
    plain tensors alias the wrappers' storage, so an in-place (DCP) load still lands."""
    for key, value in state_dict.items():
        local = value._local_tensor if isinstance(value, DTensor) else value
        inner = _unwrapped(local)
        if inner is local:
            continue
        if isinstance(value, DTensor):
            inner = DTensor.from_local(inner, value.device_mesh, value.placements,
                                       shape=value.shape, stride=value.stride(), run_check=False)
        state_dict[key] = inner


def _unwrapped(t):
    """The high-precision tensor inside a torchao training wrapper (MoE weight wrapper,
    float8 FSDP all-gather weight); `t` itself otherwise."""
    if type(t) is torch.Tensor:
        return t
    # optional dependency (torchao): imported only when quantizing
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor
    from torchao.prototype.moe_training.tensor import TrainingWeightWrapperBaseTensor

    if isinstance(t, TrainingWeightWrapperBaseTensor):
        return t._data
    if isinstance(t, WeightWithDynamicFloat8CastTensor):
        return t._tensor
    return t


def _apply_float8(model, cfg, device, tp: int) -> dict:
    # optional dependency (torchao): imported only when quantizing
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    q = cfg.quantize
    config = Float8LinearConfig.from_recipe_name(q.float8_recipe)
    config = dataclasses.replace(
        config, emulate=q.emulate,
        enable_fsdp_float8_all_gather=q.enable_fsdp_float8_all_gather)
    keep = _linear_filter(cfg, tp, FLOAT8_ALIGN)
    converted = [fqn for fqn, m in model.named_modules() if keep(m, fqn)]
    convert_to_float8_training(model, config=config, module_filter_fn=keep)
    experts = _experts(model, q.filter_fqns, FLOAT8_ALIGN, tp)
    if experts and q.emulate:
        warnings.warn(
            "quantize.emulate=true: torchao has no emulated float8 grouped GEMM, so the "
            f"experts ({len(experts)} GroupedExperts) stay in high precision; only the "
            "linears run emulated float8", stacklevel=3)
        experts = []
    if experts:
        # optional dependency (torchao): imported only when quantizing
        from torchao.prototype.moe_training.config import Float8TrainingOpConfig
        from torchao.prototype.moe_training.tensor import Float8TrainingWeightWrapperTensor

        # Rowwise scales, bf16 outputs (the kernel's), token groups padded by
        # _AlignedTokenGroups (torchao 0.18 refuses to pad them for float8).
        op_config = Float8TrainingOpConfig()
        for _, module in experts:
            _wrap_expert_weights(module, Float8TrainingWeightWrapperTensor, op_config)
            _AlignedTokenGroups.install(module, FLOAT8_ALIGN)
    return {"mode": "float8", "recipe": q.float8_recipe, "emulate": q.emulate,
            "linears": converted, "experts": [fqn for fqn, _ in experts],
            # Float8 scales of all FSDP-sharded weights in one all-reduce after each
            # optimizer step (torchao skips weights that FSDP does not shard).
            "precompute_scales": q.enable_fsdp_float8_all_gather}


def _apply_mxfp8(model, cfg, device, tp: int) -> dict:
    # optional dependency (torchao): imported only when quantizing
    from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig, MXFP8TrainingRecipe
    from torchao.prototype.moe_training.tensor import MXFP8TrainingWeightWrapperTensor

    q = cfg.quantize
    recipe = (MXFP8TrainingRecipe.MXFP8_EMULATED_RCEIL if q.emulate
              else MXFP8TrainingRecipe.MXFP8_RCEIL)
    # Grouped GEMM outputs in the compute dtype on GPU (torchao's emulation computes in bf16
    # only); the GPU kernels need token groups of whole 32-row blocks: torchao pads them.
    op_config = dataclasses.replace(
        MXFP8TrainingOpConfig.from_recipe(recipe),
        out_dtype=torch.bfloat16 if q.emulate else _compute_dtype(cfg, device),
        pad_token_groups_for_grouped_mm=not q.emulate)
    keep = _linear_filter(cfg, tp, MXFP8_BLOCK)
    converted = []
    for fqn, module in list(model.named_modules()):
        if keep(module, fqn):
            parent_name, _, name = fqn.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, name, MXFP8Linear.from_linear(module, op_config))
            converted.append(fqn)
    experts = _experts(model, q.filter_fqns, MXFP8_BLOCK, tp)
    for _, module in experts:
        _wrap_expert_weights(module, MXFP8TrainingWeightWrapperTensor, op_config)
    return {"mode": "mxfp8", "emulate": q.emulate, "linears": converted,
            "experts": [fqn for fqn, _ in experts]}


def _compute_dtype(cfg, device: torch.device) -> torch.dtype:
    return resolve_compute_dtype(cfg.model.compute_dtype, device)


def _wrap_expert_weights(module: nn.Module, tensor_cls, op_config) -> None:
    """mlp1/mlp2 weights -> torchao weight wrappers whose `torch._grouped_mm` is a scaled
    (float8 / mxfp8) grouped GEMM with dynamic quantization; biases stay plain."""
    for name in ("mlp1_weight", "mlp2_weight"):
        param = getattr(module, name)
        setattr(module, name, nn.Parameter(tensor_cls(param.data, op_config),
                                           requires_grad=param.requires_grad))


class _AlignedTokenGroups:
    """Replaces `GroupedExperts._grouped` on one instance: each expert's rows are padded with
    zero rows to a multiple of `align` before the grouped GEMMs (torchao's float8 grouped
    GEMM needs it) and the padding is dropped afterwards. Static shapes, no host sync: the
    padded buffer holds round_up(N + E * (align - 1), align) rows, the slack going to the
    last group (zeros, computed and discarded)."""

    def __init__(self, grouped, align: int):
        self.grouped, self.align = grouped, align

    @classmethod
    def install(cls, experts: nn.Module, align: int) -> None:
        if not isinstance(experts.__dict__.get("_grouped"), cls):
            experts._grouped = cls(experts._grouped, align)

    def __call__(self, x, counts, w1, b1, w2, b2, *lora):
        # lora: the experts' adapters (GroupedExperts._grouped's trailing arguments), per
        # expert like the weights, so the padded groups pass them through unchanged.
        n, num_groups, a = x.shape[0], counts.shape[0], self.align
        capacity = -(-(n + num_groups * (a - 1)) // a) * a
        counts = counts.to(torch.int64)
        padded = (counts + a - 1) // a * a
        start = torch.cumsum(counts, 0) - counts
        padded_start = torch.cumsum(padded, 0) - padded
        row_group = torch.repeat_interleave(
            torch.arange(num_groups, device=x.device), counts, output_size=n)
        dest = padded_start[row_group] + torch.arange(n, device=x.device) - start[row_group]
        x_padded = x.new_zeros(capacity, x.shape[1]).index_copy(0, dest, x)
        slack = capacity - padded.sum()
        padded_counts = torch.cat([padded[:-1], padded[-1:] + slack])
        out = self.grouped(x_padded, padded_counts, w1, b1, w2, b2, *lora)
        return out.index_select(0, dest)


class MXFP8Linear(nn.Linear):
    """nn.Linear whose matmul (forward and both backward GEMMs) runs in MXFP8 through torchao;
    same parameters and names as the nn.Linear it replaces. Under TP (DTensor weight) it
    multiplies the rank-local shards and hands back the DTensor the TP style expects."""

    op_config = None  # torchao MXFP8TrainingOpConfig (kernel preference, scale rounding)

    @classmethod
    def from_linear(cls, linear: nn.Linear, op_config) -> MXFP8Linear:
        linear.__class__ = cls  # in place: same parameters, hooks and flags
        linear.op_config = op_config
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mxfp8={self.op_config.kernel_preference.value}"

    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        try:  # optional dependency (torchao): imported only when quantizing
            from torchao.prototype.moe_training.mxfp8_linear import _to_mxfp8_then_scaled_mm
        except ImportError:  # torchao 0.17 kept it with the MX formats
            from torchao.prototype.mx_formats.mx_linear import _to_mxfp8_then_scaled_mm
        c = self.op_config
        out = _to_mxfp8_then_scaled_mm(x.reshape(-1, x.shape[-1]), w, c.kernel_preference,
                                       c.scale_calculation_mode, c.wgrad_with_hp)
        return out.view(*x.shape[:-1], w.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, device_type = self.weight, self.bias, x.device.type
        tp = isinstance(weight, DTensor)
        if tp:  # ColwiseParallel: weight Shard(0), x Replicate; RowwiseParallel: Shard(1), Shard(-1)
            mesh, rowwise = weight.device_mesh, weight.placements[0] == Shard(1)
            if isinstance(x, DTensor):  # colwise: every rank's x-gradient is a partial sum
                x = x.to_local(grad_placements=None if rowwise else [Partial()])
            weight = weight.to_local()
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else x.dtype)
        with torch.autocast(device_type, enabled=False):
            out = self._mm(x.to(dtype), weight.to(dtype))
            if not tp:
                return out if bias is None else out + bias.to(out.dtype)
            if not rowwise:
                if bias is not None:
                    out = out + bias.to_local().to(out.dtype)
                return DTensor.from_local(out, mesh, [Shard(-1)], run_check=False)
            out = DTensor.from_local(out, mesh, [Partial()], run_check=False)
            return out if bias is None else out + bias.to(out.dtype)


# --------------------------------------------------------------------------- TP and FSDP hooks

def tensor_parallel_styles(*linears: nn.Module | None):
    """(ColwiseParallel, RowwiseParallel, PrepareModuleInput) classes for TP plans over these
    linears: torchao's float8 styles (float8 all-gathers / reduce-scatters of activations)
    when every one of them is a Float8Linear with dynamic (tensorwise) scaling, torch's
    otherwise (unquantized, rowwise float8, MXFP8)."""
    if linears and all(_float8_tensorwise(m) for m in linears):
        # optional dependency (torchao): imported only when quantizing
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )

        return Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput
    return ColwiseParallel, RowwiseParallel, PrepareModuleInput


def _float8_tensorwise(module) -> bool:
    if module is None or "torchao.float8" not in sys.modules:
        return False
    # optional dependency (torchao): imported only when quantizing
    from torchao.float8.config import ScalingGranularity, ScalingType
    from torchao.float8.float8_linear import Float8Linear

    if not isinstance(module, Float8Linear):
        return False
    casts = (module.config.cast_config_input, module.config.cast_config_weight,
             module.config.cast_config_grad_output)
    return all(c.scaling_type == ScalingType.DYNAMIC
               and c.scaling_granularity == ScalingGranularity.TENSORWISE for c in casts)


def after_optimizer_step(parts: list[nn.Module]) -> None:
    """Trainer hook after `optimizer.step()` for the parts whose quantization summary says
    "precompute_scales" (FSDP float8 all-gather): precompute the float8 scales of every
    sharded float8 weight in one all-reduce (instead of one per weight inside the next
    forward's all-gathers)."""
    if not parts:
        return
    # optional dependency (torchao): imported only when quantizing
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for part in parts:
        precompute_float8_dynamic_scale_for_fsdp(part)
