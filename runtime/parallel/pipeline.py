"""Pipeline parallelism with `torch.distributed.pipelining`: stage splitting, stage -> rank
placement, the schedules, and the pieces of a training step that must span every stage
(loss, gradient-norm clipping, one optimizer over a rank's several stages).
`PipelineParallel` is the pipeline runner: it offers the trainer the same calls as
`runtime.train.runner.LocalRunner` (the `runtime.train.runner.Runner` protocol: model_parts,
model, microbatches, forward_backward, eval_loss_sum, share_loss, clip_grad_norm_).

Splitting (`stage_layer_ids`). The model is cut between transformer blocks; every stage
gets at least one block.
- `parallelism.pipeline_parallel_layers_per_stage = N`: stages of N consecutive blocks,
  the last stage takes the remainder (dims.pipeline_num_stages checked the count).
- balanced (-1, the default): the token embedding counts as one block of the first stage
  and the final norm + output head as one block of the last stage; blocks are handed out
  one at a time to the stage with the lowest load (ties: the earlier stage), starting from
  one block per stage. Blocks per stage, e.g.: 4 layers / 2 stages -> 2, 2; 8 / 4 -> 2, 3,
  2, 1; 24 / 4 -> 6, 7, 6, 5; 36 / 8 -> 4, 5, 5, 5, 5, 5, 4, 3. (A rough rule: at gpt-oss
  sizes the output head costs several blocks of compute, the embedding lookup almost none;
  set layers_per_stage to choose.)

Placement (`stage_ids_this_rank`). Loop style for GPipe / 1F1B (one stage per rank) and
Interleaved1F1B / InterleavedZeroBubble (rank r holds r, r + pp, r + 2 pp, ...); V style for
ZBVZeroBubble / DualPipeV (exactly 2 stages per rank: r and 2 pp - 1 - r, so rank 0 holds
the first and the last stage).

Stage modules (`build_stage_module`) are deep copies of the meta model with the blocks of
other stages deleted and `tok_embeddings` / `norm` / `output` set to None where not owned;
parameter names stay those of the full model, so checkpoints load on any mesh and the
model-only seed checkpoint of a single process initialises every stage. Each part is then
parallelised (TP / AC / compile / FSDP) exactly like a whole model and materialised by the
trainer's `materialize`. `StagesView` (the runner's `model`) shows a rank's stages as one
module (full-model names) for the optimizer and its checkpoints.

The loss (`PipelineParallel.forward_backward`): the schedule calls our loss function on the
last stage for every pipeline microbatch with the summed token cross entropy times the
trainer's scale dp / global_tokens, and runs with `scale_grads=False`, so gradients are the
sum over microbatches of exactly what the non-pipelined trainer computes: same losses, same
gradients. The schedule's per-microbatch losses are divided back to the summed loss and
shared with every pp rank for logging. Each gradient-accumulation micro-step of
`training.local_batch_size` rows is one schedule step of local_batch_size /
`parallelism.pipeline_parallel_microbatch_size` pipeline microbatches (the schedule reduces
data-parallel gradients at the end of each step; FSDP accumulates them). All pp ranks of a
data-parallel rank load the same rows; only the first stage reads the tokens, only the last
the labels, `positions` / `document_ids` go to every stage.

MoE load balancing: each stage's blocks count their own routed tokens; the trainer's
`update_expert_bias` runs over all parts of the rank with one all-reduce over dp. The
schedules' one-off metadata (shape) inference runs an extra forward on dummy inputs at the
first step; `_protect_moe_statistics` undoes its effect on the token counts.

DualPipeV: torch runs an OVERLAP_F_B action's forward and backward sub-actions one after
the other. With expert parallelism (ep > 1) and `parallelism.pipeline_parallel_overlap_ep`
(default true), `dualpipe_overlap.EPOverlap` is registered for OVERLAP_F_B instead: the
forward and the backward run as two roles taking turns at the MoE layers' all-to-alls, so
that one microbatch's all-to-all is in flight while the other computes (same numbers as
without it; see that module for the hand-over protocol and why it cannot deadlock).
`self.ep_overlap` (None when off) counts what it did.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable

import torch
import torch._functorch.config as functorch_config
import torch.distributed as dist
from torch import nn

from runtime.model.loss import cross_entropy_sum, loss_parallel_context
from runtime.model.moe import moe_layers
from runtime.parallel.dims import (
    SINGLE_STAGE_SCHEDULES,
    V_SCHEDULES,
    ParallelDims,
    ParallelismError,
    pipeline_num_stages,
)
from runtime.parallel.gradients import clip_grad_norm_over_stages_

_SCHEDULE_CLASSES = {
    "GPipe": "ScheduleGPipe",
    "1F1B": "Schedule1F1B",
    "Interleaved1F1B": "ScheduleInterleaved1F1B",
    "InterleavedZeroBubble": "ScheduleInterleavedZeroBubble",
    "ZBVZeroBubble": "ScheduleZBVZeroBubble",
    "DualPipeV": "ScheduleDualPipeV",
}
_KEY = "parallelism.pipeline_parallel_schedule"
# Schedules that split a stage's backward into input- and weight-gradient passes (the first
# keeps the autograd graph alive for the second).
SPLIT_BACKWARD_SCHEDULES = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


# --------------------------------------------------------------------------- splitting

def stage_layer_ids(n_layers: int, num_stages: int, layers_per_stage: int = -1) -> list[list[int]]:
    """Block ids of every stage (consecutive, each stage non-empty); see the module doc."""
    if num_stages < 1 or n_layers < num_stages:
        raise ParallelismError(f"model n_layers ({n_layers}) must be >= the number of pipeline "
                               f"stages ({num_stages})")
    if layers_per_stage > 0:
        counts = [layers_per_stage] * (num_stages - 1)
        counts.append(n_layers - sum(counts))
        if counts[-1] < 1 or counts[-1] > layers_per_stage:
            raise ParallelismError(
                f"parallelism.pipeline_parallel_layers_per_stage ({layers_per_stage}) does not "
                f"split {n_layers} layers into {num_stages} stages")
    else:
        extra = [0] * num_stages  # embeddings / head, each weighing one block
        extra[0] += 1
        extra[-1] += 1
        counts = [1] * num_stages
        for _ in range(n_layers - num_stages):
            loads = [c + e for c, e in zip(counts, extra)]
            counts[loads.index(min(loads))] += 1
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def stage_ids_this_rank(pp_rank: int, pp: int, num_stages: int, schedule: str) -> tuple[int, ...]:
    """Stages held by pipeline rank `pp_rank` (ascending)."""
    if schedule in V_SCHEDULES:
        if num_stages != 2 * pp:
            raise ParallelismError(f"{_KEY}={schedule} needs exactly 2 stages per rank, got "
                                   f"{num_stages} stages for pipeline_parallel_degree {pp}")
        return tuple(sorted((pp_rank, num_stages - 1 - pp_rank)))
    if num_stages % pp:
        raise ParallelismError(f"{num_stages} pipeline stages do not split over "
                               f"parallelism.pipeline_parallel_degree ({pp})")
    return tuple(range(pp_rank, num_stages, pp))


def build_stage_module(model: nn.Module, stage_id: int, num_stages: int,
                       layer_ids: list[int]) -> nn.Module:
    """A deep copy of `model` (meta) keeping only `layer_ids`, the embeddings on the first
    stage and the final norm + head on the last; names stay those of the full model."""
    part = copy.deepcopy(model)
    keep = {str(i) for i in layer_ids}
    for name in list(part.layers.keys()):
        if name not in keep:
            del part.layers[name]
    if stage_id != 0:
        part.tok_embeddings = None
    if stage_id != num_stages - 1:
        part.norm = None
        part.output = None
    part.pipeline_stage = (stage_id, num_stages)  # informational
    return part


def schedule_class(name: str):
    """The torch schedule class for a config name; a clear error where this torch lacks it."""
    from torch.distributed import pipelining  # ~1.4 s import: pipeline runs only

    if name not in _SCHEDULE_CLASSES:
        raise ParallelismError(f"{_KEY} must be one of {tuple(_SCHEDULE_CLASSES)}, got {name!r}")
    _refuse_v_schedule_on_old_gloo(name)
    cls = getattr(pipelining, _SCHEDULE_CLASSES[name], None)
    if cls is None:
        cls = getattr(getattr(pipelining, "schedules", None), _SCHEDULE_CLASSES[name], None)
    if cls is None:
        raise ParallelismError(
            f"{_KEY}={name} needs torch.distributed.pipelining.{_SCHEDULE_CLASSES[name]}, which "
            f"torch {torch.__version__} does not provide; upgrade torch or pick another schedule")
    return cls


def _refuse_v_schedule_on_old_gloo(name: str) -> None:
    """torch < 2.13 on gloo cannot run the V schedules: their shape inference sends between
    the two stages of one rank ("Pair is not connected"); seen on 2.11, fixed by 2.13."""
    old_torch = torch.torch_version.TorchVersion(torch.__version__) < "2.13"
    if name in V_SCHEDULES and old_torch and dist.is_initialized() and dist.get_backend() == "gloo":
        raise ParallelismError(
            f"{_KEY}={name} (two stages per rank) does not run on gloo with torch "
            f"{torch.__version__} (point-to-point to the same rank fails); use torch >= 2.13 "
            "for CPU runs, NCCL, or a loop schedule (1F1B, Interleaved1F1B, ...)")


def _accepts(fn, name: str) -> bool:
    """Whether `fn` has a parameter called `name` (by name: **kwargs does not count)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- MoE statistics

