"""MoE parallelism: the one place that decides how the MoE layers run on a mesh -- the mode,
the expert placement, the router replication, the token flow around the MoE under TP and
the experts' gradient scale. The all-to-all that moves tokens to their experts' ranks is
expert_parallel.py's `ExpertParallel`, installed here on every MoE layer.

Modes (`moe_mode`, from the degrees; `apply_moe_parallel` applies one):
    "none"        no EP, no TP: every rank holds every expert (FSDP may still shard them).
    "tp"          TP without EP: every TP rank gathers the full sequence and routes the same
                  tokens; each rank computes its slice F/tp of every expert's hidden units;
                  the MoE output is a partial sum, reduce-scattered back to the sequence shard.
    "ep"          EP without TP: each rank of the `ep` mesh (borrowed from dp_shard x cp) owns
                  num_experts/ep whole experts; routed rows travel there and back by all-to-all.
    "ep_over_tp"  EP borrowing the TP ranks (tp > 1, etp == 1): the MoE works on the rank's own
                  sequence shard (no gather, no reduce-scatter); each TP rank routes different
                  tokens and the all-to-all over ep (which includes tp) moves them to whole
                  experts.
    "etp"         expert tensor parallelism (etp == tp): the token flow of "tp" (gathered
                  sequence, identical routing on every TP rank, partial outputs
                  reduce-scattered), experts placed on the 2-D (ep, tp) mesh: whole experts
                  over ep, F over tp. Each TP rank runs its own all-to-all with the EP ranks
                  of the same TP index; all-to-alls are linear, so partial sums pass through.

Expert placement (`_EXPERT_SPLIT`, the one table): over ep, whole experts (dim 0); over tp,
the hidden units F:
    mlp1 [E, 2F, D] Shard(1): contiguous chunks of the interleaved gate/linear columns; a
        chunk has 2F/tp (even) columns starting at an even index, so rank r holds exactly the
        (gate, linear) pairs of hidden units [r*F/tp, (r+1)*F/tp), matching mlp2's chunk;
    mlp1_bias Shard(1) alike; mlp2 [E, D, F] Shard(2);
    mlp2_bias Replicate, added as mlp2_bias/tp by every TP rank (every rank's output is a
        partial sum that the reduce-scatter adds up: the whole bias on every rank would count
        it tp times; not the whole bias on rank 0 only: see dtensor_utils.SumGradOverMesh).
    LoRA adapters (delta = B @ A per expert): mlp1_lora_B / mlp2_lora_A follow the rank's F
        slice (Shard(1) / Shard(2)); mlp1_lora_A / mlp2_lora_B are Replicate with their
        partial local gradients summed over tp (the bottleneck x A1^T is whole on every rank;
        a_local A2_local^T is a partial sum whose product with B2 is a partial output).

Gradients under TP ("tp", "etp"). The MoE output on a rank is a *partial* sum, and so is every
gradient that flows back out of the MoE from that rank: into the router (the routing weights
multiply partial expert outputs) and into the MoE input. Hence:
    - the input is gathered with `to_local(grad_placements=Partial)`: backward reduce-scatters
      the input gradient (a plain all-gather input style would keep one rank's partial grad);
    - the router gate weight/bias are Replicate DTensors whose local gradient is all-reduced
      over TP (`sum_grad_over`), so every rank applies the same, complete router gradient;
    - the optional auxiliary loss, computed identically on every rank, is scaled by 1/tp so
      the all-reduced router gradient contains it once.
Under "ep_over_tp" the router is replicated the same way; its local gradients (from different
tokens) are summed over TP, and the aux loss, computed on each rank's own tokens, is scaled by
1/tp so the summed gradient is their mean. The router gate, which the model reads directly,
is handed to the forward as a local tensor with a summed gradient by a `swap_parameters`
hook; the experts take the local shards of their DTensor weights themselves, and only the
expert tensors whose gradient must be summed over tp are swapped. All stay registered
DTensors (state dicts, optimizer, FSDP see the same names and placements).

Gradient scale of the experts under EP. Every rank's loss carries the factor (dp x cp) /
global_tokens, and data-parallel reductions average over dp x cp ranks. Expert gradients
already sum every EP rank's contribution through the all-to-all, and FSDP then averages them
only over the remaining `dp_shard_mod_ep` (x replicate) ranks = dp x cp / ep, so the experts'
weight gradients are multiplied by 1/ep (`GroupedExperts.grad_scale`; FSDP's own divide factor
would need PREMUL_SUM, which gloo lacks), making the expert update equal the single-process
one. When EP borrows the TP ranks, ep = dp_shard_in_ep x cp x tp but the tp ranks of one
sample hold disjoint tokens of one loss (replicated over tp), so they count once: scale tp / ep.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleOutput, parallelize_module

from runtime.parallel.dims import ParallelDims
from runtime.parallel.dtensor_utils import distributed_parameter, sum_grad_over, swap_parameters
from runtime.parallel.expert_parallel import ExpertParallel

__all__ = ["MOE_MODES", "apply_moe_parallel", "moe_mode"]

MOE_MODES = ("none", "tp", "ep", "ep_over_tp", "etp")

# The expert placement table: how each expert parameter is split over the ep ranks and over
# the tp ranks (see the module docstring). A mode uses the ep column, the tp column or both.
_EXPERT_SPLIT = {
    #               over ep    over tp
    "mlp1_weight": (Shard(0), Shard(1)),
    "mlp1_bias": (Shard(0), Shard(1)),
    "mlp2_weight": (Shard(0), Shard(2)),
    "mlp2_bias": (Shard(0), Replicate()),
    # LoRA (runtime/model/lora.py; delta W_e = B_e @ A_e, the rank dim r is never split):
    "mlp1_lora_A": (Shard(0), Replicate()),  # [E, r, D]: x A^T, the whole bottleneck
    "mlp1_lora_B": (Shard(0), Shard(1)),  # [E, 2F, r]: the rank's mlp1 columns, as mlp1_weight
    "mlp2_lora_A": (Shard(0), Shard(2)),  # [E, r, F]: the rank's F, as mlp2_weight
    "mlp2_lora_B": (Shard(0), Replicate()),  # [E, D, r]: partial bottleneck -> partial output
}
# Replicate over tp, but each rank's gradient is a partial sum: mlp1_lora_A's through the
# rank's rows of mlp1_lora_B, mlp2_lora_B's from the partial bottleneck (a_local A2_local^T).
# Summed over tp (sum_grad_over); unlike mlp2_bias, which is *added* to a partial output,
# nothing here is counted tp times in the forward.
_SUM_GRAD_OVER_TP = ("mlp1_lora_A", "mlp2_lora_B")
# The columns of _EXPERT_SPLIT each mode uses ("ep_over_tp": whole experts over an ep mesh
# that includes the tp ranks).
_SPLIT_COLUMNS = {"tp": (1,), "ep": (0,), "ep_over_tp": (0,), "etp": (0, 1)}


def moe_mode(dims: ParallelDims) -> str:
    """How the MoE layers run on this job's mesh (one of MOE_MODES; see the module doc)."""
    if dims.ep == 1:
        return "tp" if dims.tp > 1 else "none"
    if dims.tp == 1:
        return "ep"
    return "etp" if dims.etp_enabled else "ep_over_tp"


