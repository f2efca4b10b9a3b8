"""DualPipeV with expert parallelism: overlap the EP all-to-alls of one microbatch with the
compute of another.

DualPipeV's steady state is made of OVERLAP_F_B actions: the forward of microbatch f on one
of the rank's stages and the full backward of microbatch b on the other. torch runs the two
sub-actions one after the other. `EPOverlap` (registered with
`schedule.register_custom_function(OVERLAP_F_B, ...)`) runs them as two roles, F (the forward,
in the schedule's own thread) and B (the backward, in a helper thread), that take turns.

Hand-over protocol (`HandOver`):
- Exactly one role runs at any time; F starts. A role gives the turn to the other at each of
  its hand-over points and waits until the turn comes back. When a role finishes, the other
  one keeps the turn and its remaining hand-over points do nothing.
- The hand-over points are the tensors `ExpertParallel.run` passes through right before and
  right after each all-to-all (`sync_point`, an identity autograd function, so it also fires
  in backward). A role hands over at the point that execution reaches just after a
  collective: in forward after the dispatch and after the combine, in backward (reverse
  order) after the combine's and after the dispatch's reverse all-to-all. Each segment a role
  runs is therefore "compute, then issue one all-to-all", and the next segment is the other
  role's: F's dispatch is in flight while B computes its experts' backward, and so on.
- The role of a point is B when it fires inside a backward pass (autograd's current graph
  task: B's backward nodes, and forward recomputation by activation checkpointing during that
  backward), F otherwise. This does not depend on which thread runs it (on GPU, autograd runs
  backward nodes in its own device thread).

Why this is deadlock-free: every rank of an EP group holds the same pipeline stages (EP
borrows data/context-parallel ranks, never pipeline ranks), so it runs the same actions on
the same graphs and meets the same hand-over points in the same order. With one role running
at a time, each rank issues its collectives -- the EP all-to-alls of both roles, and the
FSDP / CP collectives in between -- in one and the same total order. The schedule's own
pipeline send/recv stay outside (waited for before the two roles start).

Failures: a role that raises marks the hand-over failed; the other role stops at its next
hand-over point (or before starting) instead of issuing more collectives, and the schedule
thread re-raises the first real error after joining the helper thread.

Numerics: every operation runs exactly as in the sequential order (same inputs, same
kernels, same accumulation order into each stage's gradients), so on CPU the results are
bit-identical to DualPipeV without the overlap (gloo collectives block: nothing overlaps
there, the CPU run proves numbers and turn order).

On GPU (NCCL) the overlap is in the kernel queues, not in the host threads: a role issues
its all-to-all on NCCL's stream and hands over, and the other role queues its kernels on
the compute stream (the helper thread uses the schedule thread's stream). The forward
all-to-alls return tensors that are waited for lazily (AsyncCollectiveTensor, at their
first use in F's next segment), so B's queued kernels run while they are in flight. The
backward ones too: under the overlap `ExpertParallel` uses `_AllToAllLazyGrad`, whose
backward hands on the reverse all-to-all un-waited (torch's own autograd all-to-all waits
at once, queueing F's next kernels behind it). The per-layer exchange of split sizes
(`ExpertParallel.run`, a host sync) still waits for the kernels queued before it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.distributed.pipelining.schedules import _ComputationType, _wait_batch_p2p

from runtime.model.moe import moe_layers

F, B = "F", "B"
_OTHER = {F: B, B: F}
# Hand over after the all-to-all in execution order: forward reaches the "after_*" point just
# after the collective, backward reaches the "before_*" point just after the reverse one.
_HAND_OVER_FORWARD = ("after_dispatch", "after_combine")
_HAND_OVER_BACKWARD = ("before_dispatch", "before_combine")


class PeerRoleFailed(RuntimeError):
    """The other role of the overlapped action raised; this one stops (no more collectives)."""


class HandOver:
    """The turn between the F and B roles of one overlapped action (see the module doc)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._turn = F
        self._done = {F: False, B: False}
        self._failed = False
        self.trace: list[str] = []  # "F:after_dispatch", ... in the order the turn passed

    def wait_for_turn(self, role: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == role or self._failed)
            self._check(role)

    def hand_over(self, role: str, where: str) -> None:
        """Give the turn to the other role and wait until it comes back."""
        with self._cond:
            self._check(role)
            other = _OTHER[role]
            if self._done[other]:
                return  # nobody to hand over to: keep running
            self.trace.append(f"{role}:{where}")
            self._turn = other
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._turn == role or self._failed)
            self._check(role)

    def finish(self, role: str, failed: bool = False) -> None:
        with self._cond:
            self._done[role] = True
            self._failed = self._failed or failed
            self._turn = _OTHER[role]
            self._cond.notify_all()

    def _check(self, role: str) -> None:
        if self._failed:
            raise PeerRoleFailed(f"DualPipeV EP overlap: the {_OTHER[role]} role failed")