@contextlib.contextmanager
def _moe_statistics_unchanged(module: nn.Module):
    """Restore the routed-token counts and the last aux loss of `module`'s MoE layers on
    exit: forwards inside (the schedule's metadata inference) leave no trace."""
    moes = moe_layers(module)
    saved = [(m.tokens_per_expert.clone(), m.last_aux_loss) for m in moes]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (counts, aux) in zip(moes, saved):
                m.tokens_per_expert.copy_(counts)
                m.last_aux_loss = aux


def _protect_moe_statistics(stage) -> None:
    """Wrap the stage's one-off forward/backward metadata preparation (shape inference runs
    the stage on dummy inputs, in torch 2.11 and 2.13 alike)."""
    for name in ("_prepare_forward_infra", "_prepare_backward_infra"):
        original = getattr(stage, name, None)
        if original is None:
            continue

        @functools.wraps(original)
        def wrapped(*args, __original=original, **kwargs):
            with _moe_statistics_unchanged(stage.submod):
                return __original(*args, **kwargs)

        setattr(stage, name, wrapped)


# --------------------------------------------------------------------------- the pipeline

class PipelineParallel:
    """The pipeline runner: this rank's stages of the pipeline, their model parts and the
    schedule."""

    def __init__(self, model: nn.Module, dims: ParallelDims, cfg, device: torch.device,
                 parallelize_fn: Callable[[nn.Module], nn.Module],
                 materialize_fn: Callable[[list[nn.Module]], None],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_sum):
        """model: the whole model on the meta device; parallelize_fn(part) applies the other
        parallelisms to one (meta) part; materialize_fn(parts) allocates and initialises
        them; loss_fn(logits, labels) -> summed token loss."""
        from torch.distributed.pipelining import PipelineStage  # ~1.4 s import: pipeline runs only

        p = cfg.parallelism
        self.schedule_name = p.pipeline_parallel_schedule
        schedule_cls = schedule_class(self.schedule_name)  # fail before building anything
        if (self.schedule_name in SPLIT_BACKWARD_SCHEDULES and cfg.compile.enable
                and "model" in cfg.compile.components):
            _allow_split_backward_of_compiled_blocks()
        n_layers = len(model.layers)
        self.num_stages = pipeline_num_stages(dims.pp, self.schedule_name, n_layers,
                                              p.pipeline_parallel_layers_per_stage)
        pp_mesh = dims.get_mesh("pp")
        self.pp_group = pp_mesh.get_group()
        self.pp_rank = pp_mesh.get_local_rank()
        self.layer_ids = stage_layer_ids(n_layers, self.num_stages,
                                         p.pipeline_parallel_layers_per_stage)
        self.stage_ids = stage_ids_this_rank(self.pp_rank, dims.pp, self.num_stages,
                                             self.schedule_name)
        self.microbatches = cfg.training.local_batch_size // p.pipeline_parallel_microbatch_size
        self.device = device
        self._loss_fn = loss_fn
        self._loss_scale = 1.0
        self._loss_parallel = dims.tp > 1 and not p.disable_loss_parallel

        self.model_parts: list[nn.Module] = []
        for stage_id in self.stage_ids:
            part = build_stage_module(model, stage_id, self.num_stages, self.layer_ids[stage_id])
            self.model_parts.append(parallelize_fn(part))
        materialize_fn(self.model_parts)
        self.model = StagesView(self.model_parts)  # optimizer, checkpoints, MoE bookkeeping

        self.stages = []
        for stage_id, part in zip(self.stage_ids, self.model_parts):
            stage = PipelineStage(part, stage_id, self.num_stages, device, group=self.pp_group)
            _protect_moe_statistics(stage)
            self.stages.append(stage)
        self.has_first = any(s.is_first for s in self.stages)
        self.has_last = any(s.is_last for s in self.stages)

        if not _accepts(schedule_cls.__init__, "scale_grads"):
            raise ParallelismError(
                f"{_KEY}={self.schedule_name}: torch {torch.__version__}'s "
                f"{schedule_cls.__name__} has no scale_grads argument (torch >= 2.11 needed)")
        stages = self.stages[0] if self.schedule_name in SINGLE_STAGE_SCHEDULES else self.stages
        try:
            # Our loss is already normalised (dp / global tokens): the schedule must not
            # divide the gradients by the number of microbatches again.
            self.schedule = schedule_cls(stages, n_microbatches=self.microbatches,
                                         loss_fn=self._scaled_loss, scale_grads=False)
        except (ValueError, AssertionError) as err:
            raise ParallelismError(
                f"{_KEY}={self.schedule_name} with {self.microbatches} microbatches "
                f"(training.local_batch_size / parallelism.pipeline_parallel_microbatch_size) and "
                f"{self.num_stages} stages over pipeline_parallel_degree {dims.pp}: {err}") from err
        self._step_accepts_return_outputs = _accepts(self.schedule.step, "return_outputs")
        self.ep_overlap = self._maybe_overlap_ep(dims, p.pipeline_parallel_overlap_ep)

    def _maybe_overlap_ep(self, dims: ParallelDims, enabled: bool):
        """DualPipeV x EP: run OVERLAP_F_B actions with the all-to-all overlap (module doc)."""
        if not (enabled and self.schedule_name == "DualPipeV" and dims.ep > 1):
            return None
        from runtime.parallel import dualpipe_overlap  # loads torch.distributed.pipelining

        if not dualpipe_overlap.supports_custom_overlap(self.schedule):
            raise ParallelismError(
                f"parallelism.pipeline_parallel_overlap_ep needs OVERLAP_F_B custom functions, "
                f"which torch {torch.__version__} lacks; set it to false or upgrade torch")
        # Outputs are kept only where step() would return them (we pass return_outputs=False).
        return dualpipe_overlap.enable_ep_overlap(
            self.schedule, self.model_parts, self.device,
            save_forward_output=not self._step_accepts_return_outputs)

    def _scaled_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._loss_fn(output, target) * self._loss_scale

    def forward_backward(self, micro: dict, loss_scale: float, sync_grads: bool = True) -> torch.Tensor:
        """One pipelined forward + backward over the rank's micro-step `micro` (rows are cut
        into `self.microbatches` pipeline microbatches). Returns the summed (unscaled) token
        loss on ranks with the last stage, 0 elsewhere (`share_loss` spreads it).
        `sync_grads` is not needed: the schedule reduces data-parallel gradients itself after
        its last microbatch, and FSDP accumulates across micro-steps."""
        device = self.device
        args = (micro["tokens"].to(device, non_blocking=True),) if self.has_first else ()
        kwargs = {"positions": micro["positions"].to(device, non_blocking=True)}
        if micro.get("document_ids") is not None:
            kwargs["document_ids"] = micro["document_ids"].to(device, non_blocking=True)
        extra = {}
        if self.has_last:
            extra["target"] = micro["labels"].to(device, non_blocking=True)
        losses: list[torch.Tensor] = []
        if self._step_accepts_return_outputs:
            extra["return_outputs"] = False  # the loss is all we need: don't merge logits
        self._loss_scale = loss_scale
        with loss_parallel_context(self._loss_parallel):
            self.schedule.step(*args, losses=losses, **extra, **kwargs)
        if not self.has_last:
            return torch.zeros((), device=device)
        total = torch.zeros((), device=device)
        for loss in losses:
            loss = loss.detach()
            if hasattr(loss, "full_tensor"):
                loss = loss.full_tensor()
            total += loss.float()
        return total / loss_scale

    def eval_loss_sum(self, micro: dict) -> torch.Tensor:
        """The summed token loss of `micro` for validation. A schedule always runs its
        stages' backward: the caller drops the gradients this leaves."""
        return self.forward_backward(micro, 1.0)

    def share_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """Every pp rank gets the last stage's loss (the others hold 0): sum over pp."""
        dist.all_reduce(loss_sum, group=self.pp_group)
        return loss_sum

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Total gradient 2-norm over every stage (and every shard), clipped to max_norm."""
        return clip_grad_norm_over_stages_(self.model.parameters(), max_norm, self.pp_group,
                                           self.device)


def _allow_split_backward_of_compiled_blocks() -> None:
    """Compiled blocks' backward donates its saved buffers, which forbids the second
    (weight-gradient) backward pass of the zero-bubble schedules over the same graph
    ("compiled with non-empty donated buffers which requires ... retain_graph=False").
    Turn donation off (process-wide; it only saves memory)."""
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False


# --------------------------------------------------------------------------- all stages as one

class StagesView(nn.Module):
    """This rank's stage modules under the full model's names, as one module with no forward:
    `layers` holds every local block, plus `tok_embeddings` / `norm` / `output` / `rope`
    where a local stage has them (the same module objects, not copies).

    The trainer builds its single optimizer over it (parameter-group rules match names like
    `tok_embeddings.weight`, and the number of groups -- hence the LR scheduler's state --
    is the same as without PP), hands it to `OptimizerState` (optimizer state keyed by the
    full model's names: a checkpoint loads on any mesh) and runs the MoE bookkeeping over
    it (each block exactly once)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.args = parts[0].args
        self.layers = nn.ModuleDict()
        for part in parts:
            for name, child in part.named_children():
                if name == "layers":
                    for key, block in child.items():
                        self.layers[key] = block
                elif name not in self._modules:
                    self.add_module(name, child)

    def forward(self, *args, **kwargs):
        raise RuntimeError("StagesView has no forward: the pipeline schedule runs the stages")
