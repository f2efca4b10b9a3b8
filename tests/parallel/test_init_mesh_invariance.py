"""One seed, one initial model, whatever the mesh (runtime/model/init.py).

No seed checkpoint here: every run initialises its own (sharded) parameters from
`training.seed`. With a learning rate of 1e-20 (the config refuses 0) and expert-bias
balancing off, one step moves no parameter by more than ~1e-20, so the gathered full tensors
of each mesh must equal the single process's within 1e-12 (initial values are ~0.02: any
other draw differs by orders of magnitude more), and the step-1 loss (same weights, same
global batch) within the summation-order tolerance of the parity suites (1e-5 relative).

Before the keyed initialisation the sharded runs drew their shards from per-rank RNG streams:
the FSDP2 x EP2 step-1 loss of the debug model differed by 7.9e-4 relative.
"""

from __future__ import annotations

import pytest
import torch
from parallel_harness import BASE, global_batch_overrides, run_distributed, run_single
from torch import nn

from runtime.model import init
from runtime.model.args import FLAVORS
from runtime.model.model import GptOssModel

GLOBAL_BATCH = 4
FROZEN = BASE + ["--optimizer.lr=1e-20", "--model.load_balance_coeff=0"]

MESHES = {
    # name: (world size, data-parallel ranks, overrides)
    "fsdp2": (2, 2, ["--parallelism.data_parallel_shard_degree=2"]),
    "tp2": (2, 1, ["--parallelism.tensor_parallel_degree=2"]),
    "fsdp2_ep2": (2, 2, ["--parallelism.data_parallel_shard_degree=2",
                         "--parallelism.expert_parallel_degree=2"]),
    "pp2": (2, 1, ["--parallelism.pipeline_parallel_degree=2",
                   "--parallelism.pipeline_parallel_microbatch_size=2"]),
    # FSDP over TP-sharded dims: strided shards (placements on both mesh dims of one tensor dim)
    "fsdp2_tp2": (4, 2, ["--parallelism.data_parallel_shard_degree=2",
                         "--parallelism.tensor_parallel_degree=2"]),
}


@pytest.fixture(scope="module")
def reference() -> dict:
    return run_single(FROZEN + global_batch_overrides(GLOBAL_BATCH, 1), steps=1)


@pytest.mark.parametrize("name", list(MESHES))
def test_same_initial_model_and_step1_loss_on_every_mesh(reference, name):
    world, dp, overrides = MESHES[name]
    got = run_distributed(world, FROZEN + global_batch_overrides(GLOBAL_BATCH, dp) + overrides,
                          steps=1)
    assert set(got["params"]) == set(reference["params"])
    differing = [n for n, ref in reference["params"].items()
                 if not torch.allclose(got["params"][n], ref, rtol=0.0, atol=1e-12)]
    assert not differing, f"{name}: initial parameters differ from one process: {differing}"
    ref_loss, loss = reference["losses"][0], got["losses"][0]
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (name, ref_loss, loss)


def test_seed_and_name_select_the_values():
    """Same seed: same model; another seed: another model; tensors of one shape but different
    names are drawn independently (identical blocks must not start identical)."""
    def build(seed):
        model = GptOssModel(FLAVORS["tiny"])
        model.init_weights(seed=seed)
        return dict(model.named_parameters())

    a, b, c = build(0), build(0), build(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["output.weight"], c["output.weight"])
    assert not torch.equal(a["layers.0.attention.wq.weight"], a["layers.1.attention.wq.weight"])
    # the distributions are those of the unkeyed init: trunc-normal/normal with init_std
    std = FLAVORS["tiny"].init_std
    assert abs(a["output.weight"].double().std().item() - std) < 0.05 * std
    assert torch.count_nonzero(a["layers.0.attention.wq.bias"]) == 0
    assert torch.all(a["norm.weight"] == 1)


def test_a_shard_is_the_slice_of_the_full_tensor():
    """The chunked draw of any block equals that block of the full draw: row ranges that start
    and end inside chunks (uneven shards), column slices (TP shards of dim 1), whole chunks
    (drawn in place) and partial ones (drawn aside and copied)."""
    fill = lambda t, g: nn.init.normal_(t, std=1.0, generator=g)  # noqa: E731
    shape = (9, 3, init._CHUNK_NUMEL // 6)  # 2 rows per chunk: chunk edges at 2, 4, 6, 8
    every = (slice(0, 3), slice(0, shape[2]))
    full = torch.empty(shape)
    init._fill_rows(full, shape, 0, every, "w", 7, fill)
    for first, count in ((0, 9), (1, 4), (2, 4), (3, 1), (5, 4), (8, 1)):
        for columns in (every, (slice(1, 3), slice(0, shape[2])), (slice(0, 3), slice(5, 17))):
            part = torch.empty((count, *(c.stop - c.start for c in columns)))
            init._fill_rows(part, shape, first, columns, "w", 7, fill)
            expected = full[first:first + count][(slice(None),) + columns]
            assert torch.equal(part, expected), (first, count, columns)


def test_wrapper_segments_do_not_change_the_name():
    assert (init.canonical_name("layers.3._checkpoint_wrapped_module._orig_mod.moe.router.gate.weight")
            == "layers.3.moe.router.gate.weight")
