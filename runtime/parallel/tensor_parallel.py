"""Tensor parallelism with sequence parallel and loss parallel (`parallelize_module` plans).

Layout of the residual stream between blocks: sequence-sharded, `[B, S/tp, D]` local tensors.

    tok_embeddings  RowwiseParallel: vocab-sharded table, full tokens in, Shard(1) out
    attention_norm  SequenceParallel (weight Replicate, works on the local sequence shard)
    attention       all-gather the sequence (Shard(1) -> Replicate) before wq/wk/wv
      wq, wk, wv    ColwiseParallel: each rank owns heads [r*H/tp, (r+1)*H/tp) (biases follow)
      sinks         DTensor Shard(0): the same heads (the model takes `to_local()`)
      wo            RowwiseParallel: Partial -> reduce-scatter back to Shard(1)
      (LoRA)        the adapters of LoRALinear projections: lora_parallel.py
    ffn_norm        SequenceParallel
    moe             moe_parallel.py (router replicated, experts per MoE mode, tokens gathered
                    or kept local)
    norm            SequenceParallel
    output          ColwiseParallel: vocab-sharded logits (DTensor Shard(-1), consumed by
                    cross entropy under `loss_parallel()`), or gathered to a full local
                    tensor with parallelism.disable_loss_parallel=true

RoPE cos/sin and the attention masks are computed by `GptOssModel.forward` from the full
positions (every TP rank holds the whole sequence of its samples), and attention runs on the
gathered sequence, so they need no change.

The attention sinks are read by the model directly: they stay a registered DTensor parameter
(Shard(0) by head) and a `dtensor_utils.swap_parameters` hook hands the forward the local
heads' tensor.

Per-block torch.compile (compile.py) traces the block with its TP hooks inside; the only
DTensor/async value that crosses into a compiled block from eager code is the embedding
output, which `_wait_async_output` turns from an AsyncCollectiveTensor into a plain tensor
(see there: compiled regions drop the gradient of ACT inputs).

Async TP (`parallelism.enable_async_tensor_parallel`): inductor's micro-pipelined TP over
CUDA symmetric memory, the one TP switch outside the plans (here because it is a property of
the TP collectives on the tp mesh and nothing else). `check_async_tp` refuses it without CUDA
or without compile before any weight is allocated; `enable_async_tp` switches it on after TP
is applied (with tensor_parallel_degree 1 there is nothing to pipeline and it does nothing).
"""

from __future__ import annotations

import warnings

import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import RowwiseParallel, SequenceParallel, parallelize_module

from runtime.errors import ConfigError
from runtime.model.quantize import tensor_parallel_styles
from runtime.parallel.dtensor_utils import distributed_parameter, swap_parameters, to_local
from runtime.parallel.lora_parallel import lora_styles

try:  # CUDA symmetric memory; its group switch is needed on torch 2.11, a no-op from 2.13
    import torch.distributed._symmetric_memory as symmetric_memory
except ImportError:
    symmetric_memory = None

__all__ = ["apply_tp", "check_async_tp", "enable_async_tp"]