# The hand-over of the overlapped action in progress (one schedule runs at a time per
# process); None outside OVERLAP_F_B actions, where the sync points do nothing.
_active: HandOver | None = None


def _current_role() -> str:
    # Inside a backward pass (B's nodes, or checkpoint recomputation during it) -> B.
    return B if torch._C._current_graph_task_id() != -1 else F


def _maybe_hand_over(where: str, points: tuple[str, ...]) -> None:
    hand_over = _active
    if hand_over is not None and where in points:
        hand_over.hand_over(_current_role(), where)


class _SyncPoint(torch.autograd.Function):
    """Identity; a possible hand-over point in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, where: str) -> torch.Tensor:
        ctx.where = where
        _maybe_hand_over(where, _HAND_OVER_FORWARD)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _maybe_hand_over(ctx.where, _HAND_OVER_BACKWARD)
        return grad, None


@torch.compiler.disable  # thread hand-over: always eager (a graph break in compiled blocks)
def sync_point(x: torch.Tensor, where: str) -> torch.Tensor:
    """`ExpertParallel.sync_point`: where is before_/after_ + dispatch/combine."""
    return _SyncPoint.apply(x, where)


# --------------------------------------------------------------------------- the schedule hook

@dataclass
class OverlapStats:
    """What the overlap did (for logs and tests): overlapped actions, hand-overs per role,
    whether every action alternated F, B, F, B, ... and the last action's hand-over trace."""

    actions: int = 0
    hand_overs: dict = field(default_factory=lambda: {F: 0, B: 0})
    always_alternated: bool = True
    last_trace: list = field(default_factory=list)

    def add(self, trace: list[str]) -> None:
        roles = [entry.split(":", 1)[0] for entry in trace]
        self.actions += 1
        for role in roles:
            self.hand_overs[role] += 1
        # F starts; the turn passes back and forth until one role has no point left.
        pairs = 2 * min(roles.count(F), roles.count(B))
        self.always_alternated &= roles[:pairs] == [F, B] * (pairs // 2)
        self.last_trace = list(trace)


class EPOverlap:
    """The custom OVERLAP_F_B function: F and B sub-actions as two roles taking turns."""

    def __init__(self, device: torch.device, save_forward_output: bool = True):
        # save_forward_output: whether the schedule keeps last-stage outputs (step's
        # return_outputs, which the custom function's context does not carry).
        self.device = device
        self.save_forward_output = save_forward_output
        self.stats = OverlapStats()

    def __call__(self, action, ctx) -> None:
        schedule = ctx.schedule_ref
        stages = {stage.stage_index: stage for stage in schedule._stages}
        fwd, bwd = _split(action)
        run_forward = self._prepare_forward(schedule, stages, fwd, ctx)
        run_backward = self._prepare_backward(schedule, stages, bwd)
        self.stats.add(self._run_roles(run_forward, run_backward))

    # The preparation (waiting for received inputs, loss lookup, backward counting) runs in
    # the schedule thread before either role starts, exactly as torch's own OVERLAP_F_B path.
    def _prepare_forward(self, schedule, stages, action, ctx) -> Callable[[], None]:
        index, mb = action.stage_index, action.microbatch_index
        stage = stages[index]
        schedule._assert_unsharded(stage)
        if not stage.is_first and index - 1 not in stages:  # else: local input (V)
            _wait_batch_p2p(_pop_recv(schedule.fwd_recv_ops, index, mb, action))

        def run() -> None:
            output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb],
                                             save_forward_output=self.save_forward_output)
            schedule._maybe_compute_loss(stage, output, ctx.target_mbs, mb)
            if index + 1 in stages:
                stages[index + 1].set_local_fwd_input(output, mb)

        return run

    def _prepare_backward(self, schedule, stages, action) -> Callable[[], None]:
        index, mb = action.stage_index, action.microbatch_index
        stage = stages[index]
        schedule._assert_unsharded(stage)
        if not stage.is_last and index + 1 not in stages:  # else: local gradient (V)
            _wait_batch_p2p(_pop_recv(schedule.bwd_recv_ops, index, mb, action))
        loss = schedule._maybe_get_loss(stage, mb)
        schedule.backward_counter[index] += 1
        last_backward = schedule.backward_counter[index] == schedule._n_microbatches

        def run() -> None:
            stage.backward_one_chunk(mb, loss=loss, full_backward=True,
                                     last_backward=last_backward)
            if index - 1 in stages:
                stages[index - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)

        return run

    def _run_roles(self, run_forward, run_backward) -> list[str]:
        """F in this thread, B in a helper thread, taking turns; re-raises a role's error."""
        global _active
        hand_over = HandOver()
        errors: dict[str, BaseException] = {}
        setup = _thread_setup(self.device)

        def backward_role() -> None:
            try:
                setup()
                hand_over.wait_for_turn(B)
                run_backward()
            except BaseException as err:  # noqa: BLE001 - re-raised by the schedule thread
                errors[B] = err
                hand_over.finish(B, failed=True)
            else:
                hand_over.finish(B)

        _active = hand_over
        thread = threading.Thread(target=backward_role, name="dualpipev-backward", daemon=True)
        try:
            thread.start()
            try:
                run_forward()
            except BaseException as err:  # noqa: BLE001
                errors[F] = err
                hand_over.finish(F, failed=True)
            else:
                hand_over.finish(F)
            thread.join()
        finally:
            _active = None
        _raise_first_real_error(errors)
        return hand_over.trace


