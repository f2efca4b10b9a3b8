"""AdamW with per-group weight decay, and the warmup + decay learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

# Which parameters skip weight decay, by the names accepted in `optimizer.no_decay`.
_NO_DECAY_RULES = {
    "norms": lambda name, p: name.endswith("norm.weight"),
    "biases": lambda name, p: name.endswith("bias"),  # linear + expert biases
    "sinks": lambda name, p: name.endswith("attention.sinks"),
    "embeddings": lambda name, p: name.startswith("tok_embeddings."),
}


def param_groups(model: nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict]:
    rules = [_NO_DECAY_RULES[k] for k in no_decay]
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if any(rule(name, p) for rule in rules) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """cfg: the `[optimizer]` section. fused on CUDA, foreach on CPU unless told otherwise."""
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, list(cfg.no_decay)),
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs,
    )


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_type: str,
              decay_ratio: float, min_lr_factor: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (1-based: the first step is 1).

    warmup: linear from 1/(warmup+1) up to 1 over `warmup_steps` steps; then
    linear / cosine: from 1 down to `min_lr_factor` at the last step;
    wsd: constant 1, then a linear decay over the last `decay_ratio` of the steps;
    constant: 1.
    """
    if step <= warmup_steps:
        return step / (warmup_steps + 1)
    if decay_type == "constant":
        return 1.0
    if decay_type == "wsd":
        decay_steps = max(1, round(total_steps * decay_ratio))
        decay_start = total_steps - decay_steps
        if step <= decay_start:
            return 1.0
        progress = (step - decay_start) / decay_steps
    else:
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if decay_type == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:  # linear and wsd
        shape = 1 - progress
    return min_lr_factor + (1 - min_lr_factor) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int):
    """cfg: the `[lr_scheduler]` section. LambdaLR's step count starts at 0 = before step 1."""
    def factor(completed: int) -> float:
        return lr_factor(completed + 1, total_steps, cfg.warmup_steps, cfg.decay_type,
                         cfg.decay_ratio, cfg.min_lr_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