def apply_moe_parallel(model: nn.Module, dims: ParallelDims) -> str:
    """Parallelise every MoE layer of `model` (on meta, after `apply_tp`) for `moe_mode(dims)`;
    returns the mode."""
    mode = moe_mode(dims)
    if mode == "none":
        return mode
    tp_mesh = dims.get_mesh("tp") if dims.tp > 1 else None
    ep = experts_mesh = None
    if dims.ep > 1:
        ep_mesh = experts_mesh = dims.get_mesh("ep")
        ep = ExpertParallel(group=ep_mesh.get_group(), size=ep_mesh.size())
    if mode == "tp":
        experts_mesh = tp_mesh
    elif mode == "etp":
        experts_mesh = dims.get_mesh(("ep", "tp"))
    columns = _SPLIT_COLUMNS[mode]
    for block in model.layers.values():
        moe = block.moe
        if tp_mesh is not None:
            _replicate_router(moe.router, tp_mesh)
        _place_experts(moe.experts, experts_mesh, columns, mode)
        if mode in ("tp", "etp"):
            _GatheredTokens(tp_mesh).apply(moe)
        elif mode == "ep_over_tp":
            _LocalTokens(tp_mesh).apply(moe)
        if ep is not None:
            moe.expert_parallel = ep
            moe.experts.grad_scale = dims.tp_in_ep / ep.size
    return mode


