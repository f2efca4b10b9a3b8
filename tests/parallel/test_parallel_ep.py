"""Expert parallelism (experts sharded over ranks, all-to-all dispatch/combine with uneven
splits) matches the single-process run on CPU (gloo), alone and with FSDP and CP.

Runs (tiny flavor: 4 experts top-2, seq_len 32, fp32, 3 optimizer steps, global batch 4, one
seed checkpoint): EP=2 over dp_shard=2 (each rank owns 2 whole experts, no further expert
sharding); EP=2 over dp_shard=4 (experts also FSDP-sharded over the 2 ranks left, gradient
divide factor = dp); EP=2 over dp_shard x cp = 1 x 2 (EP borrowing the CP ranks); with TP=2:
EP borrowing the TP ranks (etp=1: ep over tp, over dp_shard x tp with FSDP, ep=4 over
dp_shard 2 x tp 2) and ETP (etp=tp=2: experts on the (ep, tp) mesh, F split over tp).
Negative control: `test_broken_ep_over_tp_is_caught` treats the TP ranks inside the ep mesh
like data-parallel ranks (grad scale 1/ep, load counts not summed over tp) and the parity
check rejects it (loss 2e-4 rel, params 4e-3 off after 3 steps).
The auxiliary balance loss stays off: with ranks routing different tokens it is the mean of
per-rank losses, not the whole-batch loss (see tests/parallel/test_parallel_tp.py).
Tolerances: parallel_harness.assert_parity defaults (losses 1e-5 relative, parameters
1e-6 + 1e-5 |ref|); differences are summation order only. Uneven splits are the norm here:
top-2 routing of 64-128 tokens over 4 experts never splits evenly.
"""

from __future__ import annotations

import pytest
from parallel_harness import STEPS, assert_parity, global_batch_overrides, run_distributed, summarize


@pytest.fixture(scope="module")
def reference(seeded_overrides, reference_run):
    """(seeded overrides, the single-process run on the global batch of 4) from conftest."""
    return seeded_overrides(), reference_run()


@pytest.mark.parametrize("world, extra, dp", [
    (2, ["--parallelism.expert_parallel_degree=2", "--parallelism.data_parallel_shard_degree=2"], 2),
    (4, ["--parallelism.expert_parallel_degree=2", "--parallelism.data_parallel_shard_degree=4"], 4),
    (2, ["--parallelism.expert_parallel_degree=2", "--parallelism.data_parallel_shard_degree=1",
         "--parallelism.context_parallel_degree=2"], 1),
], ids=["ep2_fsdp2", "ep2_fsdp4", "ep2_cp2"])
def test_expert_parallel_matches_single_process(reference, world, extra, dp):
    common, ref = reference
    got = run_distributed(world, common + extra + global_batch_overrides(4, dp), steps=STEPS)
    assert "ep=2" in got["info"]["mesh"], got["info"]
    assert_parity(ref, got), summarize(ref, got)


EP = "--parallelism.expert_parallel_degree="
TP2 = "--parallelism.tensor_parallel_degree=2"
SHARD = "--parallelism.data_parallel_shard_degree="
ETP2 = "--parallelism.expert_tensor_parallel_degree=2"


@pytest.mark.parametrize("world, extra, dp, expert_placements", [
    # EP borrowing the TP ranks (etp = 1): each TP rank routes its own sequence shard.
    (2, [EP + "2", TP2, SHARD + "1"], 1, "(Shard(dim=0),)"),
    # ... with FSDP: dense params FSDP x TP, experts over ep = tp and FSDP-sharded over the 2
    # dp ranks (FSDP's dim-0 shard of an already dim-0-sharded tensor is a _StridedShard).
    (4, [EP + "2", TP2, SHARD + "2"], 2, "(_StridedShard(dim=0, sf=2), Shard(dim=0))"),
    # ... ep = dp_shard x tp = 4: one whole expert per rank (FSDP over the size-1 rest).
    (4, [EP + "4", TP2, SHARD + "2"], 2, "(_StridedShard(dim=0, sf=4), Shard(dim=0))"),
    # ETP (etp = tp): experts over ep = dp_shard and along F over tp (the (ep, tp) mesh;
    # FSDP adds its size-1 dim).
    (4, [EP + "2", TP2, SHARD + "2", ETP2], 2,
     "(_StridedShard(dim=0, sf=2), Shard(dim=0), Shard(dim=1))"),
], ids=["ep2_borrows_tp2", "fsdp2_tp2_ep2_borrows_tp", "ep4_over_fsdp2_x_tp2", "etp_fsdp2_tp2_ep2"])
def test_expert_parallel_with_tensor_parallel(reference, world, extra, dp, expert_placements):
    common, ref = reference
    got = run_distributed(world, common + extra + global_batch_overrides(4, dp), steps=STEPS)
    placements = got["info"]["placements"]
    assert placements["layers.0.moe.experts.mlp1_weight"] == "DTensor" + expert_placements, placements
    assert_parity(ref, got), summarize(ref, got)


