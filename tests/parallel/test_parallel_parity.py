"""Parallel parity on CPU (gloo): each data-parallel flavour, activation checkpointing mode
and per-block compile trains exactly like the single-process reference.

Every run starts from the same seed checkpoint and sees the same global batch of 4
sequences per optimizer step (local batch = 4 / dp / accumulation), for 3 optimizer steps
of the tiny flavor (seq_len 32, fp32, 1 thread per rank). Compared per step: the loss (mean
over the global batch) and the gradient norm; after the last step: every parameter and
persistent buffer, gathered to full fp32 tensors.

Tolerances (defaults of parallel_harness.assert_parity, where the reasons are spelled out):
  losses      1e-5 relative   (observed ~1e-7: summation order only)
  grad norms  1e-4 relative   (observed ~2e-5: torch's fp32 CPU norm of the 0.5M-element
                               output head is itself that far off; the gradients agree ~2e-7)
  parameters  |diff| <= 1e-6 + 1e-5 |ref|  (observed <= 1e-7; needs AdamW eps 1e-3 in BASE)
AC and compile (aot_eager) reproduce the reference bit for bit on CPU; they get the same
tolerances anyway.

Runtime on a 2-core machine: ~65 s; the inductor compile test (marked slow) adds ~115 s with
a cold inductor cache, ~20 s with a warm one (`-m "not slow"` leaves it out).
To see every multi-process test fail, rerun with a broken data-parallel path, e.g.
PARALLEL_HARNESS_HOOK=module:function (see parallel_harness).
"""

from __future__ import annotations

import pytest
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


@pytest.fixture(scope="module")
def common(seeded_overrides) -> list[str]:
    return seeded_overrides()


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    ref = reference_run()  # conftest: the loss changes every step (training moves)
    assert len(ref["losses"]) == STEPS
    assert ref["info"]["activation_checkpoint"] == {"0": "none", "1": "none"}
    assert ref["info"]["block_calls"] == {"0": STEPS, "1": STEPS}
    return ref


# --------------------------------------------------------------------------- data parallel
# name: (world size, overrides, dp, accumulation, FSDP mesh dims, sizes, param placements)
DATA_PARALLEL = {
    "fsdp": (2, ["--parallelism.data_parallel_shard_degree=2"], 2, 1,
             ("dp_shard",), (2,), "DTensor(Shard(dim=0),)"),
    "fsdp_no_reshard": (2, ["--parallelism.data_parallel_shard_degree=2",
                            "--parallelism.fsdp_reshard_after_forward=never"], 2, 1,
                        ("dp_shard",), (2,), "DTensor(Shard(dim=0),)"),
    "hsdp_2x2": (4, ["--parallelism.data_parallel_replicate_degree=2",
                     "--parallelism.data_parallel_shard_degree=2"], 4, 1,
                 ("dp_replicate", "dp_shard"), (2, 2), "DTensor(Replicate(), Shard(dim=0))"),
    "ddp_2": (2, ["--parallelism.data_parallel_replicate_degree=2",
                  "--parallelism.data_parallel_shard_degree=1"], 2, 1,
              ("dp_replicate", "dp_shard"), (2, 1), "DTensor(Replicate(), Shard(dim=0))"),
    # global 4 = 2 ranks x local 1 x 2 micro-steps
    "fsdp_grad_accum": (2, ["--parallelism.data_parallel_shard_degree=2"], 2, 2,
                        ("dp_shard",), (2,), "DTensor(Shard(dim=0),)"),
}


@pytest.mark.parametrize("name", list(DATA_PARALLEL))
def test_data_parallel_matches_single_process(name, common, reference):
    world, overrides, dp, accum, mesh_dims, mesh_sizes, placement = DATA_PARALLEL[name]
    batch = global_batch_overrides(GLOBAL_BATCH, dp, accum)
    got = run_distributed(world, common + overrides + batch, STEPS)
    print(f"{name}: {summarize(reference, got)}")
    info = got["info"]
    # The mode under test was really engaged: mesh, accumulation, sharded parameters.
    assert info["grad_accum"] == accum and info["global_batch"] == GLOBAL_BATCH
    assert info["fsdp_mesh"] == (mesh_dims, mesh_sizes)
    assert set(info["placements"].values()) == {placement}, info["placements"]
    assert_parity(reference, got, what=name)


