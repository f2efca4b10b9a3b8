"""HF `config.json` (GptOssConfig) <-> `ModelArgs`."""

from __future__ import annotations

from typing import Any

from runtime.model.args import ModelArgs

_YARN_DEFAULTS = {"factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                  "original_max_position_embeddings": 4096, "truncate": False}


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 uses `rope_parameters`; 4.x checkpoints use `rope_scaling` + `rope_theta`.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "yarn"))
    if rope_type != "yarn":
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported (gpt-oss uses 'yarn')")
    rope.setdefault("rope_theta", cfg.get("rope_theta", 150000.0))
    return {**_YARN_DEFAULTS, **rope}


def hf_config_to_model_args(cfg: dict[str, Any], **overrides) -> ModelArgs:
    """ModelArgs from a parsed HF config.json; unsupported settings raise ValueError naming them."""
    if cfg.get("model_type", "gpt_oss") != "gpt_oss":
        raise ValueError(f"config.json: model_type is {cfg.get('model_type')!r}, expected 'gpt_oss'")
    if cfg.get("tie_word_embeddings", False):
        raise ValueError("config.json: tie_word_embeddings=true is not supported (gpt-oss is untied)")
    if not cfg.get("attention_bias", True):
        raise ValueError("config.json: attention_bias=false is not supported (gpt-oss uses biases)")
    rope = _rope_parameters(cfg)
    n_layers = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types")
    sliding_window = cfg.get("sliding_window") or 128
    args = dict(
        dim=cfg["hidden_size"], n_layers=n_layers, n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"], moe_inter_dim=cfg["intermediate_size"],
        num_experts=cfg.get("num_local_experts", cfg.get("num_experts")),
        top_k=cfg.get("num_experts_per_tok", 4), sliding_window=sliding_window,
        layer_types=tuple(layer_types) if layer_types else None,
        norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=float(rope["rope_theta"]),
        rope_factor=float(rope["factor"]), rope_beta_fast=float(rope["beta_fast"]),
        rope_beta_slow=float(rope["beta_slow"]),
        rope_original_seq_len=int(rope["original_max_position_embeddings"]),
        rope_truncate=bool(rope["truncate"]),
        max_seq_len=cfg.get("max_position_embeddings", 131072),
        swiglu_alpha=cfg.get("swiglu_alpha", 1.702), swiglu_limit=cfg.get("swiglu_limit", 7.0),
        init_std=cfg.get("initializer_range", 0.02),
    )
    args.update(overrides)
    return ModelArgs(**args)


def model_args_to_hf_config(args: ModelArgs) -> dict[str, Any]:
    """A config.json dict that transformers' GptOssConfig accepts."""
    layer_types = [
        "sliding_attention" if args.is_sliding(i) else "full_attention" for i in range(args.n_layers)
    ]
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "intermediate_size": args.moe_inter_dim,
        "num_local_experts": args.num_experts,
        "num_experts_per_tok": args.top_k,
        "sliding_window": args.sliding_window,
        "layer_types": layer_types,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {
            "rope_type": "yarn", "rope_theta": args.rope_theta, "factor": args.rope_factor,
            "beta_fast": args.rope_beta_fast, "beta_slow": args.rope_beta_slow,
            "original_max_position_embeddings": args.rope_original_seq_len,
            "truncate": args.rope_truncate,
        },
        "max_position_embeddings": args.max_seq_len,
        "swiglu_alpha": args.swiglu_alpha,
        "swiglu_limit": args.swiglu_limit,
        "attention_bias": True,
        "tie_word_embeddings": False,
        "initializer_range": args.init_std,
        "hidden_act": "silu",
    }
