"""LoRA adapters out: PEFT adapter folders, and the adapters folded into the base weights.

Runtime names (the model's LoRA layout): a dense target keeps its Linear and gains
`<module>.lora_A` [r, in] / `<module>.lora_B` [out, r]; an expert stack gains
`layers.{i}.moe.experts.mlp1_lora_A` [E, r, D] / `mlp1_lora_B` [E, 2F, r] and
`mlp2_lora_A` [E, r, F] / `mlp2_lora_B` [E, D, r]. The update of a weight W (our [out, in]
orientation, per expert for the stacks) is `W + scaling * B @ A`.

PEFT's files for the same adapter (peft >= 0.17, checked against peft 0.21.2 in the tests):
  * dense targets are `target_modules` (`q_proj`, ...): `lora_A.weight` [r, in] and
    `lora_B.weight` [out, r], exactly ours;
  * expert stacks are `target_parameters` (`mlp.experts.gate_up_proj` / `down_proj`), one
    `ParamWrapper` each. transformers stores them [E, in, out] (`is_transposed`), and
    ParamWrapper keeps all experts in one pair of Linears: `lora_A.weight` [E * r, in] with
    row e * r + k (expert-major) and `lora_B.weight` [out, r * E] with column k * E + e
    (rank-major): `get_delta_weight` reshapes A to (E, r, in) and B to (out, r, E). The in and
    out features are the same as ours (gate/linear rows interleaved in both), so the mapping
    is a reshape of A and a permute of B;
  * two parameters of one module nest: the first one wrapped (in the module's parameter
    order: gate_up_proj before down_proj) ends up inside, its keys gain `.base_layer`.
Keys carry PEFT's `base_model.model.` prefix and no adapter name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from runtime.hf.keymap import runtime_to_hf_key
from runtime.model.lora_spec import is_lora_name

ADAPTER_DIR = "adapter"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# `<module>.lora_A` of a Linear / `<stack>.mlp1_lora_A` of a parameter target.
_LORA_KEY = re.compile(r"^(?P<owner>.+?)\.(?:(?P<param>\w+?)_)?lora_(?P<which>[AB])$")
# HF parameters of one module in declaration order: PEFT wraps them in this order (nesting).
_PARAM_ORDER = ("gate_up_proj", "down_proj")


def base_key(lora_key: str) -> str:
    """`layers.0.attention.wq.lora_A` -> `layers.0.attention.wq.weight`;
    `layers.0.moe.experts.mlp1_lora_B` -> `layers.0.moe.experts.mlp1_weight`."""
    m = _LORA_KEY.match(lora_key)
    if not m:
        raise KeyError(f"{lora_key!r} is not a LoRA parameter name")
    owner, param = m.group("owner"), m.group("param")
    return f"{owner}.{param}_weight" if param else f"{owner}.weight"


def lora_keys(base: str) -> tuple[str, str]:
    """(A key, B key) that update the runtime weight `base` (the inverse of `base_key`)."""
    if base.endswith("_weight"):
        stem = base[: -len("_weight")]
        return f"{stem}_lora_A", f"{stem}_lora_B"
    stem = base.removesuffix(".weight")
    return f"{stem}.lora_A", f"{stem}.lora_B"


# ---------------------------------------------------------------------------- PEFT layout
def _hf_target(base: str) -> tuple[str, str | None]:
    """(HF module name, HF parameter name or None for a module target) of a runtime weight."""
    hf = runtime_to_hf_key(base)
    module, _, param = hf.rpartition(".")
    return (module, None) if param == "weight" else (module, param)


def peft_state_dict(adapters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Runtime LoRA tensors (full, unsharded) -> PEFT's adapter_model.safetensors keys/layouts.
    Other keys (whole modules trained in full: lora.trainable_extra) are PEFT
    `modules_to_save`, stored under their HF names."""
    by_module: dict[str, set[str]] = {}  # HF module -> its targeted parameters (nesting)
    extras = {key for key in adapters if not is_lora_name(key)}
    out: dict[str, torch.Tensor] = {}
    for key in sorted(extras):
        out[PEFT_PREFIX + runtime_to_hf_key(key)] = adapters[key]
    for key in (k for k in adapters if k not in extras):
        module, param = _hf_target(base_key(key))
        if param is not None:
            by_module.setdefault(module, set()).add(param)
    for key, tensor in adapters.items():
        if key in extras:
            continue
        which = _LORA_KEY.match(key).group("which")
        module, param = _hf_target(base_key(key))
        if param is None:  # a Linear: same layout as ours
            out[f"{PEFT_PREFIX}{module}.lora_{which}.weight"] = tensor
            continue
        wrapped = [p for p in _PARAM_ORDER if p in by_module[module]]
        if param not in wrapped:
            raise KeyError(f"{key}: PEFT export of LoRA on {module}.{param} is not supported")
        nest = ".base_layer" * (len(wrapped) - 1 - wrapped.index(param))
        out[f"{PEFT_PREFIX}{module}{nest}.lora_{which}.weight"] = _to_param_wrapper(which, tensor)
    return out