def apply_tp(model: nn.Module, tp_mesh, loss_parallel: bool) -> nn.Module:
    """Shard the dense part of `model` (a GptOssModel, usually still on the meta device) over
    the 1-D `tp_mesh`; the MoE layers are moe_parallel.py's."""
    # Frozen parameters (LoRA's base) stay frozen: SequenceParallel re-registers the norm
    # weights as new Parameters with requires_grad=True (torch 2.13; a frozen bf16 norm would
    # then also break FSDP2's uniform-dtype rule for trainable parameters).
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        head_colwise, _, _ = tensor_parallel_styles(model.output)  # float8 styles if Float8Linear
        plan["output"] = head_colwise(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    if model.tok_embeddings is not None:
        # After RowwiseParallel's output hook (hooks run in registration order).
        model.tok_embeddings.register_forward_hook(_wait_async_output)

    for block in model.layers.values():
        a = block.attention
        # torchao's float8 styles (float8 all-gather) for tensorwise Float8Linear, else torch's
        colwise, rowwise, prepare_input = tensor_parallel_styles(a.wq, a.wk, a.wv, a.wo)
        # LoRA adapters (LoRALinear) get their own placements: lora_parallel.py
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            # forward(x, rope, mask, backend): gather x's sequence, leave the rest alone
            "attention": prepare_input(
                input_layouts=(Shard(1), None, None, None),
                desired_input_layouts=(Replicate(), None, None, None)),
            **{f"attention.{n}": lora_styles(getattr(a, n), colwise, rowwise)[0]()
               for n in ("wq", "wk", "wv")},
            "attention.wo": lora_styles(a.wo, colwise, rowwise)[1](output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
        })
        attention = block.attention
        attention.sinks = distributed_parameter(attention.sinks, tp_mesh, [Shard(0)])
        # The attention reads its local heads' sinks (eager: the model's own to_local; handing
        # it the local tensor also keeps torch.compile's tracing of the block on plain tensors).
        swap_parameters(attention, attention, {"sinks": to_local})
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    return model


class _WaitAsyncCollective(torch.autograd.Function):
    """AsyncCollectiveTensor -> a plain tensor with the finished collective's result;
    identity gradient (the autograd edge to the collective's producer is kept)."""

    @staticmethod
    def forward(ctx, act):
        out = act.trigger_wait()
        return out.view_as(out)  # a fresh tensor: autograd metadata goes on it, not on act.elem

    @staticmethod
    def backward(ctx, grad):
        return grad


def _wait_async_output(module, args, out):
    """Forward hook on tok_embeddings. RowwiseParallel reduce-scatters the embedding output
    with async_op=True and hands on `to_local()` of it: an AsyncCollectiveTensor (ACT), which
    becomes the input of the first transformer block. Under per-block torch.compile that is
    a compiled-graph input, and AOTAutograd (torch >= 2.12, pytorch#179849) replaces ACT
    inputs by their waited inner tensor, which has no autograd history: the gradient into
    the embeddings is dropped (None), and DTensor's Redistribute backward then receives a
    zero-filled plain tensor ("'Tensor' object has no attribute '_local_tensor'"); upstream
    fix proposal pytorch#191113. Waiting here, differentiably, hands every compiled block a
    plain tensor (eager: the wait happens at block 0's first op anyway)."""
    if isinstance(out, AsyncCollectiveTensor):
        return _WaitAsyncCollective.apply(out)
    return out


# --------------------------------------------------------------------------- async TP

def check_async_tp(cfg, device: torch.device) -> None:
    """Refuse parallelism.enable_async_tensor_parallel where it cannot work (before any weight
    is allocated). Async TP is an inductor pass (micro-pipelined all-gather/reduce-scatter
    matmuls over CUDA symmetric memory): it needs CUDA and the compiled model. The config's
    cross-key rules (train/config/schema.py) own the compile requirement; the device is known
    only here."""
    if cfg.parallelism.enable_async_tensor_parallel and device.type != "cuda":
        raise ConfigError(
            f"parallelism.enable_async_tensor_parallel=true needs CUDA (this run's device is "
            f"{device.type}): async TP is an inductor pass over CUDA symmetric memory; set it "
            "to false")


def enable_async_tp(tp_mesh) -> None:
    """Turn on inductor's micro-pipelined TP for the (compiled) blocks sharded over tp_mesh."""
    if not torch.cuda.is_available():  # runtime.plan's dry run of a GPU job (fake process group)
        return
    inductor_config._micro_pipeline_tp = True
    # Looked up at call time: deprecated in 2.13, so it may disappear from later releases.
    enable_symm_mem_for_group = getattr(symmetric_memory, "enable_symm_mem_for_group", None)
    if enable_symm_mem_for_group is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable_symm_mem_for_group(tp_mesh.get_group().group_name)
