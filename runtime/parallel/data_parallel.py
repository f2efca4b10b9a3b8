"""FSDP2 / HSDP / DDP, all through `fully_shard` on the data-parallel mesh.

- FSDP: 1-D mesh (dp_shard): parameters, gradients and optimizer state sharded.
- HSDP: 2-D mesh (dp_replicate, dp_shard): sharded within a group, replicated across.
- DDP:  dp_shard == 1: the same 2-D mesh whose shard dim has size 1, i.e. parameters
  replicated and gradients all-reduced (what torch's FSDP2-based `replicate` does too),
  so one code path gives the same mixed precision, gradient-accumulation and state-dict
  behaviour for every data-parallel flavour.
Each transformer block is its own FSDP unit (one all-gather per block), the root holds
the embeddings, final norm and head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from runtime.model.model import resolve_compute_dtype

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def mixed_precision_policy(training_cfg, model_compute_dtype: str, device: torch.device):
    # An fp32 model (CPU default, parity tests) must not be silently run in bf16 by FSDP.
    compute = resolve_compute_dtype(model_compute_dtype, device)
    param_dtype = torch.float32 if compute == torch.float32 else _DTYPES[training_cfg.mixed_precision_param]
    return MixedPrecisionPolicy(param_dtype=param_dtype,
                                reduce_dtype=_DTYPES[training_cfg.mixed_precision_reduce])


def reshard_after_forward(policy: str, pp_enabled: bool) -> bool:
    if policy == "always":
        return True
    if policy == "never":
        return False
    # default: free the gathered weights after forward, except under PP where the
    # backward of the same microbatch comes soon and re-gathering per microbatch is costly
    return not pp_enabled


def apply_fsdp(model: nn.Module, dp_mesh, mp_policy, reshard: bool, *,
               experts_mesh=None) -> nn.Module:
    """`experts_mesh`: with expert parallelism, experts are their own FSDP unit over the
    data-parallel ranks left after EP (their DTensors already live on the ep mesh)."""
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's weights are needed again right away by backward: keep them.
        keep = reshard and i < len(blocks) - 1
        if experts_mesh is not None:
            fully_shard(block.moe.experts, mesh=experts_mesh, mp_policy=mp_policy,
                        reshard_after_forward=keep)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=keep)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    return model