def _to_param_wrapper(which: str, tensor: torch.Tensor) -> torch.Tensor:
    if which == "A":  # ours [E, r, in] -> [E * r, in], row e * r + k
        num_experts, rank, fan_in = tensor.shape
        return tensor.reshape(num_experts * rank, fan_in)
    num_experts, fan_out, rank = tensor.shape  # ours [E, out, r] -> [out, r * E], col k * E + e
    return tensor.permute(1, 2, 0).reshape(fan_out, rank * num_experts)


def peft_targets(adapter_keys: Iterable[str], n_layers: int) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) naming exactly the adapted weights: the short names
    (`q_proj`, `mlp.experts.gate_up_proj`) when every layer has them, else full names (PEFT
    matches a target by name suffix; its layers_to_transform does not apply to parameters)."""
    found: tuple[dict, dict] = ({}, {})  # short name -> {layer: full name}, modules / params
    for key in adapter_keys:
        if not is_lora_name(key):
            continue
        module, param = _hf_target(base_key(key))
        layer = int(module.split(".")[2])  # model.layers.{i}. ...
        full = module if param is None else f"{module}.{param}"
        short = module.split(".")[-1] if param is None else ".".join(full.split(".")[3:])
        found[param is not None].setdefault(short, {})[layer] = full

    def names(targets: dict[str, dict[int, str]]) -> list[str]:
        out = []
        for short, layers in sorted(targets.items()):
            out += [short] if set(layers) == set(range(n_layers)) else \
                [layers[i] for i in sorted(layers)]
        return out

    return names(found[0]), names(found[1])


def modules_to_save(keys: Iterable[str]) -> list[str]:
    """PEFT `modules_to_save` (module names, matched by suffix) of the whole-module tensors
    among `keys`. Only modules can be: a bare parameter such as the attention sinks cannot."""
    names = set()
    for key in keys:
        if is_lora_name(key):
            continue
        module, _, param = runtime_to_hf_key(key).rpartition(".")
        if param not in ("weight", "bias"):
            raise ValueError(f"{key} ({module}.{param}) is a parameter of a module PEFT would "
                             "have to save whole; a PEFT adapter cannot hold it (export "
                             "'merged' holds every trained weight)")
        names.add(module.split(".")[-1])
    return sorted(names)


def adapter_config(adapter_keys: Iterable[str], n_layers: int, *, rank: int, alpha: float,
                   use_rslora: bool = False, dropout: float = 0.0,
                   base_model: str | None = None) -> dict:
    """adapter_config.json: what `LoraConfig` needs to rebuild the same adapter on the base."""
    adapter_keys = list(adapter_keys)
    target_modules, target_parameters = peft_targets(adapter_keys, n_layers)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        # PEFT refuses dropout on parameter targets (it cannot be factored out of the expert
        # matmul); at inference it does nothing anyway.
        "lora_dropout": 0.0 if target_parameters else dropout,
        "target_modules": target_modules or None,
        "target_parameters": target_parameters or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": modules_to_save(adapter_keys) or None,
        "use_dora": False,
    }


def write_adapter(out_dir: str | os.PathLike, adapters: Mapping[str, torch.Tensor], n_layers: int,
                  *, rank: int, alpha: float, use_rslora: bool = False, dropout: float = 0.0,
                  base_model: str | None = None, dtype: torch.dtype | None = None,
                  extra_files: Iterable[Path] = ()) -> Path:
    """Write a PEFT adapter folder at `out_dir`, atomically: everything goes into a temp
    sibling that replaces `out_dir` only once complete (a kill leaves the old folder or none,
    never half of one). `extra_files` (tokenizer files) are copied in as well."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {k: t.detach().to("cpu", dtype or t.dtype).contiguous()
               for k, t in peft_state_dict(adapters).items()}
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    config = adapter_config(adapters, n_layers, rank=rank, alpha=alpha, use_rslora=use_rslora,
                            dropout=dropout, base_model=base_model)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    for path in extra_files:
        shutil.copyfile(path, tmp / Path(path).name)
    _sync_dir(tmp)
    if out.exists():  # the previous export of this dump folder (a rerun): replaced whole
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    return out


def _sync_dir(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
