"""Load HF gpt-oss checkpoints (bf16/fp32 or MXFP4 experts) into a runtime `GptOssModel`.

    model = load_hf("openai/gpt-oss-20b")          # a new model (local dir or hub cache)
    load_hf_into(model, "/ckpts/gpt-oss-120b")      # an existing, possibly parallelized model

`load_hf_into` works on parameters that are DTensors (FSDP2 `fully_shard`, TP, EP, any mix):
each rank reads only the region of each tensor its local shard covers, described by the same
(local shape, global offset) that DCP uses, so no rank ever holds a full 120b expert stack.
No collectives are issued: every rank validates the same headers and raises the same error.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from runtime.hf.config import hf_config_to_model_args
from runtime.hf.keymap import canonical_runtime_key, is_transposed, runtime_to_hf_key
from runtime.hf.progress import Progress
from runtime.hf.reader import HFCheckpoint, Region, Source
from runtime.model import GptOssModel, ModelArgs
from runtime.model.lora_spec import is_lora_name
from runtime.model.moe import MoE
from runtime.model.rope import RotaryEmbedding

# Read big tensors in dim-0 chunks of at most this many values: bounds the temporaries
# (a bf16 read plus its fp32 copy, or MXFP4 dequantization) independently of the tensor size.
_CHUNK_VALUES = 1 << 25

# ModelArgs fields a checkpoint must agree with (HF config name for the message).
_ARCH_FIELDS = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "vocab_size": "vocab_size",
    "moe_inter_dim": "intermediate_size", "num_experts": "num_local_experts",
    "top_k": "num_experts_per_tok", "sliding_window": "sliding_window",
}


# ---------------------------------------------------------------------------- public API
def load_hf(path_or_repo_id: str | os.PathLike, *, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None, model_args_overrides: dict[str, Any] | None = None,
            allow_download: bool = False, revision: str | None = None,
            progress: bool = True) -> GptOssModel:
    """A `GptOssModel` (eval mode) built from the checkpoint's config.json and loaded with its
    weights. Parameters are fp32 (master weights) unless `dtype` is given; MXFP4 experts are
    dequantized exactly. `model_args_overrides` sets non-architecture fields such as
    `attn_backend`, `compute_dtype`, `load_balance_coeff`."""
    with HFCheckpoint.open(path_or_repo_id, allow_download=allow_download, revision=revision) as ckpt:
        if ckpt.config is None:
            raise FileNotFoundError(f"{ckpt.config_path}: not found (needed to build the model)")
        args = checkpoint_model_args(ckpt, **(model_args_overrides or {}))
        with torch.device("meta"):
            model = GptOssModel(args)
        if dtype is not None:
            _cast_parameters(model, dtype)  # on meta: free, and buffers (RoPE) keep fp32
        model.to_empty(device=device)
        load_checkpoint_into(model, ckpt, progress=progress)
    return model.eval()


def load_hf_into(model: nn.Module, path_or_repo_id: str | os.PathLike, *, allow_download: bool = False,
                 revision: str | None = None, progress: bool = True) -> None:
    """Load every parameter of `model` (materialized, any parallelization) from an HF checkpoint;
    `expert_bias` and the non-persistent buffers are reset. Raises before reading any weight if
    the checkpoint does not match `model.args`."""
    with HFCheckpoint.open(path_or_repo_id, allow_download=allow_download, revision=revision) as ckpt:
        load_checkpoint_into(model, ckpt, progress=progress)


def checkpoint_model_args(ckpt: HFCheckpoint, **overrides) -> ModelArgs:
    _check_quantization(ckpt)
    try:
        return hf_config_to_model_args(ckpt.config, **overrides)
    except KeyError as err:
        raise ValueError(f"{ckpt.config_path}: missing field {err}") from err
    except (TypeError, ValueError) as err:
        message = str(err).removeprefix("config.json: ")
        raise ValueError(f"{ckpt.config_path}: {message}") from err


# ---------------------------------------------------------------------------- loading
@torch.no_grad()
def load_checkpoint_into(model: nn.Module, ckpt: HFCheckpoint, *, progress: bool = True) -> None:
    args: ModelArgs = model.args
    if ckpt.config is not None:
        _check_config(ckpt, args)
    # LoRA adapters are not in a base checkpoint: they keep their initialisation.
    params = {canonical_runtime_key(name): p for name, p in model.named_parameters()
              if not is_lora_name(name)}
    _validate(ckpt, args, params)
    with Progress(len(params), f"loading {ckpt.directory.name or ckpt.directory}", enabled=progress) as bar:
        for key, param in params.items():
            _load_parameter(ckpt, ckpt.sources[key], param)
            bar.update(1, key)
    _reset_buffers(model)


def _check_quantization(ckpt: HFCheckpoint) -> None:
    quant = (ckpt.config or {}).get("quantization_config")
    if quant and quant.get("quant_method") != "mxfp4":
        raise ValueError(f"{ckpt.config_path}: quantization_config.quant_method="
                         f"{quant.get('quant_method')!r} is not supported (only 'mxfp4')")


def _check_config(ckpt: HFCheckpoint, args: ModelArgs) -> None:
    """config.json must describe the same architecture as the model we load into."""
    stored = checkpoint_model_args(ckpt)
    for field, hf_name in _ARCH_FIELDS.items():
        if getattr(stored, field) != getattr(args, field):
            raise ValueError(f"{ckpt.config_path}: {hf_name}={getattr(stored, field)} but the model "
                             f"has ModelArgs.{field}={getattr(args, field)}")
    ours = [args.is_sliding(i) for i in range(args.n_layers)]
    if [stored.is_sliding(i) for i in range(stored.n_layers)] != ours:
        raise ValueError(f"{ckpt.config_path}: layer_types differ from the model's sliding/full pattern")


def expected_parameter_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter of a full (unsplit) model, from a meta-device instance."""
    with torch.device("meta"):
        model = GptOssModel(args)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _validate(ckpt: HFCheckpoint, args: ModelArgs, params: dict[str, torch.Tensor]) -> None:
    """All-or-nothing: the checkpoint must hold exactly the full model's tensors, with its shapes.
    `params` may be a subset (a pipeline stage); each of them must be a model parameter."""
    expected = expected_parameter_shapes(args)
    for source in ckpt.sources.values():
        if source.runtime_key not in expected:
            raise ValueError(f"{ckpt.directory / source.file}: tensor {source.hf_key} does not exist in a "
                             f"model with n_layers={args.n_layers} (config mismatch?)")
    for key, shape in expected.items():
        source = ckpt.sources.get(key)
        if source is None:
            hf_key = runtime_to_hf_key(key)
            alt = f" (or {hf_key}_blocks/_scales)" if is_transposed(key) else ""
            raise ValueError(f"{ckpt.describe()}: missing tensor {hf_key}{alt}")
        if tuple(source.shape) != shape:
            raise ValueError(f"{ckpt.directory / source.file}: tensor {source.hf_key} holds {key} with shape "
                             f"{list(source.shape)} (runtime layout) but the model expects {list(shape)}")
    for key, param in params.items():
        if key not in expected:
            raise ValueError(f"model parameter {key} has no HF gpt-oss counterpart")
        if param.is_meta:
            raise ValueError(f"model parameter {key} is on the meta device: call model.to_empty() first")