def test_expert_parallel_with_compiled_checkpointed_blocks(reference):
    """The shipped 20b/120b configs combine EP with compile and full AC: compile is regional
    (the block's parts inside the checkpoint), since the all-to-all split sizes' host sync
    would otherwise make dynamo run the checkpointed block eagerly (aot_eager backend)."""
    from parallel_harness import compile_with_aot_eager

    common, ref = reference
    got = run_distributed(2, common + ["--parallelism.expert_parallel_degree=2",
                                       "--parallelism.data_parallel_shard_degree=2",
                                       "--compile.enable=true", "--activation_checkpoint.mode=full"]
                          + global_batch_overrides(4, 2), steps=STEPS, hook=compile_with_aot_eager)
    # Regional compile under AC: the all-to-all's host sync no longer disables compile.
    assert got["info"]["dynamo_unique_graphs"] > 0, "torch.compile was not engaged"
    assert_parity(ref, got), summarize(ref, got)


def test_expert_parallel_with_compiled_blocks_no_ac(reference):
    """Whole-block compile with EP: the split-size host sync is a graph break; the expert
    weights reaching the resumed graph are DTensors and must be unwrapped there."""
    from parallel_harness import compile_with_aot_eager

    common, ref = reference
    got = run_distributed(2, common + [EP + "2", SHARD + "2", "--compile.enable=true"]
                          + global_batch_overrides(4, 2), steps=STEPS, hook=compile_with_aot_eager)
    assert got["info"]["dynamo_unique_graphs"] > 0, "torch.compile was not engaged"
    assert_parity(ref, got), summarize(ref, got)


def test_expert_parallel_borrowing_tp_with_compile_and_ac(reference):
    """EP over the TP ranks + regional compile under full AC: the TP hooks run inside the
    compiled attention, the experts' all-to-all stays eager between compiled parts."""
    from parallel_harness import compile_with_aot_eager

    common, ref = reference
    got = run_distributed(2, common + [EP + "2", TP2, SHARD + "1", "--compile.enable=true",
                                       "--activation_checkpoint.mode=full"]
                          + global_batch_overrides(4, 1), steps=STEPS, hook=compile_with_aot_eager)
    assert got["info"]["dynamo_unique_graphs"] > 0, "torch.compile was not engaged"
    assert_parity(ref, got), summarize(ref, got)


def tp_ranks_counted_as_data_ranks(rank: int, world_size: int) -> None:
    """Hook (negative control): EP over the TP ranks treated like EP over data-parallel ranks
    (expert grad scale 1/ep instead of tp/ep, MoE load counts not summed over tp)."""
    from runtime.parallel.dims import ParallelDims

    ParallelDims.tp_in_ep = property(lambda self: 1)


def test_broken_ep_over_tp_is_caught(reference):
    """The broken run trains without error; only the comparison gives it away."""
    common, ref = reference
    got = run_distributed(2, common + [EP + "2", TP2, SHARD + "1"] + global_batch_overrides(4, 1),
                          steps=STEPS, hook=tp_ranks_counted_as_data_ranks)
    print(summarize(ref, got))
    with pytest.raises(AssertionError, match="runs differ"):
        assert_parity(ref, got)