# --------------------------------------------------------------------------- activation ckpt
# name: (overrides, per-layer mode, norm calls per layer over the run: forward + recompute)
AC_MODES = {
    "full": (["--activation_checkpoint.mode=full"], ["full", "full"], [2 * STEPS, 2 * STEPS]),
    "selective_op": (["--activation_checkpoint.mode=selective",
                      "--activation_checkpoint.selective_ac_option=op"], ["op", "op"],
                     [2 * STEPS, 2 * STEPS]),
    # every 2nd layer: of 2 layers only the second is checkpointed
    "every_2_layers": (["--activation_checkpoint.mode=selective",
                        "--activation_checkpoint.selective_ac_option=2"], ["none", "full"],
                       [STEPS, 2 * STEPS]),
}


@pytest.mark.parametrize("name", list(AC_MODES))
def test_activation_checkpointing_matches_no_ac(name, common, reference):
    overrides, modes, calls = AC_MODES[name]
    got = run_single(common + overrides + global_batch_overrides(GLOBAL_BATCH, 1), STEPS,
                     count_block_calls=True)
    assert got["info"]["activation_checkpoint"] == dict(zip(("0", "1"), modes))
    # recomputation really happened in backward
    assert got["info"]["block_calls"] == dict(zip(("0", "1"), calls))
    assert_parity(reference, got, what=f"AC {name}")


# --------------------------------------------------------------------------- compile
# The compiled and eager runs both use the reference per-expert loop: with fp32 compute,
# torch.compile cannot trace the grouped-matmul path (the meta kernel of aten._grouped_mm
# accepts only bf16 in torch 2.13), see the report on runtime/model/moe.py.
COMPILE_COMMON = ["--model.moe_impl=loop"] + global_batch_overrides(GLOBAL_BATCH, 1)


@pytest.fixture(scope="module")
def eager_loop(common) -> dict:
    return run_single(common + COMPILE_COMMON, STEPS)


def _check_compiled(eager: dict, got: dict, what: str) -> None:
    assert got["info"]["dynamo_unique_graphs"] > 0, "torch.compile was not engaged"
    assert eager["info"]["dynamo_unique_graphs"] == 0
    assert_parity(eager, got, what=what)


def test_per_block_compile_aot_eager_matches_eager(common, eager_loop):
    """Dynamo + AOTAutograd per block (backend aot_eager through a harness hook: the config
    has no backend key and inductor's C++ codegen takes over a minute on a small CPU)."""
    got = run_single(common + COMPILE_COMMON + ["--compile.enable=true"], STEPS,
                     hook=compile_with_aot_eager)
    _check_compiled(eager_loop, got, "compile aot_eager")


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compile_under_activation_checkpointing_is_regional_and_matches_eager(common, eager_loop,
                                                                             mode):
    """With AC on, a graph break inside the checkpointed block (here the fp32 expert loop's
    host sync; with EP the all-to-all split sizes) would make dynamo run the whole block
    eagerly: compile.py then compiles the block's parts (norms, attention, experts' math)
    inside the checkpoint instead, so compile really engages (graphs > 0)."""
    got = run_single(common + COMPILE_COMMON + ["--compile.enable=true",
                                                f"--activation_checkpoint.mode={mode}"],
                     STEPS, hook=compile_with_aot_eager)
    assert set(got["info"]["activation_checkpoint"].values()) != {"none"}
    _check_compiled(eager_loop, got, f"regional compile + AC {mode}")


@pytest.mark.slow
def test_per_block_compile_inductor_matches_eager(common, eager_loop):
    """The real thing (inductor, CPU C++ codegen): ~115 s on 2 cores with a cold cache."""
    got = run_single(common + COMPILE_COMMON + ["--compile.enable=true"], STEPS, timeout=600)
    _check_compiled(eager_loop, got, "compile inductor")


# --------------------------------------------------------------------------- the check can fail

def _scale_gradients(rank: int, world_size: int):
    """Hook: a 1% gradient-scale error after clipping (what a wrong data-parallel average
    or accumulation factor looks like); the losses of later steps barely move."""
    import torch

    def on_trainer(trainer):
        clip = trainer.clip_grad_norm_

        def scaled():
            norm = clip()
            with torch.no_grad():
                for p in trainer.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(1.01)
            return norm

        trainer.clip_grad_norm_ = scaled

    return on_trainer


def test_parity_check_detects_a_small_gradient_scale_error(common, reference):
    got = run_single(common + global_batch_overrides(GLOBAL_BATCH, 1), STEPS, hook=_scale_gradients)
    with pytest.raises(AssertionError, match="param "):
        assert_parity(reference, got, what="1% gradient scale")
