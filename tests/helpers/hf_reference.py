"""Helpers to build a HF transformers GptOssForCausalLM next to a runtime model (tests only)."""

from __future__ import annotations

import pytest
import torch

from runtime.hf.config import model_args_to_hf_config
from runtime.hf.keymap import RUNTIME_ONLY, hf_state_dict_to_runtime
from runtime.model import GptOssModel, ModelArgs

transformers = pytest.importorskip("transformers")


def build_hf_model(args: ModelArgs, seed: int = 0, bias_scale: float = 0.5):
    """A random fp32 HF model; biases, sinks and router made non-trivial so every path counts."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(**model_args_to_hf_config(args))
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # the plain per-expert loop, not a grouped kernel
    model = GptOssForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                p.copy_(torch.randn_like(p) * bias_scale)
            elif "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def runtime_from_hf(hf_model, args: ModelArgs) -> GptOssModel:
    model = GptOssModel(args)
    state = hf_state_dict_to_runtime(hf_model.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(RUNTIME_ONLY.match(k) for k in missing), missing
    model.rope.init_weights()
    return model.eval()
