"""Parameter names and layouts: HF transformers `GptOssForCausalLM` <-> runtime.

HF stores the experts transposed relative to us: `gate_up_proj` [E, D, 2F] (gate/linear
columns interleaved, which we keep) vs our `mlp1_weight` [E, 2F, D], and `down_proj`
[E, F, D] vs our `mlp2_weight` [E, D, F]. Everything else is a rename.
The runtime-only `expert_bias` buffer (load balancing) has no HF counterpart.
"""

from __future__ import annotations

import re

import torch

# (HF regex, runtime template); {i} is the layer index.
_RENAMES: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{i}.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{i}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "layers.{i}.attention.wq.{p}"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "layers.{i}.attention.wk.{p}"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "layers.{i}.attention.wv.{p}"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", "layers.{i}.attention.wo.{p}"),
    (r"model\.layers\.(\d+)\.self_attn\.sinks", "layers.{i}.attention.sinks"),
    (r"model\.layers\.(\d+)\.mlp\.router\.(weight|bias)", "layers.{i}.moe.router.gate.{p}"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj", "layers.{i}.moe.experts.mlp1_weight"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj_bias", "layers.{i}.moe.experts.mlp1_bias"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.down_proj", "layers.{i}.moe.experts.mlp2_weight"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.down_proj_bias", "layers.{i}.moe.experts.mlp2_bias"),
]
_COMPILED = [(re.compile(f"^{pattern}$"), template) for pattern, template in _RENAMES]

# Runtime names whose tensors are stored transposed (last two dims) in HF.
_TRANSPOSED = re.compile(r"^layers\.\d+\.moe\.experts\.mlp[12]_weight$")

RUNTIME_ONLY = re.compile(r"^layers\.\d+\.moe\.expert_bias$")


def hf_to_runtime_key(hf_key: str) -> str:
    """Runtime name of an HF parameter; KeyError naming the key if it is not gpt-oss."""
    for pattern, template in _COMPILED:
        match = pattern.match(hf_key)
        if match:
            groups = match.groups()
            return template.format(i=groups[0] if groups else "", p=groups[1] if len(groups) > 1 else "")
    raise KeyError(f"unknown HF gpt-oss tensor name {hf_key!r}")


def runtime_to_hf_key(key: str) -> str:
    for pattern, template in _RENAMES:
        regex = "^" + re.escape(template).replace(r"\{i\}", r"(\d+)").replace(r"\{p\}", r"(weight|bias)") + "$"
        match = re.match(regex, key)
        if match:
            hf = pattern
            for group in match.groups():
                hf = re.sub(r"\([^()]*\)", group, hf, count=1)
            return hf.replace("\\.", ".")
    raise KeyError(f"runtime tensor {key!r} has no HF gpt-oss counterpart")


def hf_to_runtime_tensor(runtime_key: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.transpose(-2, -1) if _TRANSPOSED.match(runtime_key) else tensor


def runtime_to_hf_tensor(runtime_key: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.transpose(-2, -1) if _TRANSPOSED.match(runtime_key) else tensor


def hf_state_dict_to_runtime(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for hf_key, tensor in hf_sd.items():
        key = hf_to_runtime_key(hf_key)
        out[key] = hf_to_runtime_tensor(key, tensor)
    return out


def runtime_state_dict_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in sd.items():
        if RUNTIME_ONLY.match(key):
            continue
        out[runtime_to_hf_key(key)] = runtime_to_hf_tensor(key, tensor)
    return out


# ---------------------------------------------------------------------------- checkpoint I/O helpers
# MXFP4 checkpoints (openai/gpt-oss-*) store each expert weight as a `<name>_blocks` /
# `<name>_scales` pair instead of `<name>` (see runtime/hf/mxfp4.py).
MXFP4_PARTS = ("blocks", "scales")

# Module wrappers that insert a path component into parameter names (torch.compile,
# activation checkpointing, FSDP1); HF names never contain them.
_WRAPPER_COMPONENT = re.compile(r"(?:^|(?<=\.))(?:_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


def canonical_runtime_key(name: str) -> str:
    """`layers.0._checkpoint_wrapped_module.attention.wq.weight` -> `layers.0.attention.wq.weight`."""
    return _WRAPPER_COMPONENT.sub("", name)


def parse_hf_key(hf_key: str) -> tuple[str, str]:
    """(runtime key, part) of an HF tensor name; part is "tensor", or "blocks"/"scales" for the
    two halves of an MXFP4 expert weight. KeyError naming the key if it is not gpt-oss."""
    for part in MXFP4_PARTS:
        suffix = f"_{part}"
        if hf_key.endswith(suffix):
            try:
                key = hf_to_runtime_key(hf_key[: -len(suffix)])
            except KeyError:
                break
            if _TRANSPOSED.match(key):
                return key, part
            break
    return hf_to_runtime_key(hf_key), "tensor"


def is_transposed(runtime_key: str) -> bool:
    """True for the expert weights, stored [E, in, out] by HF and [E, out, in] by us."""
    return bool(_TRANSPOSED.match(runtime_key))
