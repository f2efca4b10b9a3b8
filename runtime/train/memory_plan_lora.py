"""The LoRA terms of the memory plan (runtime/train/memory_plan.py): which parameters a rank
trains, and what its parameters cost between steps (weights, gradients, optimizer state),
for full fine-tuning and for LoRA.

Full fine-tuning: every parameter is an fp32 master with an fp32 gradient and AdamW's
exp_avg + exp_avg_sq (2 x fp32): 16 bytes per parameter.

LoRA (runtime/model/lora.py): the frozen base is stored in the compute dtype (bf16 on GPU)
with no gradient and no optimizer state; the adapters (and `lora.trainable_extra`) are fp32
masters with fp32 gradients and AdamW state, 16 bytes per trainable parameter. Under FSDP the
gathered weights are the same for both (param dtype), but only trainable parameters have
unsharded gradients to reduce-scatter. The adapters' own activations (rank-r bottleneck
outputs, ~2 r values per adapted projection and token) are below 1% of a layer's and are not
modelled.

runtime/train/memory_plan.py calls `adapt` on the meta model before the parallel passes (as the trainer does) and
`state_lines` per rank; the rest of its arithmetic does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

__all__ = ["adapt", "state_lines", "trainable_names"]


def adapt(model, cfg, compute_dtype_name: str) -> None:
    """apply_lora on the meta model, as Trainer._build_model does before parallelize (no-op
    without `[lora] enable`)."""
    spec = cfg.lora_spec()
    if spec is None:
        return
    import torch

    from runtime.model.lora import apply_lora

    apply_lora(model, spec, getattr(torch, compute_dtype_name))


def trainable_names(model) -> frozenset[str]:
    return frozenset(n for n, p in model.named_parameters() if p.requires_grad)


def state_lines(names: Iterable[str], local_numel: Mapping[str, int],
                is_trainable: Callable[[str], bool], frozen_dtype_name: str,
                frozen_bytes: int, optimizer: str) -> list[tuple[str, float, str]]:
    """(label, bytes, note) for params, grads and optimizer of the parameters `names` (this
    rank's share, `local_numel` elements each)."""
    names = list(names)
    trained = sum(local_numel[n] for n in names if is_trainable(n))
    frozen = sum(local_numel[n] for n in names) - trained
    if frozen == 0:
        return [("params", 4 * trained, "fp32 master weights"),
                ("grads", 4 * trained, "fp32"),
                ("optimizer", 8 * trained, f"{optimizer} exp_avg + exp_avg_sq, fp32")]
    return [
        ("params", frozen_bytes * frozen + 4 * trained,
         f"frozen base {_count(frozen)} in {frozen_dtype_name} + trainable {_count(trained)} "
         "fp32 masters"),
        ("grads", 4 * trained, f"fp32, trainable {_count(trained)} only"),
        ("optimizer", 8 * trained,
         f"{optimizer} exp_avg + exp_avg_sq, fp32, trainable only"),
    ]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
