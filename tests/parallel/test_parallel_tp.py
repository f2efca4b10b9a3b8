"""Tensor parallelism (sequence parallel, loss parallel, sinks by head, replicated router with
TP-reduced gradients, experts sharded along F) matches the single-process run on CPU (gloo).

Runs (tiny flavor, seq_len 32, fp32, 1 thread per rank, 3 optimizer steps, global batch 4,
same seed checkpoint):
  reference   1 process (with and without the auxiliary balance loss)
  tp2         TP=2, loss parallel (vocab-sharded logits into cross entropy), aux loss 0.01
  tp2_gather  TP=2, parallelism.disable_loss_parallel=true (logits gathered), aux loss 0.01
  fsdp2_tp2   FSDP=2 x TP=2 on 4 ranks (2-D parameters: Shard(0) over dp_shard, TP over tp),
              aux loss off: the switch aux loss is a product of per-batch means, so with
              data parallelism (each rank averages its own half batch) it is a different
              loss than on the whole batch (observed ~8% off in router grads) -- a property
              of the per-microbatch aux loss, independent of TP. The TP-only runs hold the
              whole batch on every rank and so check the aux loss's 1/tp scaling exactly.
  tp2_compile, fsdp2_tp2_compile
              the tp2 / fsdp2_tp2 runs with per-block torch.compile (dynamo + AOTAutograd,
              aot_eager backend through the harness hook; inductor's C++ codegen costs minutes
              on a small CPU). fp32: the MoE takes the per-expert loop under compile (one graph
              break at its host sync), the reference the grouped path; same tolerances
              (observed: losses ~2e-7, grad norms ~2e-5 relative, parameters ~1e-7,
              first-step gradients ~8e-7 relative). Also checked by hand with inductor (TP=2:
              the same numbers). Not with activation_checkpoint.mode=full: on CPU in fp32 the
              checkpointed block body has the loop's host sync, and a graph break inside the
              checkpoint runs the whole block eagerly (0 compiled graphs), so that run would
              not test compile.
Compared per step: losses, grad norms; after the steps: every parameter (full tensors); and,
after the first backward (before clipping), the full gradient of every parameter, with the
router gate and the attention sinks checked by name.

Tolerances (parallel_harness.assert_parity defaults): losses 1e-5 relative (observed ~2e-7),
grad norms 1e-4 relative (observed ~2e-5: fp32 norm rounding of the large output head, see
the harness), parameters |diff| <= 1e-6 + 1e-5 |ref| (observed ~6e-8). First-step gradients:
max |diff| <= 1e-5 x max |ref| per tensor (tests/helpers/tolerances.py: fp32 sums in another order
round differently on another CPU, so the bound follows the tensor's scale, not each element;
observed ~1e-8 absolute; TP changes summation order only).

The checks can fail: `test_broken_tp_moe_is_caught` reruns TP=2 once with the router-gradient
all-reduce removed (the peer's divergence bug) and once with the second expert bias added on
every TP rank, and asserts that the gradient comparison (naming the parameter) and the
parity comparison both reject each run.

Runtime on a 2-core machine: 70-160 s depending on load (10 runs: 2 single-process, 6 on
2 ranks, 2 on 4 ranks, each ~3-10 s plus process start-up; the compiled ones ~15-35 s).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from parallel_harness import (
    GLOBAL_BATCH,
    STEPS,
    assert_parity,
    compile_with_aot_eager,
    global_batch_overrides,
    run_distributed,
    run_single,
    summarize,
)
from tolerances import scaled_error
TP2 = ["--parallelism.tensor_parallel_degree=2", "--parallelism.data_parallel_shard_degree=1"]
GRAD_DUMP_ENV = "TP_TEST_GRAD_DUMP"
GRAD_REL = 1e-5  # of each gradient's largest value
AUX = ["--model.aux_loss_coeff=0.01"]


# --------------------------------------------------------------------------- hooks (in ranks)

def record_first_grads(rank: int, world_size: int):
    """Hook: rank 0 saves the full (unsharded) gradient of every parameter after the first
    backward, before clipping, and whether the loss saw vocab-sharded (DTensor) logits."""
    out = Path(os.environ[GRAD_DUMP_ENV])

    def on_trainer(trainer):
        seen = {"dtensor_logits": []}

        def record_logits(module, args, logits):
            seen["dtensor_logits"].append(hasattr(logits, "placements"))

        trainer.model.output.register_forward_hook(record_logits)
        clip = trainer.clip_grad_norm_

        def clip_and_record():
            if trainer.step == 1:
                grads = {}
                for name, p in trainer.model.named_parameters():
                    g = p.grad
                    if g is not None and hasattr(g, "full_tensor"):
                        g = g.full_tensor()  # collective: every rank takes part
                    grads[name] = None if g is None else g.detach().to(torch.float32).clone()
                if rank == 0:
                    torch.save({"grads": grads, **seen}, out)
            return clip()

        trainer.clip_grad_norm_ = clip_and_record

    return on_trainer


def compiled_record_first_grads(rank: int, world_size: int):
    """Hook: per-block torch.compile with the aot_eager backend (parallel_harness) and
    record_first_grads."""
    compile_with_aot_eager(rank, world_size)
    return record_first_grads(rank, world_size)


def router_grad_not_reduced(rank: int, world_size: int):
    """Hook (negative control, the peer's bug): each TP rank keeps its partial router
    gradient (no all-reduce over TP), so the replicated router weights diverge."""
    on_trainer = record_first_grads(rank, world_size)
    from runtime.parallel import dtensor_utils

    original = dtensor_utils.SumGradOverMesh

    class NoReduce(original):  # same forward; backward keeps the local (partial) gradient
        @staticmethod
        def backward(ctx, grad):
            from torch.distributed.tensor import DTensor

            mesh, placements, shape, stride, _ = ctx.spec
            return DTensor.from_local((grad * ctx.scale).contiguous(), mesh, placements,
                                      run_check=False, shape=shape, stride=stride), None, None

    dtensor_utils.SumGradOverMesh = NoReduce
    return on_trainer


def expert_bias_on_every_rank(rank: int, world_size: int):
    """Hook (negative control): the whole mlp2_bias added by every TP rank (not 1/tp of it),
    so the reduce-scatter of the partial expert outputs counts it tp times."""
    on_trainer = record_first_grads(rank, world_size)
    from runtime.parallel import dtensor_utils

    original = dtensor_utils.SumGradOverMesh

    class EveryRank(original):
        @staticmethod
        def forward(ctx, param, count_once, dim=None):
            return original.forward(ctx, param, False, dim)

    dtensor_utils.SumGradOverMesh = EveryRank
    return on_trainer


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def common(seeded_overrides) -> list[str]:
    # The reference takes the plain logits path too (TP always does: loss parallel needs the
    # vocab-sharded logits), so the recorded logits can be compared; the fused chunked loss
    # has its own equality tests (tests/model/test_model_loss.py).
    return seeded_overrides() + ["--training.loss_chunk_size=0"]


def _run(world: int, overrides: list[str], tmp_path: Path, name: str, monkeypatch,
         hook=record_first_grads) -> tuple[dict, dict]:
    dump = tmp_path / f"{name}-grads.pt"
    monkeypatch.setenv(GRAD_DUMP_ENV, str(dump))
    run = run_single if world == 1 else (lambda *a, **k: run_distributed(world, *a, **k))
    result = run(overrides, STEPS, hook=hook)
    return result, torch.load(dump, weights_only=False)


def _reference(overrides: list[str], tmp_path_factory, name: str) -> tuple[dict, dict]:
    mp = pytest.MonkeyPatch()
    try:
        ref, grads = _run(1, overrides + global_batch_overrides(GLOBAL_BATCH, 1),
                          tmp_path_factory.mktemp(name), name, mp)
    finally:
        mp.undo()
    assert len(set(ref["losses"])) == STEPS, ref["losses"]  # training moves
    assert grads["dtensor_logits"] == [False]  # recorded up to the first backward
    return ref, grads


@pytest.fixture(scope="module")
def reference(common, tmp_path_factory) -> tuple[dict, dict]:
    """With the auxiliary loss (TP-only runs: every rank holds the whole batch)."""
    return _reference(common + AUX, tmp_path_factory, "tp-ref-aux")


@pytest.fixture(scope="module")
def reference_no_aux(common, tmp_path_factory) -> tuple[dict, dict]:
    """Without it, for runs with data parallelism (see the module docstring)."""
    return _reference(common, tmp_path_factory, "tp-ref")


def assert_grads_close(ref: dict, got: dict, what: str) -> None:
    ga, gb = ref["grads"], got["grads"]
    assert set(ga) == set(gb), (sorted(set(ga) ^ set(gb)))
    problems = []
    for name in sorted(ga):
        a, b = ga[name], gb[name]
        if a is None or b is None:
            if (a is None) != (b is None):
                problems.append(f"{name}: gradient only on one side")
            continue
        if a.shape != b.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        elif scaled_error(b, a) > GRAD_REL:
            problems.append(f"{name}: max |diff| {(a - b).abs().max().item():.3e} "
                            f"(max |ref| {a.abs().max().item():.3e})")
    if problems:
        raise AssertionError(f"{what}: first-step gradients differ:\n  " + "\n  ".join(problems))


def _check_engaged(info: dict, fsdp: bool) -> None:
    """The TP plan really sharded the parameters (TP placement last; FSDP's dp_shard first)."""
    expect = {
        "layers.0.attention.sinks": "Shard(dim=0)",
        "layers.0.attention.wq.weight": "Shard(dim=0)",
        "layers.0.attention.wo.weight": "Shard(dim=1)",
        "layers.0.moe.router.gate.weight": "Replicate()",
        "layers.0.moe.experts.mlp1_weight": "Shard(dim=1)",
        "layers.0.moe.experts.mlp2_weight": "Shard(dim=2)",
        "layers.0.moe.experts.mlp2_bias": "Replicate()",
        "tok_embeddings.weight": "Shard(dim=0)",
        "output.weight": "Shard(dim=0)",
        "norm.weight": "Replicate()",
    }
    for name, tp_placement in expect.items():
        got = info["placements"][name]
        if fsdp:  # FSDP shards dim 0 of the TP-local tensor: Shard(0) or _StridedShard(0)
            ok = got.endswith(f", {tp_placement})") and got.startswith(
                ("DTensor(Shard(dim=0), ", "DTensor(_StridedShard(dim=0, "))
        else:
            ok = got == f"DTensor({tp_placement},)"
        assert ok, (name, got)


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", ["tp2", "tp2_gather"])
def test_tp_matches_single_process(name, common, reference, tmp_path, monkeypatch):
    ref, ref_grads = reference
    extra = ["--parallelism.disable_loss_parallel=true"] if name == "tp2_gather" else []
    got, grads = _run(2, common + AUX + TP2 + extra + global_batch_overrides(GLOBAL_BATCH, 1),
                      tmp_path, name, monkeypatch)
    print(f"{name}: {summarize(ref, got)}")
    assert "tp=2" in got["info"]["mesh"]
    _check_engaged(got["info"], fsdp=False)
    # loss parallel really on (vocab-sharded DTensor logits) / really off
    assert grads["dtensor_logits"] == [name == "tp2"]
    for key in ("layers.0.moe.router.gate.weight", "layers.1.moe.router.gate.bias",
                "layers.0.attention.sinks", "layers.1.attention.sinks"):
        assert grads["grads"][key] is not None and grads["grads"][key].abs().sum() > 0, key
    assert_grads_close(ref_grads, grads, name)
    assert_parity(ref, got, what=name)


def test_loss_parallel_on_off_equal(common, tmp_path, monkeypatch):
    base = common + AUX + TP2 + global_batch_overrides(GLOBAL_BATCH, 1)
    on, _ = _run(2, base, tmp_path, "on", monkeypatch)
    off, _ = _run(2, base + ["--parallelism.disable_loss_parallel=true"], tmp_path, "off",
                  monkeypatch)
    print(f"loss parallel on vs off: {summarize(on, off)}")
    assert_parity(on, off, what="loss parallel on vs off")


def test_fsdp_tp_matches_single_process(common, reference_no_aux, tmp_path, monkeypatch):
    ref, ref_grads = reference_no_aux
    got, grads = _run(4, common + ["--parallelism.tensor_parallel_degree=2",
                                   "--parallelism.data_parallel_shard_degree=2"]
                      + global_batch_overrides(GLOBAL_BATCH, 2), tmp_path, "fsdp_tp", monkeypatch)
    print(f"fsdp2_tp2: {summarize(ref, got)}")
    assert "dp_shard=2" in got["info"]["mesh"] and "tp=2" in got["info"]["mesh"]
    assert got["info"]["fsdp_mesh"] == (("dp_shard", "tp"), (2, 2))
    _check_engaged(got["info"], fsdp=True)
    assert_grads_close(ref_grads, grads, "fsdp2_tp2")
    assert_parity(ref, got, what="fsdp2_tp2")


# --------------------------------------------------------------------------- compile
# Per-block torch.compile (dynamo + AOTAutograd, aot_eager backend through the harness hook)
# over the TP'd blocks: hooks, DTensor redistributions and the MoE TP functions are traced
# inside each block. In fp32 the MoE takes the per-expert loop under compile (grouped matmul
# traces only in bf16), with one graph break at its host sync; the eager reference takes the
# grouped path: the same math, observed differences ~1e-7 relative, default tolerances.
COMPILE = ["--compile.enable=true"]


def _check_compiled(got: dict, grads: dict) -> None:
    assert got["info"]["dynamo_unique_graphs"] > 0, "torch.compile was not engaged"
    # The gradient that used to be lost at the eager -> compiled boundary (the embedding
    # output enters block 0 as an AsyncCollectiveTensor; see tensor_parallel._wait_async_output)
    emb = grads["grads"]["tok_embeddings.weight"]
    assert emb is not None and emb.abs().sum() > 0


def test_tp_compiled_blocks_match_single_process(common, reference, tmp_path, monkeypatch):
    ref, ref_grads = reference
    got, grads = _run(2, common + AUX + TP2 + COMPILE + global_batch_overrides(GLOBAL_BATCH, 1),
                      tmp_path, "tp2_compile", monkeypatch, hook=compiled_record_first_grads)
    print(f"tp2_compile: {summarize(ref, got)}")
    _check_compiled(got, grads)
    _check_engaged(got["info"], fsdp=False)
    assert grads["dtensor_logits"] == [True]
    assert_grads_close(ref_grads, grads, "tp2_compile")
    assert_parity(ref, got, what="tp2_compile")


def test_fsdp_tp_compiled_blocks_match_single_process(common, reference_no_aux, tmp_path,
                                                      monkeypatch):
    ref, ref_grads = reference_no_aux
    got, grads = _run(4, common + COMPILE + ["--parallelism.tensor_parallel_degree=2",
                                             "--parallelism.data_parallel_shard_degree=2"]
                      + global_batch_overrides(GLOBAL_BATCH, 2), tmp_path, "fsdp_tp_compile",
                      monkeypatch, hook=compiled_record_first_grads)
    print(f"fsdp2_tp2_compile: {summarize(ref, got)}")
    assert got["info"]["fsdp_mesh"] == (("dp_shard", "tp"), (2, 2))
    _check_compiled(got, grads)
    _check_engaged(got["info"], fsdp=True)
    assert_grads_close(ref_grads, grads, "fsdp2_tp2_compile")
    assert_parity(ref, got, what="fsdp2_tp2_compile")


BROKEN = {  # hook: the parameter whose first-step gradient must be flagged
    "router_grad_not_reduced": (router_grad_not_reduced, "moe.router.gate.weight"),
    "expert_bias_on_every_rank": (expert_bias_on_every_rank, "moe.experts.mlp2_bias"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_tp_moe_is_caught(name, common, reference, tmp_path, monkeypatch):
    ref, ref_grads = reference
    hook, flagged = BROKEN[name]
    got, grads = _run(2, common + AUX + TP2 + global_batch_overrides(GLOBAL_BATCH, 1), tmp_path,
                      name, monkeypatch, hook=hook)
    with pytest.raises(AssertionError, match=flagged.replace(".", r"\.")):
        assert_grads_close(ref_grads, grads, name)
    with pytest.raises(AssertionError, match="runs differ"):
        assert_parity(ref, got, what=name)
