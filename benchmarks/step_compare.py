"""Comparing a training step with its reference: the gradients as one vector and the relative
errors of losses, grad norm and gradients against their tolerances (shared by the
single-process and the torchrun checks of gpu_check's correctness part)."""

from __future__ import annotations

import torch

from benchmarks.common import rel_error

TRAIN_TOL = {"loss": 1e-2, "grad_norm": 5e-2, "grads": 5e-2}  # bf16 autocast vs fp32, relative


def flat_grads(model) -> torch.Tensor:
    """Every parameter's gradient (one rank holds all of it) as one fp64 CPU vector, by name."""
    parts = []
    for _, p in sorted(model.named_parameters()):
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        parts.append(g.detach().double().cpu().flatten())
    return torch.cat(parts)


def step_errors(got: dict, ref: dict) -> tuple[dict, dict]:
    """Relative errors of the losses, the first grad norm and the first step's (clipped)
    gradients -- the last is the sensitive one: the loss of a fresh model is ~ln(vocab)."""
    errors = {"loss_step1": abs(got["losses"][0] - ref["losses"][0]) / abs(ref["losses"][0]),
              "grad_norm_step1": abs(got["grad_norms"][0] - ref["grad_norms"][0]) / abs(ref["grad_norms"][0]),
              "grads_step1": rel_error(got["grads"], ref["grads"]),
              "loss_step2": abs(got["losses"][1] - ref["losses"][1]) / abs(ref["losses"][1])}
    tols = {"loss_step1": TRAIN_TOL["loss"], "grad_norm_step1": TRAIN_TOL["grad_norm"],
            "grads_step1": TRAIN_TOL["grads"], "loss_step2": TRAIN_TOL["loss"]}
    got.pop("grads"), ref.pop("grads")
    return errors, tols