def _place_experts(experts: nn.Module, mesh, columns: tuple[int, ...], mode: str) -> None:
    names = [n for n in _EXPERT_SPLIT if experts._parameters.get(n) is not None]  # LoRA: maybe
    for name in names:
        placements = [_EXPERT_SPLIT[name][c] for c in columns]
        setattr(experts, name, distributed_parameter(getattr(experts, name), mesh, placements))
    if mode in ("tp", "etp"):
        # GroupedExperts takes the local shards of DTensor weights itself; only the tensors
        # whose gradient is a partial sum over tp are swapped, and the bias added to a
        # partial sum is counted once over tp.
        summed = [n for n in _SUM_GRAD_OVER_TP if n in names]
        swap_parameters(experts, experts, {
            **{n: sum_grad_over("tp") for n in summed},
            "mlp2_bias": sum_grad_over("tp", count_once=True)})


def _replicate_router(router: nn.Module, tp_mesh) -> None:
    """Router gate weight/bias as Replicate DTensors whose local gradients are summed over TP
    (swapped in around the router's forward, which reads them directly).

    Not torchtitan's NoParallel recipe (torch has no such style; built from torch's
    PrepareModuleInputOutput: Replicate DTensors in, local tensors out): its Replicate weight
    gradient is each rank's partial sum, never summed over tp. Measured (TP=2, parity
    harness, benchmarks/bench_moe_hooks.py): first-step router bias gradient off by 73% of
    its largest value, losses by 3.5e-4 relative, against 7.5e-7 / 2.2e-7 here."""
    gate = router.gate
    names = [n for n in ("weight", "bias") if gate._parameters.get(n) is not None]
    for name in names:
        setattr(gate, name, distributed_parameter(getattr(gate, name), tp_mesh, [Replicate()]))
    swap_parameters(router, gate, {name: sum_grad_over() for name in names})


class _GatheredTokens:
    """Modes "tp" and "etp": every TP rank runs the MoE on the whole (gathered) sequence and
    its partial output is reduce-scattered back to the rank's sequence shard (torch's
    PrepareModuleOutput).

    The input side is ours, not torch's PrepareModuleInput(use_local_output=True): its
    `to_local()` declares the gradient Replicate, so backward keeps one rank's partial input
    gradient instead of reduce-scattering the sum. Measured (TP=2, parity harness,
    benchmarks/bench_moe_hooks.py): first-step ffn_norm gradient off by 87% of its largest
    value with torch's input style, 7.5e-7 (summation order) with this one."""

    def __init__(self, tp_mesh):
        self.mesh = tp_mesh
        self.size = tp_mesh.size()

    def apply(self, moe: nn.Module) -> None:
        moe.register_forward_pre_hook(self._gather_input)
        moe.register_forward_hook(self._restore_aux_scale)
        parallelize_module(moe, self.mesh, PrepareModuleOutput(
            output_layouts=Partial(), desired_output_layouts=Shard(1)))

    def _gather_input(self, moe, args):
        (x,) = args
        if not isinstance(x, DTensor):  # the ffn_norm output (SequenceParallel) is a DTensor
            x = DTensor.from_local(x, self.mesh, [Shard(1)], run_check=False)
        full = x.redistribute(self.mesh, [Replicate()]).to_local(grad_placements=[Partial()])
        # The aux loss is computed identically on every rank and its router gradient is
        # summed over TP: count it once. Restored by the output hook.
        _divide_aux_loss_scale(moe, self.size)
        return (full,)

    def _restore_aux_scale(self, moe, args, out):
        _restore_aux_loss_scale(moe)


class _LocalTokens:
    """Mode "ep_over_tp": each TP rank routes its own sequence shard and the expert all-to-all
    (over an ep mesh that includes tp) does the rest."""

    def __init__(self, tp_mesh):
        self.size = tp_mesh.size()

    def apply(self, moe: nn.Module) -> None:
        moe.register_forward_pre_hook(self._local_input)
        moe.register_forward_hook(self._restore_aux_scale)

    def _local_input(self, moe, args):
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