def _split(action):
    """(FORWARD, FULL_BACKWARD) sub-actions of an OVERLAP_F_B action (as DualPipeV builds it)."""
    subs = action.sub_actions or ()
    kinds = tuple(sub.computation_type for sub in subs)
    if kinds != (_ComputationType.FORWARD, _ComputationType.FULL_BACKWARD):
        raise RuntimeError(f"DualPipeV EP overlap expects OVERLAP_F_B = (FORWARD, FULL_BACKWARD), "
                           f"got {action!r}")
    return subs


def _pop_recv(ops: dict, index: int, mb: int, action):
    if (index, mb) not in ops:
        raise RuntimeError(f"DualPipeV EP overlap: {action!r} runs before its input arrived")
    return ops.pop((index, mb))


def _thread_setup(device: torch.device) -> Callable[[], None]:
    """What the helper thread must share with the schedule thread: intra-op threads (their
    number can change CPU reduction order) and, on accelerators, device and stream (both
    thread-local)."""
    num_threads = torch.get_num_threads()
    stream = None
    if device.type != "cpu":
        stream = torch.accelerator.current_stream(device)

    def setup() -> None:
        torch.set_num_threads(num_threads)
        if stream is not None:
            torch.accelerator.set_device_index(device)
            torch.accelerator.set_stream(stream)

    return setup


def _raise_first_real_error(errors: dict[str, BaseException]) -> None:
    """A role's own error wins over the other role's PeerRoleFailed (which torch may have
    wrapped, e.g. the stage's "failed to run forward" RuntimeError)."""
    real = [e for e in (errors.get(B), errors.get(F)) if e is not None
            and not _caused_by_peer(e)]
    if real:
        raise real[0]
    if errors:
        raise next(iter(errors.values()))


def _caused_by_peer(err: BaseException | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, PeerRoleFailed):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


# --------------------------------------------------------------------------- wiring

def supports_custom_overlap(schedule) -> bool:
    """torch 2.11 and 2.13 both have it; older builds run DualPipeV without the overlap."""
    return hasattr(schedule, "register_custom_function")


def enable_ep_overlap(schedule, model_parts, device: torch.device,
                      save_forward_output: bool = True) -> EPOverlap:
    """Register the overlap on a DualPipeV schedule and put the sync points into every
    expert-parallel MoE layer of the rank's stages."""
    overlap = EPOverlap(device, save_forward_output)
    schedule.register_custom_function(_ComputationType.OVERLAP_F_B, overlap)
    for part in model_parts:
        for moe in moe_layers(part):
            if moe.expert_parallel is not None:
                moe.expert_parallel.sync_point = sync_point
    return overlap
