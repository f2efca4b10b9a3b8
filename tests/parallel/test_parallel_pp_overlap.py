"""The DualPipeV EP-overlap hand-over (runtime/parallel/dualpipe_overlap.py), in one process.

A forward role (F) and a backward role (B) run through toy "MoE layers" that pass the same
four sync points as `ExpertParallel.run` (before/after the dispatch and the combine
all-to-all), with identity autograd functions logging each piece of work in forward and in
backward. The expected interleaving is spelled out: F computes and issues its dispatch, then
B issues its combine's reverse all-to-all, F computes the experts and issues the combine, B
computes the experts' backward and issues the dispatch's reverse, ... -- each role's segment
ends right after an all-to-all. Also: gradients are unchanged, the points do nothing outside
an overlapped action, a role with more points than the other finishes alone, and an error in
either role is raised by the schedule thread without a hang (the other role stops at its
next hand-over). The multi-process parity runs are in test_parallel_pp.py.
"""

from __future__ import annotations

import threading

import pytest
import torch

from runtime.parallel import dualpipe_overlap as dpo


class _Log(torch.autograd.Function):
    """Identity that logs ("fwd"|"bwd", name) when it runs in forward and in backward."""

    @staticmethod
    def forward(ctx, x, log, name):
        ctx.log, ctx.name = log, name
        log.append(f"fwd {name}")
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(f"bwd {ctx.name}")
        return grad, None, None


def _moe_like(x: torch.Tensor, log: list, layer: int) -> torch.Tensor:
    """The order of ExpertParallel.run: compute, dispatch all-to-all, experts, combine."""
    x = _Log.apply(x, log, f"attn{layer}")
    x = dpo.sync_point(x, "before_dispatch")
    x = _Log.apply(x, log, f"dispatch{layer}")
    x = dpo.sync_point(x, "after_dispatch")
    x = _Log.apply(x, log, f"experts{layer}") * 2
    x = dpo.sync_point(x, "before_combine")
    x = _Log.apply(x, log, f"combine{layer}")
    return dpo.sync_point(x, "after_combine")


def _model(x: torch.Tensor, log: list, layers: int) -> torch.Tensor:
    for layer in range(layers):
        x = _moe_like(x, log, layer)
    return x.sum()


def _run_roles(run_forward, run_backward, timeout: float = 20.0):
    """EPOverlap._run_roles in a watchdog thread: a hang fails the test instead of blocking."""
    overlap = dpo.EPOverlap(torch.device("cpu"))
    result: dict = {}

    def target():
        try:
            result["trace"] = overlap._run_roles(run_forward, run_backward)
        except BaseException as err:  # noqa: BLE001 - inspected by the test
            result["error"] = err

    watchdog = threading.Thread(target=target, daemon=True)
    watchdog.start()
    watchdog.join(timeout)
    assert not watchdog.is_alive(), "the overlapped action hung"
    assert dpo._active is None
    return result


def _prepared_backward(layers: int):
    """A graph built earlier (outside any overlapped action, like an earlier microbatch's
    forward): its sync points exist and fire in B's backward."""
    b_log: list = []
    leaf = torch.ones(3, requires_grad=True)
    loss = _model(leaf, b_log, layers)
    b_log.clear()
    return leaf, loss, b_log


