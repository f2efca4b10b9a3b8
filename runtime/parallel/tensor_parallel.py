"""Tensor parallelism with sequence parallel and loss parallel (`parallelize_module` plans).

Layout of the residual stream between blocks: sequence-sharded, `[B, S/tp, D]` local tensors.

    tok_embeddings  RowwiseParallel: vocab-sharded table, full tokens in, Shard(1) out
    attention_norm  SequenceParallel (weight Replicate, works on the local sequence shard)
    attention       all-gather the sequence (Shard(1) -> Replicate) before wq/wk/wv
      wq, wk, wv    ColwiseParallel: each rank owns heads [r*H/tp, (r+1)*H/tp) (biases follow)
      sinks         DTensor Shard(0): the same heads (the model takes `to_local()`)
      wo            RowwiseParallel: Partial -> reduce-scatter back to Shard(1)
    ffn_norm        SequenceParallel
    moe             see `_MoETensorParallel`: all tokens routed identically on every rank,
                    experts sharded along their hidden dim F, output reduce-scattered
    norm            SequenceParallel
    output          ColwiseParallel: vocab-sharded logits (DTensor Shard(-1), consumed by
                    cross entropy under `loss_parallel()`), or gathered to a full local
                    tensor with parallelism.disable_loss_parallel=true

RoPE cos/sin and the attention masks are computed by `GptOssModel.forward` from the full
positions (every TP rank holds the whole sequence of its samples), and attention runs on the
gathered sequence, so they need no change.

MoE under TP (no EP). Every TP rank gathers the full sequence and routes the same tokens with
a replicated router; each rank computes its slice F/tp of every expert's hidden units:
    mlp1 [E, 2F, D] Shard(1): contiguous chunks of the interleaved gate/linear columns; a
        chunk has 2F/tp (even) columns starting at an even index, so rank r holds exactly the
        (gate, linear) pairs of hidden units [r*F/tp, (r+1)*F/tp), matching mlp2's chunk;
    mlp1_bias Shard(1) alike; mlp2 [E, D, F] Shard(2);
    mlp2_bias Replicate, added as mlp2_bias/tp by every TP rank (every rank's output is a
        partial sum that the reduce-scatter adds up: the whole bias on every rank would count
        it tp times; not the whole bias on rank 0 only: see `_SumGradOverMesh`).
The MoE output on a rank is therefore a *partial* sum (Partial placement), and so is every
gradient that flows back out of the MoE from that rank: into the router (the routing
weights multiply partial expert outputs) and into the MoE input. Hence:
    - the input is gathered with `to_local(grad_placements=Partial)`: backward reduce-scatters
      the input gradient (a plain all-gather input style would keep one rank's partial grad);
    - the router gate weight/bias are Replicate DTensors whose local gradient is all-reduced
      over TP (`_SumGradOverMesh`), so every rank applies the same, complete router gradient;
    - the optional auxiliary loss, computed identically on every rank, is scaled by 1/tp so
      the all-reduced router gradient contains it once.
Parameters that the model reads directly (router gate, experts, sinks) are handed to the
forward as local tensors by `_swap_parameters` hooks; they stay registered DTensors (state
dicts, optimizer, FSDP see the same names and placements).

MoE under TP with expert parallelism (`moe_mode`, chosen by `parallelize` from ep / etp):
    "tensor"    no EP: the experts are sharded along F over tp as above.
    "expert_tensor"  ETP (etp == tp): the same token flow (gathered sequence, identical
                routing on every TP rank, partial outputs reduce-scattered), but the experts
                are placed by `apply_ep` on the 2-D (ep, tp) mesh: whole experts over ep,
                F over tp. Each TP rank runs its own all-to-all with the EP ranks of the same
                TP index; all-to-alls are linear, so partial sums pass through them.
    "sequence"  EP borrowing the TP ranks (etp == 1): the MoE works on the rank's own
                sequence shard (no gather, no reduce-scatter): each TP rank routes different
                tokens and the all-to-all over ep (which includes tp) moves them to whole
                experts. The router stays a Replicate DTensor whose local gradients (from
                different tokens) are summed over TP, and the aux loss, computed on each
                rank's own tokens, is scaled by 1/tp so the summed gradient is their mean.

Per-block torch.compile (compile.py) traces the block with its TP hooks inside; the only
DTensor/async value that crosses into a compiled block from eager code is the embedding
output, which `_wait_async_output` turns from an AsyncCollectiveTensor into a plain tensor
(see there: compiled regions drop the gradient of ACT inputs).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["apply_tp"]


MOE_MODES = ("tensor", "expert_tensor", "sequence")


def apply_tp(model: nn.Module, tp_mesh, loss_parallel: bool, moe_mode: str = "tensor") -> nn.Module:
    """Shard `model` (a GptOssModel, usually still on the meta device) over the 1-D `tp_mesh`.

    moe_mode: how the MoE layers run under TP (see the module docstring); with "expert_tensor"
    and "sequence" the experts themselves are left to `apply_ep`."""
    if moe_mode not in MOE_MODES:
        raise ValueError(f"moe_mode must be one of {MOE_MODES}, got {moe_mode!r}")
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    from runtime.parallel.quantize import tensor_parallel_styles

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
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            # forward(x, rope, mask, backend): gather x's sequence, leave the rest alone
            "attention": prepare_input(
                input_layouts=(Shard(1), None, None, None),
                desired_input_layouts=(Replicate(), None, None, None)),
            "attention.wq": colwise(),
            "attention.wk": colwise(),
            "attention.wv": colwise(),
            "attention.wo": rowwise(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
        })
        attention = block.attention
        attention.sinks = _distributed_parameter(attention.sinks, tp_mesh, [Shard(0)])
        # The attention reads its local heads' sinks (eager: the model's own to_local; handing
        # it the local tensor also keeps torch.compile's tracing of the block on plain tensors).
        _swap_parameters(attention, attention, {"sinks": _to_local})
        if moe_mode == "sequence":
            _MoESequenceParallel(tp_mesh).apply(block.moe)
        else:
            _MoETensorParallel(tp_mesh, shard_experts=moe_mode == "tensor").apply(block.moe)
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
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    if isinstance(out, AsyncCollectiveTensor):
        return _WaitAsyncCollective.apply(out)
    return out


def _distributed_parameter(param: nn.Parameter, mesh, placements) -> nn.Parameter:
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: no communication (the model is usually on meta; real values are
    # written later by init_weights or a checkpoint load).
    dt = distribute_tensor(param.data, mesh, placements, src_data_rank=None)
    return nn.Parameter(dt, requires_grad=param.requires_grad)


def _to_local(param):
    return param.to_local()  # gradient: the local shard's, as a DTensor with param's placements


class _SumGradOverMesh(torch.autograd.Function):
    """DTensor parameter -> its local tensor for a rank-local computation whose gradient on
    each rank is only a partial sum over the mesh dim `dim` (where the parameter is
    Replicate); backward all-reduces (sums) the local gradients over that dim and hands back
    a gradient with the parameter's placements.

    count_once=True: the local value is the parameter divided by the size of `dim` (a bias
    added to a partial sum must be counted once over those ranks); its summed gradient is
    then the mean of the ranks' (identical) gradients. Not "the parameter on rank 0, zeros
    elsewhere": under torch.compile the other ranks' backward all-reduce of a zero gradient
    does not depend on the incoming gradient, so inductor's partitioner hoists it into the
    *forward* graph there, while rank 0 runs it in backward: the ranks' collectives no longer
    match (gloo: "Received data size doesn't match expected size"; NCCL would hang). Scaling
    keeps one program on every rank."""

    @staticmethod
    def forward(ctx, param, count_once: bool, dim: str | None = None):
        mesh = param.device_mesh
        index = 0 if dim is None else mesh.mesh_dim_names.index(dim)
        ctx.spec = (mesh, param.placements, param.shape, param.stride(), index)
        ctx.scale = 1.0 / mesh.size(index) if count_once else 1.0
        local = param.to_local()
        return local * ctx.scale if count_once else local.view_as(local)

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor, Partial

        mesh, placements, shape, stride, index = ctx.spec
        if ctx.scale != 1.0:
            grad = grad * ctx.scale
        partial_placements = list(placements)
        partial_placements[index] = Partial()
        partial = DTensor.from_local(grad.contiguous(), mesh, partial_placements, run_check=False,
                                     shape=shape, stride=stride)
        return partial.redistribute(mesh, placements), None, None


def sum_grad_over(dim: str | None = None, count_once: bool = False):
    """A `_swap_parameters` substitute: the local tensor whose gradient is summed over `dim`."""
    return lambda param: _SumGradOverMesh.apply(param, count_once, dim)


class _swap_parameters:
    """Forward pre/post hooks on `owner` that replace parameters of `target` (owner or a
    submodule) by `fn(param)` for the duration of owner's forward, then put them back.
    The parameters stay registered (same names in state dicts and optimizers); only the
    forward reads the substitutes. Runs after FSDP's pre-forward (which registers the
    unsharded parameters on the block) and again under activation-checkpoint recomputation."""

    def __init__(self, owner: nn.Module, target: nn.Module, substitutes: dict):
        self.target, self.substitutes, self.saved = target, substitutes, []
        owner.register_forward_pre_hook(self._pre)
        owner.register_forward_hook(self._post)

    def _pre(self, module, args):
        saved = {}
        for name, fn in self.substitutes.items():
            param = self.target._parameters[name]
            saved[name] = param
            self.target._parameters[name] = fn(param)  # a plain tensor, bypassing __setattr__
        self.saved.append(saved)

    def _post(self, module, args, output):
        for name, param in self.saved.pop().items():
            self.target._parameters[name] = param


def _replicate_router(router: nn.Module, mesh) -> None:
    """Router gate weight/bias as Replicate DTensors whose local gradients are summed over TP
    (swapped in around the router's forward, which reads them directly)."""
    from torch.distributed.tensor import Replicate

    gate = router.gate
    names = [n for n in ("weight", "bias") if gate._parameters.get(n) is not None]
    for name in names:
        setattr(gate, name, _distributed_parameter(getattr(gate, name), mesh, [Replicate()]))
    _swap_parameters(router, gate, {name: sum_grad_over() for name in names})


class _MoETensorParallel:
    """MoE under TP (no EP, or ETP): see the module docstring.

    shard_experts=False (ETP): the experts are placed by `apply_ep` on the (ep, tp) mesh."""

    def __init__(self, tp_mesh, shard_experts: bool = True):
        self.mesh = tp_mesh
        self.size = tp_mesh.size()
        self.shard_experts = shard_experts

    def apply(self, moe: nn.Module) -> None:
        from torch.distributed.tensor import Replicate, Shard

        _replicate_router(moe.router, self.mesh)
        if self.shard_experts:
            experts = moe.experts
            for name, placement in (("mlp1_weight", Shard(1)), ("mlp1_bias", Shard(1)),
                                    ("mlp2_weight", Shard(2)), ("mlp2_bias", Replicate())):
                setattr(experts, name,
                        _distributed_parameter(getattr(experts, name), self.mesh, [placement]))
            _swap_parameters(experts, experts, {
                "mlp1_weight": _to_local, "mlp1_bias": _to_local, "mlp2_weight": _to_local,
                "mlp2_bias": sum_grad_over(count_once=True)})
        moe.register_forward_pre_hook(self._gather_input)
        moe.register_forward_hook(self._reduce_scatter_output)

    def _gather_input(self, moe, args):
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        (x,) = args
        if not isinstance(x, DTensor):  # the ffn_norm output (SequenceParallel) is a DTensor
            x = DTensor.from_local(x, self.mesh, [Shard(1)], run_check=False)
        full = x.redistribute(self.mesh, [Replicate()]).to_local(grad_placements=[Partial()])
        # The aux loss is computed identically on every rank and its router gradient is
        # summed over TP: count it once. Restored by the output hook.
        _divide_aux_loss_scale(moe, self.size)
        return (full,)

    def _reduce_scatter_output(self, moe, args, out):
        from torch.distributed.tensor import DTensor, Partial, Shard

        _restore_aux_loss_scale(moe)
        partial = DTensor.from_local(out, self.mesh, [Partial()], run_check=False)
        return partial.redistribute(self.mesh, [Shard(1)]).to_local()


class _MoESequenceParallel:
    """MoE under TP when EP borrows the TP ranks (etp == 1): each rank routes its own sequence
    shard and the expert all-to-all (over an ep mesh that includes tp) does the rest."""

    def __init__(self, tp_mesh):
        self.mesh = tp_mesh
        self.size = tp_mesh.size()

    def apply(self, moe: nn.Module) -> None:
        _replicate_router(moe.router, self.mesh)
        moe.register_forward_pre_hook(self._local_input)
        moe.register_forward_hook(self._restore_aux_scale)

    def _local_input(self, moe, args):
        from torch.distributed.tensor import DTensor

        (x,) = args
        # Each TP rank's aux loss sees its own tokens; the router gradient is summed over TP,
        # so 1/tp makes it the mean (as data-parallel ranks average theirs).
        _divide_aux_loss_scale(moe, self.size)
        return (x.to_local() if isinstance(x, DTensor) else x,)  # [B, S/tp, D]

    def _restore_aux_scale(self, moe, args, out):
        _restore_aux_loss_scale(moe)
        return out


def _divide_aux_loss_scale(moe: nn.Module, tp: int) -> None:
    """For one MoE forward: the aux loss's router gradient is summed over the tp ranks."""
    moe._tp_saved_aux_scale = moe.aux_loss_scale
    moe.aux_loss_scale = moe.aux_loss_scale / tp


def _restore_aux_loss_scale(moe: nn.Module) -> None:
    moe.aux_loss_scale = moe.__dict__.pop("_tp_saved_aux_scale")