def local_region(param: torch.Tensor) -> tuple[torch.Tensor, Region]:
    """(local tensor, its [start, stop) per dim in the global tensor) of a parameter.

    For a DTensor this is DCP's description of the shard (Shard / _StridedShard / Replicate,
    uneven FSDP2 shards included: the local tensor is the unpadded shard)."""
    if not isinstance(param, DTensor):
        return param, tuple((0, size) for size in param.shape)
    if any(p.is_partial() for p in param.placements):
        raise ValueError(f"cannot load into a Partial DTensor (placements {param.placements})")
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()
    if tuple(local.shape) != tuple(shape):
        raise RuntimeError(f"DTensor local shape {tuple(local.shape)} != computed shard shape {tuple(shape)}")
    return local, tuple((o, o + s) for o, s in zip(offset, shape))


# Not torch's HuggingFaceStorageReader / QuantizedHuggingFaceStorageReader (dcp.load of an
# HF-keyed state dict; tried for issue #24, benchmarks/bench_hf_parts.py, torch 2.11 = 2.13):
# dense loads are equal (bitwise; 1.06 s vs 1.05 s for 246 M parameters on CPU), but the
# quantized reader keeps the *_blocks chunk at its packed shape [E, R, G, 16] while the
# tensor's size becomes [E, R, 32G], so dcp.load fills only the first G of 32G columns and
# leaves the rest untouched, without an error. One path for dense and MXFP4 here, with
# HFCheckpoint's one-line header checks before any read, is the smaller and correct code.
def _load_parameter(ckpt: HFCheckpoint, source: Source, param: torch.Tensor) -> None:
    local, region = local_region(param)
    if local.ndim == 0:
        local.copy_(ckpt.read(source, ()))
        return
    if any(stop <= start for start, stop in region):
        return  # this rank holds an empty shard of an uneven split
    inner = math.prod(stop - start for start, stop in region[1:])
    step = max(1, _CHUNK_VALUES // max(inner, 1))
    first, last = region[0]
    for start in range(first, last, step):
        stop = min(start + step, last)
        piece = ckpt.read(source, ((start, stop),) + tuple(region[1:]))
        local[start - first: stop - first].copy_(piece)


def _reset_buffers(model: nn.Module) -> None:
    """HF has no expert bias (start balancing from zero); `to_empty` left RoPE and counters garbage."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.init_weights()
        elif isinstance(module, MoE):
            module.tokens_per_expert.zero_()
            if module.expert_bias is not None:
                module.expert_bias.zero_()


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = nn.Parameter(param.to(dtype), requires_grad=param.requires_grad)