@pytest.mark.parametrize("f_layers, b_layers", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_roles_alternate_after_each_all_to_all(f_layers, b_layers):
    log: list = []
    leaf, loss, log = _prepared_backward(b_layers)  # B's graph logs into `log` too
    f_input = torch.ones(3, requires_grad=True)
    result = _run_roles(lambda: _model(f_input, log, f_layers),
                        lambda: loss.backward())
    assert "error" not in result, result

    # Each role's segments: F = [attn, dispatch], [experts, combine], [next attn, dispatch],
    # ...; B (reverse) = [combine], [experts, dispatch], [attn, next combine], ...
    f_segments = []
    for layer in range(f_layers):
        f_segments += [[f"fwd attn{layer}", f"fwd dispatch{layer}"],
                       [f"fwd experts{layer}", f"fwd combine{layer}"]]
    b_segments, pending = [], []
    for layer in reversed(range(b_layers)):
        b_segments.append(pending + [f"bwd combine{layer}"])
        b_segments.append([f"bwd experts{layer}", f"bwd dispatch{layer}"])
        pending = [f"bwd attn{layer}"]
    b_segments.append(pending)
    expected = []
    while f_segments or b_segments:  # F first, then strictly alternating
        expected += f_segments.pop(0) if f_segments else []
        if not f_segments:
            expected += [e for seg in b_segments for e in seg]
            break
        expected += b_segments.pop(0) if b_segments else []
        if not b_segments:
            expected += [e for seg in f_segments for e in seg]
            break
    assert log == expected
    roles = [entry.split(":")[0] for entry in result["trace"]]
    assert roles == ["F", "B"] * (len(roles) // 2) + (["F"] if len(roles) % 2 else [])
    assert torch.equal(leaf.grad, torch.full((3,), 2.0 ** b_layers))


def test_sync_points_do_nothing_outside_an_overlapped_action():
    x = torch.ones(3, requires_grad=True)
    log: list = []
    _model(x, log, 2).backward()
    assert torch.equal(x.grad, torch.full((3,), 4.0))
    assert log[:8] == ["fwd attn0", "fwd dispatch0", "fwd experts0", "fwd combine0",
                       "fwd attn1", "fwd dispatch1", "fwd experts1", "fwd combine1"]


def test_an_error_in_the_backward_role_is_raised_and_stops_the_forward_role():
    log: list = []
    f_input = torch.ones(3, requires_grad=True)

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            raise ValueError("backward failed")

    leaf = torch.ones(3, requires_grad=True)
    loss = Boom.apply(_moe_like(leaf, [], 0)).sum()
    result = _run_roles(lambda: _model(f_input, log, 3), lambda: loss.backward())
    assert isinstance(result["error"], ValueError) and "backward failed" in str(result["error"])
    # F handed over once (after its first dispatch), then stopped instead of going on.
    assert log == ["fwd attn0", "fwd dispatch0"]


def test_an_error_in_the_forward_role_is_raised_and_the_backward_role_never_runs():
    leaf, loss, b_log = _prepared_backward(1)

    def forward():
        raise KeyError("forward failed")

    result = _run_roles(forward, lambda: loss.backward())
    assert isinstance(result["error"], KeyError)
    assert b_log == [] and leaf.grad is None


def _wrapped(fn, what):
    """Like PipelineStage.forward_one_chunk / stage_backward: errors re-raised as
    RuntimeError(...) from the original."""
    def run():
        try:
            fn()
        except Exception as err:
            raise RuntimeError(f"stage failed to run {what}") from err
    return run


def test_a_late_error_in_the_forward_role_wins_over_the_stopped_backward_role():
    """F fails after two hand-overs while B waits inside its backward pass: B stops there
    (PeerRoleFailed raised through autograd, then wrapped by the stage) and F's own error
    is the one raised."""
    leaf, loss, b_log = _prepared_backward(2)

    def forward():
        _moe_like(torch.ones(3, requires_grad=True), [], 0)
        raise KeyError("forward failed late")

    result = _run_roles(_wrapped(forward, "forward"), _wrapped(loss.backward, "backward"))
    assert str(result["error"]) == "stage failed to run forward"
    assert isinstance(result["error"].__cause__, KeyError)
    assert b_log == ["bwd combine1", "bwd experts1", "bwd dispatch1"]  # two B segments only


def test_hand_over_protocol_directly():
    """Turn order and failure without autograd: the roles' own calls."""
    hand_over = dpo.HandOver()
    order: list = []

    def b_role():
        hand_over.wait_for_turn(dpo.B)
        order.append("B1")
        hand_over.hand_over(dpo.B, "before_combine")
        order.append("B2")
        hand_over.finish(dpo.B)

    thread = threading.Thread(target=b_role, daemon=True)
    thread.start()
    order.append("F1")
    hand_over.hand_over(dpo.F, "after_dispatch")
    order.append("F2")
    hand_over.hand_over(dpo.F, "after_combine")  # B finishes meanwhile
    order.append("F3")
    hand_over.hand_over(dpo.F, "after_dispatch")  # nobody left: keeps running
    order.append("F4")
    hand_over.finish(dpo.F)
    thread.join(5)
    assert order == ["F1", "B1", "F2", "B2", "F3", "F4"]
    assert hand_over.trace == ["F:after_dispatch", "B:before_combine", "F:after_combine"]

    failed = dpo.HandOver()
    failed.finish(dpo.F, failed=True)
    with pytest.raises(dpo.PeerRoleFailed, match="F role failed"):
        failed.wait_for_turn(dpo.B)


def test_sync_points_in_compiled_code_still_hand_over():
    """Per-block torch.compile: each sync point is a graph break (compiler.disable), so the
    compiled pieces run between hand-overs and the gradients match eager."""

    def layer(x):
        x = torch.sin(x)
        x = dpo.sync_point(x, "before_dispatch")
        x = dpo.sync_point(x * 3, "after_dispatch")
        x = dpo.sync_point(torch.cos(x), "before_combine")
        return dpo.sync_point(x + 1, "after_combine").sum()

    compiled = torch.compile(layer, backend="aot_eager")
    leaf, f_input = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    loss = compiled(leaf)
    result = _run_roles(lambda: compiled(f_input), lambda: loss.backward())
    assert result.get("trace") == ["F:after_dispatch", "B:before_combine", "F:after_combine",
                                   "B:before_dispatch"], result
    eager = torch.ones(3, requires_grad=True)
    layer(eager).backward()
    assert torch.equal(leaf.grad, eager.grad)


class _ProbeGrad(torch.autograd.Function):
    """Identity; records the type of the gradient arriving in backward, then materialises it."""

    @staticmethod
    def forward(ctx, x, seen):
        ctx.seen = seen
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.seen.append(type(grad).__name__)
        return grad * 1, None


def test_overlap_all_to_all_hands_on_its_backward_unwaited(tmp_path):
    """Under the overlap the EP all-to-all's backward returns the reverse all-to-all's result
    un-waited (AsyncCollectiveTensor): the backward role can hand over while it is in flight
    (GPU). Values are those of torch's autograd all-to-all (world of 1 here: identity)."""
    import torch.distributed as dist

    from runtime.parallel.expert_parallel import _all_to_all_lazy_grad

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        x = torch.randn(6, 4, requires_grad=True)
        seen: list[str] = []
        y = _all_to_all_lazy_grad(_ProbeGrad.apply(x, seen), [6], [6], dist.group.WORLD)
        probe = torch.randn(6, 4)
        (y * probe).sum().backward()
        assert seen == ["AsyncCollectiveTensor"]
        torch.testing.assert_close(x.grad, probe, rtol=0, atol=0)
        torch.testing.assert_close(y, x.detach(), rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
