"""Export a runtime model as an HF gpt-oss checkpoint that transformers (and vLLM) load.

Writes `model-0000i-of-0000N.safetensors` shards (experts unquantized in HF's transposed
layout), `model.safetensors.index.json` and `config.json`; shards first, index and config
last, so a directory with an index is complete.

Works from a parallelized model: DTensor parameters are gathered one at a time with
`full_tensor()` (a collective, so every rank must call `save_hf`), and rank 0 writes, holding
at most one shard in memory. Pipeline stages hold only part of the model: save a DCP
checkpoint and convert it with `python -m runtime.hf.convert dcp-to-hf` instead.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from runtime.atomic_dir import honour_umask
from runtime.hf.adapter import lora_keys
from runtime.model.lora import fold
from runtime.hf.config import model_args_to_hf_config
from runtime.hf.keymap import (
    RUNTIME_ONLY,
    canonical_runtime_key,
    is_transposed,
    runtime_to_hf_key,
    runtime_to_hf_tensor,
)
from runtime.hf.load import expected_parameter_shapes
from runtime.hf.mxfp4 import BLOCK, BYTES_PER_BLOCK, quantize_mxfp4
from runtime.hf.progress import Progress, _is_rank0
from runtime.hf.reader import CONFIG_NAME, INDEX_NAME
from runtime.model import ModelArgs

# Fetches the full tensors of the given runtime keys, in order (lazily: one at a time is fine).
Fetch = Callable[[list[str]], Iterable[tuple[str, torch.Tensor]]]

EXPERT_FORMATS = ("dense", "mxfp4")

# What the openai/gpt-oss releases leave unquantized (transformers reads this list).
_MXFP4_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """'5GB' -> 5 * 10**9 (HF convention: GB decimal, GiB binary); ints are bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (expected e.g. '5GB', '500MB', 10**9)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def save_hf(model: nn.Module, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = torch.bfloat16,
            max_shard_size: int | str = "5GB", experts_format: str = "dense", progress: bool = True,
            lora_scaling: float | None = None) -> None:
    """Write `model` (any parallelization except pipeline stages) as an HF checkpoint in `out_dir`.

    `dtype=None` keeps the parameter dtype. `experts_format="mxfp4"` quantizes the expert
    weights to `*_blocks`/`*_scales` like the openai/gpt-oss releases (lossy; needs expert
    hidden and model dims divisible by 32); everything else is written in `dtype`. The runtime-only `expert_bias` is dropped: HF's
    router has no selection-only bias, so a model trained with a non-zero bias routes slightly
    differently in transformers (a warning says so).

    A model with LoRA adapters (runtime/hf/adapter.py names) is written merged: each adapted
    weight as W + lora_scaling * B @ A, folded in float32 on the writing rank."""
    args: ModelArgs = model.args
    params = {canonical_runtime_key(name): p for name, p in model.named_parameters()}
    shapes = exported_shapes(args)
    missing = [key for key in shapes if key not in params]
    if missing:
        raise ValueError(f"save_hf: the model has no parameter {missing[0]} (a pipeline stage?); "
                         "save a DCP checkpoint and run `python -m runtime.hf.convert dcp-to-hf`")
    _warn_nonzero_expert_bias(model)

    adapted = {key for key in shapes if lora_keys(key)[0] in params}
    if adapted and lora_scaling is None:
        raise ValueError(f"save_hf: the model has LoRA adapters ({lora_keys(min(adapted))[0]}, ...): "
                         "pass lora_scaling to merge them")
    writer = _is_rank0()

    def fetch(keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            full = _full(params[key])
            if key in adapted:  # every rank gathers (collectives), the writer folds
                a, b = (_full(params[k]) for k in lora_keys(key))
                if writer:
                    full = fold(full.detach().cpu(), a.detach().cpu(), b.detach().cpu(),
                                lora_scaling)
            yield key, full

    write_hf_checkpoint(shapes, fetch, args, out_dir, dtype=dtype or next(iter(params.values())).dtype,
                        max_shard_size=max_shard_size, experts_format=experts_format, progress=progress)


def exported_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    return {k: s for k, s in expected_parameter_shapes(args).items() if not RUNTIME_ONLY.match(k)}


# Not torch's HuggingFaceStorageWriter (dcp.save of HF-keyed full tensors with our shard plan
# as fqn_to_index_mapping; tried for issue #24, benchmarks/bench_hf_parts.py): same tensors,
# but its files are not ours byte for byte (DCP_SHARDING_INFO/DCP_VERSION in every header),
# one index needs one dcp.save of the whole state dict, so the writer holds a dtype copy of
# the entire model (+545 MiB vs +130 MiB peak RSS, 2.31 s vs 2.03 s for 246 M parameters),
# it has no MXFP4 or LoRA-merge export, and its sharded mode (every rank writes its DTensor
# shards, rank 0 consolidates) needs twice the disk and a second pass over every byte.
def write_hf_checkpoint(shapes: dict[str, tuple[int, ...]], fetch: Fetch, args: ModelArgs,
                        out_dir: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                        max_shard_size: int | str = "5GB", experts_format: str = "dense",
                        progress: bool = True, collective: bool = True) -> None:
    """Shard plan from the shapes alone, then fetch and write one shard at a time.
    `fetch` runs on every rank (it may be collective); only rank 0 writes.
    collective=False: one process writes alone (a conversion), even inside a process group:
    no rank test, no barrier."""
    mxfp4 = _check_experts_format(experts_format, shapes)
    writer = _is_rank0() if collective else True
    out = Path(out_dir)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {key: _stored_bytes(key, shape, itemsize, mxfp4) for key, shape in shapes.items()}
    plan = _plan_shards(list(shapes), sizes, parse_size(max_shard_size))
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    with Progress(len(shapes), f"saving {out.name or out}", enabled=progress) as bar:
        for name, keys in zip(names, plan):
            tensors = _collect_shard(fetch(keys), shapes, dtype, mxfp4, writer, bar)
            if writer:
                save_file(tensors, str(out / name), metadata={"format": "pt"})
                honour_umask(out / name)  # safetensors writes 0600: readable by a team too
                weight_map.update(dict.fromkeys(tensors, name))
    if writer:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = {**model_args_to_hf_config(args), "dtype": str(dtype).removeprefix("torch.")}
        if mxfp4:
            config["quantization_config"] = {"quant_method": "mxfp4",
                                             "modules_to_not_convert": _MXFP4_NOT_CONVERTED}
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    if collective:
        _barrier()


def _collect_shard(fetched: Iterable[tuple[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]],
                   dtype: torch.dtype, mxfp4: bool, writer: bool, bar: Progress) -> dict[str, torch.Tensor]:
    """HF name -> tensor for one shard (empty on non-writing ranks, which still fetch: the
    gathers are collective)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, full in fetched:
        if tuple(full.shape) != tuple(shapes[key]):  # checked on every rank: all raise together
            raise ValueError(f"save_hf: {key} has shape {list(full.shape)}, expected {list(shapes[key])}")
        if writer:
            tensors.update(_to_hf(key, full.detach(), dtype, mxfp4))
        bar.update(1, key)
    return tensors


def _check_experts_format(experts_format: str, shapes: dict[str, tuple[int, ...]]) -> bool:
    if experts_format not in EXPERT_FORMATS:
        raise ValueError(f"experts_format must be one of {EXPERT_FORMATS}, got {experts_format!r}")
    if experts_format == "dense":
        return False
    for key, shape in shapes.items():
        if is_transposed(key) and shape[-1] % BLOCK:
            raise ValueError(f"experts_format='mxfp4': {key} has {shape[-1]} input columns, "
                             f"not a multiple of {BLOCK}")
    return True


def _stored_bytes(key: str, shape: tuple[int, ...], itemsize: int, mxfp4: bool) -> int:
    if mxfp4 and is_transposed(key):  # half a byte per value + one scale byte per block
        blocks = _numel(shape) // BLOCK
        return blocks * (BYTES_PER_BLOCK + 1)
    return itemsize * _numel(shape)


def _to_hf(key: str, full: torch.Tensor, dtype: torch.dtype, mxfp4: bool) -> list[tuple[str, torch.Tensor]]:
    """(HF name, contiguous CPU tensor) pairs for one runtime tensor."""
    hf_key = runtime_to_hf_key(key)
    if mxfp4 and is_transposed(key):
        # Our [E, out, in] is exactly the layout the blocks are stored in (no transpose).
        blocks, scales = quantize_mxfp4(full.to("cpu", torch.float32))
        return [(f"{hf_key}_blocks", blocks), (f"{hf_key}_scales", scales)]
    return [(hf_key, runtime_to_hf_tensor(key, full.to("cpu", dtype)).contiguous())]


def _plan_shards(keys: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Greedy in model order: a shard closes before it would exceed `limit` (a tensor larger
    than the limit gets a shard of its own, as in transformers)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key in keys:
        if shards[-1] and used + sizes[key] > limit:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += sizes[key]
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _warn_nonzero_expert_bias(model: nn.Module) -> None:
    # Every rank gathers every bias (full_tensor may be collective), then rank 0 warns once.
    nonzero = [name for name, buffer in model.named_buffers()
               if RUNTIME_ONLY.match(canonical_runtime_key(name)) and _full(buffer).abs().max().item() > 0]
    if nonzero and _is_rank0():
        warnings.warn(f"save_hf: {nonzero[0]} (and {len(nonzero) - 1} more) is non-zero; HF gpt-oss has "
                      "no expert bias, so transformers will route some tokens differently", stacklevel=3)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
