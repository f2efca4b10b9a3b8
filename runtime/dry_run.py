"""CUDA dry run on a CPU: the real training step of one rank, at the real world size, on fake
CUDA tensors (`python -m runtime.plan --config C --world-size N --trace`).

What runs for real (the trainer's own code): the model built on meta and parallelised by
`runtime.parallel.parallelize` on the job's device mesh (FSDP2/HSDP, TP + SP + loss parallel,
EP/ETP, CP, activation checkpointing), `to_empty` on `cuda:0` and `init_weights` (shapes
only: nothing is drawn), the optimizer the trainer builds (fused AdamW on CUDA) and
`Trainer.optimizer_step`: bf16 autocast, the fused chunked loss, backward, gradient clipping,
the optimizer step, the lr schedule and the expert-bias update, for `steps` steps.

How: every tensor is a `FakeTensor` (FakeTensorMode: shape, dtype and device, no storage), the
process group is torch's fake backend (`fake_pg.FakeStore`: this process plays rank R of N,
collectives return fake outputs of the right shape) and, on a CPU-only torch,
runtime/fake_cuda.py supplies a CUDA device guard and no-op streams. Memory is measured by
torch's `FSDPMemTracker` (`MemTracker` without FSDP): every storage alive at the peak, by kind.

Stand-ins (`StandIns` below), where the real code reads values that fake tensors do not have:
  expert-parallel split sizes   (`.tolist()` of the routed counts) balanced routing: each EP
                                rank sends its rows evenly and receives `imbalance` x the mean
                                (Megatron's force-balance idea; only here)
  loss / grad norm read-back    (`read_scalars`, one `.tolist()`) 1.0 (finite: the step runs)
  trained-token count           (an all-reduced `.item()`) every label trained
  attention masks               built on the host from the same predicate (document masking:
                                one document per sequence), then faked onto the device
  device mesh coordinates       computed with real tensors (DeviceMesh uses nonzero())
Not run (listed in the output): inductor codegen (torch.compile: the eager code runs instead,
flex attention as the eager higher-order op), CUDA streams/events and their overlap,
symmetric memory (async TP), NCCL, the CUDA caching allocator (fragmentation) and pipeline
schedules (their shape inference exchanges Python objects between ranks, which the fake
group does not deliver).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

from runtime import fake_cuda

GIB = 2 ** 30

COVERED = (
    "bf16 autocast and casts", "fused AdamW selection (optimizer step on cuda)",
    "eager FlexAttention higher-order op (sliding window, sinks via lse)",
    "grouped_mm experts", "fused chunked loss (fp32-accumulated head gradient, addmm out_dtype)",
    "DTensor collectives on the fake process group", "FSDP2 all-gather / reduce-scatter",
    "activation checkpointing", "gradient clipping", "lr schedule and expert-bias update",
)
NOT_RUN = (
    "inductor codegen (torch.compile off: eager code instead)",
    "CUDA streams/events (no-ops: no overlap is modelled)",
    "symmetric memory (async TP)", "NCCL", "CUDA caching allocator fragmentation",
    "pipeline schedules (object exchange between ranks)",
)


class DryRunError(RuntimeError):
    """The traced step failed: a bug the dry run found (message: one line naming the module)."""


@dataclass
class TraceResult:
    rank: int
    steps: int
    peak_bytes: int
    by_kind: dict[str, int]  # memory at the peak by tracker category
    tokens_per_step: int  # tokens this rank processes per optimizer step
    flops: float | None = None  # counted over one step (FlopCounterMode), this rank
    flops_formula: float | None = None  # metrics.training_flops_per_token x this rank's tokens
    seconds: float = 0.0
    stand_ins: list[str] = field(default_factory=list)


def traceable_config(cfg):
    """The config as traced: torch.compile off (inductor codegen cannot run without a GPU),
    no initial weights (shapes only)."""
    cfg = copy.deepcopy(cfg)
    cfg.compile.enable = False
    cfg.checkpoint.initial_load_hf = ""
    cfg.checkpoint.initial_load_path = ""
    return cfg


def balanced_split_sizes(imbalance: float):
    """The expert-parallel split-size stand-in: `rows` routed rows leave evenly over the EP
    ranks; this rank receives `imbalance` x as many (1.0: perfectly balanced)."""
    def split_sizes(send_counts, recv_counts, num_rows: int):
        ep = send_counts.shape[0]
        received = int(round(num_rows * imbalance))
        return [_even(num_rows, ep), _even(received, ep)]
    return split_sizes


def _even(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class StandIns:
    """Installs the stand-ins listed in the module docstring for the duration of a trace."""

    def __init__(self, imbalance: float):
        self.imbalance = imbalance
        self._undo: list[tuple[object, str, object]] = []

    def _set(self, owner, name: str, value) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def __enter__(self) -> "StandIns":
        import torch
        import torch.nn.attention.flex_attention as flex
        import torch.distributed.device_mesh as device_mesh
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        import runtime.model.attention as attention
        import runtime.model.init as init
        import runtime.parallel.expert_parallel as expert_parallel
        import runtime.train.trainer as trainer
        from runtime.model.model import GptOssModel

        # Device meshes hold real (CPU) rank tensors: DeviceMesh computes coordinates with
        # nonzero() and tolist(), which fake tensors cannot answer.
        self._set(DeviceMesh, "__init__", _outside_fake_mode(DeviceMesh.__init__))
        self._set(device_mesh, "init_device_mesh", _outside_fake_mode(device_mesh.init_device_mesh))
        self._set(init, "compute_local_shape_and_global_offset",
                  _outside_fake_mode(init.compute_local_shape_and_global_offset))
        self._set(expert_parallel, "split_sizes", balanced_split_sizes(self.imbalance))
        self._set(trainer, "read_scalars", lambda *values, device: [1.0] * len(values))
        self._set(trainer, "max_over_ranks", lambda count, device: count)  # LoRA's startup line
        # eager flex attention: the higher-order op itself (no compiled kernel, no dynamo
        # wrapper, which refuses to trace under the memory tracker's dispatch mode)
        self._set(attention, "_compiled_flex_attention", lambda: flex.flex_attention)
        self._set(flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
        self._set(ShardingPropagator, "_propagate_tensor_meta_non_cached",
                  _propagating(ShardingPropagator._propagate_tensor_meta_non_cached))
        self._set(GptOssModel, "_attention_masks", _host_masks(GptOssModel._attention_masks))
        self._set(trainer, "materialize", _materialize_plain_params(trainer.materialize))
        del torch
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, value in reversed(self._undo):
            setattr(owner, name, value)
        self._undo.clear()


# > 0 while DTensor propagates shapes: it runs each op once more on fake tensors of the
# GLOBAL shape (under our FakeTensorMode, so the memory tracker would count them).
_PROPAGATING = [0]


def _propagating(fn):
    def call(*args, **kwargs):
        _PROPAGATING[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _PROPAGATING[0] -= 1
    return call


def _outside_fake_mode(fn):
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def call(*args, **kwargs):
        with unset_fake_temporarily():
            return fn(*args, **kwargs)
    return call


def _materialize_plain_params(materialize):
    """The trainer's `materialize`, also for a part without DTensor parameters (one rank, no
    parallelism): its parameters are fake meta tensors here, which `to_empty` swaps in place,
    and swap_tensors refuses a fake tensor (the fake mode holds weak references to it). Such a
    part gets new parameters and buffers on the device instead, then is initialised as
    `materialize` does; parallelised parts go through `materialize` itself."""
    import torch
    from torch import nn
    from torch.distributed.tensor import DTensor

    def call(parts, device, seed):
        sharded = [part for part in parts if any(isinstance(p, DTensor) for p in part.parameters())]
        materialize(sharded, device, seed)
        for part in (part for part in parts if part not in sharded):
            for module in part.modules():
                for name, p in module.named_parameters(recurse=False):
                    setattr(module, name, nn.Parameter(torch.empty_like(p, device=device),
                                                       requires_grad=p.requires_grad))
                for name, b in module.named_buffers(recurse=False):
                    module.register_buffer(name, torch.empty_like(b, device=device),
                                           persistent=name not in module._non_persistent_buffers_set)
            part.init_weights(seed=seed)
            part.train()
    return call


def _host_masks(build):
    """GptOssModel._attention_masks built on the host with real tensors (block masks need
    data-dependent ops), then moved onto the fake device; document ids are ignored (one
    document per sequence: the same block count as plain causal/window masks)."""
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from runtime.model.masks import AttentionMasks

    cache: dict = {}

    def masks(model, backend, seq_len, document_ids, device):
        # GptOssModel._attention_masks' own cache key (the model's CP state, model.py)
        key = (backend, seq_len, str(device), id(model.context_parallel))
        if key not in cache:
            with unset_fake_temporarily():
                host = build(model, backend, seq_len, None, torch.device("cpu"))
            faked = AttentionMasks(sliding=host.sliding.to(device), full=host.full.to(device))
            if hasattr(host.sliding, "kv_num_blocks"):  # flex block masks (not dense tensors)
                with unset_fake_temporarily():
                    _mask_entries(host.sliding, faked.sliding)
                    _mask_entries(host.full, faked.full)
            cache[key] = faked
        return cache[key]

    return masks


class _ModuleStack:
    """Which module is running (global forward hooks), to name it when the step fails."""

    def __init__(self, model):
        import torch.nn.modules.module as module

        self.names = {id(m): (n or "model", type(m).__name__) for n, m in model.named_modules()}
        self.stack: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None
        self._handles = [module.register_module_forward_pre_hook(self._push),
                         module.register_module_forward_hook(self._pop)]

    def _push(self, mod, args):
        if id(mod) in self.names:
            self.stack.append(self.names[id(mod)])

    def _pop(self, mod, args, out):
        if id(mod) in self.names and self.stack:
            self.stack.pop()

    def where(self) -> str:
        if not self.stack:
            return "the training step"
        name, kind = self.stack[-1]
        return f"{name} ({kind})"

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _rank_batch(cfg, dims, grad_accum: int):
    """This rank's part of one global batch, as the data loader hands it over (host tensors):
    local_batch_size x grad_accum sequences; every label trained."""
    import torch

    rows, seq = cfg.training.local_batch_size * grad_accum, cfg.training.seq_len
    batch = {"tokens": torch.zeros(rows, seq, dtype=torch.long),
             "labels": torch.zeros(rows, seq, dtype=torch.long),
             "positions": torch.arange(seq).expand(rows, seq).contiguous()}
    if cfg.data.document_mask:
        batch["document_ids"] = torch.zeros(rows, seq, dtype=torch.long)
    return batch


def _build_trainer(cfg, dims, model_args, rank: int, device):
    """A Trainer with the real model, runner, optimizer and lr schedule, and nothing of the
    run around them (no data loader, checkpoints, metrics or dump folder)."""
    from runtime.model.moe import moe_layers
    from runtime.train.checkpoint.manager import Progress
    from runtime.train.config.job import step_batch
    from runtime.train.optim import build_lr_scheduler, build_optimizer
    from runtime.train.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.cfg, t.model_args, t.dims, t.device = cfg, model_args, dims, device
    t.world_size, t.rank, t.local_rank = dims.world_size, rank, 0
    t.lora_spec = cfg.lora_spec()  # as Trainer.__init__ (None without [lora] enable)
    t.progress, t.last_trained_tokens = Progress(), 0  # step, tokens_seen, skipped_steps
    t.grad_accum, t.global_batch = step_batch(cfg, dims.dp)
    t._build_model()
    t.optimizer = build_optimizer(t.model, cfg.optimizer, device)
    t.lr_scheduler = build_lr_scheduler(t.optimizer, cfg.lr_scheduler, cfg.training.steps)
    for moe in moe_layers(t.model):  # as Trainer._build_training_state
        moe.aux_loss_scale = 1.0 / (t.grad_accum * t.runner.microbatches)
    # stand-in: every label of the global batch is trained (the real count is an all-reduce
    # read back with .item())
    t._global_trained_tokens = lambda batch: batch["labels"].numel() * dims.dp
    return t


def _tracker(trainer):
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    class _HopAware:
        # flex attention is a higher-order op: let it through the dispatch mode
        supports_higher_order_operators = True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if _PROPAGATING[0]:  # DTensor's shape propagation: global-size scratch, not memory
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    if isinstance(trainer.model, FSDPModule):
        tracker = type("Tracker", (_HopAware, FSDPMemTracker), {})(trainer.model, trainer.optimizer)
    else:
        tracker = type("Tracker", (_HopAware, MemTracker), {})()
        tracker.track_external(trainer.model, trainer.optimizer)
    # MemTracker hooks every parameter's gradient, which torch refuses for a frozen one (a
    # LoRA base): mark those as hooked already (they never get a gradient to track).
    for p in trainer.model.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NO_HOOK, _NO_HOOK)
    return tracker


class _NoHook:
    def remove(self) -> None:
        pass


_NO_HOOK = _NoHook()


def _reset_module_stats_per_forward(runner, tracker) -> None:
    """FSDPMemTracker refuses a second forward of the root module (gradient accumulation
    micro-batches) unless its per-module statistics are cleared; the peak is kept."""
    forward_backward = runner.forward_backward

    def tracked(*args, **kwargs):
        tracker.reset_mod_stats()
        return forward_backward(*args, **kwargs)

    runner.forward_backward = tracked


# Score entries (query x key pairs, per batch row and head) that flex attention computes for
# a block mask, keyed by id() of its faked kv_num_blocks tensor (filled by _host_masks: the
# fake tensors have no values to count).
_MASK_ENTRIES: dict[int, int] = {}


def _mask_entries(host, faked) -> None:
    rows_q, rows_kv = host.BLOCK_SIZE if isinstance(host.BLOCK_SIZE, tuple) else (host.BLOCK_SIZE,) * 2
    blocks = int(host.kv_num_blocks[0, 0].sum())
    if host.full_kv_num_blocks is not None:
        blocks += int(host.full_kv_num_blocks[0, 0].sum())
    _MASK_ENTRIES[id(faked.kv_num_blocks)] = blocks * rows_q * rows_kv


def _flex_entries(args) -> int | None:
    for a in args:
        if isinstance(a, tuple):
            for t in a:
                if id(t) in _MASK_ENTRIES:
                    return _MASK_ENTRIES[id(t)]
    return None


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """torch._grouped_mm: [M, K] x [E, K, N] -> [M, N] (forward, input gradient) or
    [K, M] x [M, N] -> [E, K, N] (weight gradient, groups along M): 2 M K N either way."""
    if len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _addmm_flops(bias_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """addmm, also its out_dtype overload (torch's formula takes out_dtype for out_shape)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _count_flops(trainer, batch) -> float:
    """FLOPs of one more optimizer step on this rank (torch's FlopCounterMode), activation
    checkpointing off (the MFU formula counts no recomputation). Counted beyond torch's
    registry: torch._grouped_mm, and flex attention as the block mask's computed entries
    (2 matmuls forward, 4 backward, 2 FLOPs per multiply-add; partial blocks count whole)."""
    import torch
    from torch._higher_order_ops.flex_attention import flex_attention, flex_attention_backward
    from torch.utils import flop_counter

    mode_cls = flop_counter._FlopCounterMode
    handle = mode_cls._handle_higher_order_ops

    def handle_flex(mode, func, types, args, kwargs):
        if func not in (flex_attention, flex_attention_backward):
            return handle(mode, func, types, args, kwargs)
        out = func(*args, **kwargs)
        entries = _flex_entries(args)
        if entries is not None:
            q = args[0]  # [B, H, S, D]
            flops = (4 if func is flex_attention else 8) * q.shape[0] * q.shape[1] * q.shape[3] * entries
            for parent in set(mode.counter.mod_tracker.parents):
                mode.counter.flop_counts[parent][func] += flops
        return out

    blocks = [b for b in trainer.model.modules() if hasattr(b, "activation_checkpoint")]
    saved = [b.activation_checkpoint for b in blocks]
    mode_cls._handle_higher_order_ops = handle_flex
    try:
        for b in blocks:
            b.activation_checkpoint = "none"
        mapping = {torch.ops.aten._grouped_mm: _grouped_mm_flops,
                   torch.ops.aten.addmm: _addmm_flops}
        with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            trainer.optimizer_step(batch)
    finally:
        mode_cls._handle_higher_order_ops = handle
        for b, mode in zip(blocks, saved):
            b.activation_checkpoint = mode
    return float(counter.get_total_flops())


def _peak(tracker, device) -> tuple[int, dict[str, int]]:
    snapshot = tracker.get_tracker_snapshot("peak")
    stats = snapshot.get(device) or next(iter(snapshot.values()), {})
    by_kind = {str(getattr(k, "value", k)): int(v) for k, v in stats.items() if k != "Total"}
    return int(stats.get("Total", sum(by_kind.values()))), by_kind


def trace(cfg, dims, model_args, rank: int = 0, steps: int = 2, imbalance: float = 1.0,
          count_flops: bool = True) -> TraceResult:
    """Run `steps` training steps of rank `rank` on fake CUDA tensors; raises DryRunError
    (one line naming the module) when the step fails."""
    fake_cuda.install()
    import torch
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    from runtime.train.metrics import training_flops_per_token

    start = time.perf_counter()
    cfg = traceable_config(cfg)
    if dims.pp > 1:
        # Tried (torch 2.13): every schedule's first step runs _initialize_pp_stages, whose
        # P2P warm-up vote reads a tensor received from the neighbour stage with .item() and
        # whose shape inference exchanges metadata between stages: neither has values here.
        raise DryRunError("pipeline parallelism cannot be traced: the schedules' start-up (a "
                          "P2P warm-up vote read with .item(), shape metadata exchanged between "
                          "stages) needs values from other ranks, which the fake process group "
                          "does not deliver")
    if dist.is_initialized():
        raise RuntimeError("the dry run needs its own process: a process group already exists")
    device = torch.device("cuda", 0)
    dist.init_process_group("fake", rank=rank, world_size=dims.world_size, store=FakeStore())
    modules = None
    try:
        with StandIns(imbalance), FakeTensorMode(allow_non_fake_inputs=True):
            trainer = _build_trainer(cfg, dims, model_args, rank, device)
            modules = _ModuleStack(trainer.model)
            batch = _rank_batch(cfg, dims, trainer.grad_accum)
            tracker = _tracker(trainer)
            _reset_module_stats_per_forward(trainer.runner, tracker)
            with tracker:
                for _ in range(steps):
                    trainer.step += 1
                    trainer.optimizer_step(batch)
            peak, by_kind = _peak(tracker, device)
            flops = _count_flops(trainer, batch) if count_flops else None
    except DryRunError:
        raise
    except Exception as e:  # a bug of the traced code: one line naming where
        where = modules.where() if modules is not None else "building the model"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DryRunError(f"dry run failed in {where}: {type(e).__name__}: {first}") from e
    finally:
        if modules is not None:
            modules.close()
        dist.destroy_process_group()
    tokens = cfg.training.local_batch_size * trainer.grad_accum * cfg.training.seq_len
    formula = training_flops_per_token(model_args, cfg.training.seq_len,
                                       frozen_base=cfg.lora_spec() is not None) * tokens
    return TraceResult(rank=rank, steps=steps, peak_bytes=peak, by_kind=by_kind,
                       tokens_per_step=tokens, flops=flops, flops_formula=formula,
                       seconds=time.perf_counter() - start)


def format_trace(result: TraceResult, plan_bytes: float) -> list[str]:
    """The report lines; the last one is exactly `trace: peak <x> GiB, plan <y> GiB, ratio <r>`."""
    lines = [f"dry run: rank {result.rank}, {result.steps} steps on fake CUDA tensors, "
             f"{result.seconds:.1f}s",
             "  covered: " + "; ".join(COVERED),
             "  not run: " + "; ".join(NOT_RUN),
             "  at the peak: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in
                                           sorted(result.by_kind.items(), key=lambda kv: -kv[1])
                                           if v) + " GiB"]
    if result.flops is not None and result.flops_formula:
        lines.append(f"  flops: traced {result.flops:.4g} per step on this rank, MFU formula "
                     f"{result.flops_formula:.4g}, ratio {result.flops / result.flops_formula:.3f}")
    peak = result.peak_bytes / GIB
    plan = plan_bytes / GIB
    ratio = peak / plan if plan > 0 else math.inf
    lines.append(f"trace: peak {peak:.2f} GiB, plan {plan:.2f} GiB, ratio {ratio:.3f}")
    return lines
