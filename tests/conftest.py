"""Shared fixtures of the parity suites (tests/parallel/test_parallel_*.py): seed checkpoints and
single-process reference runs, written once per pytest session and shared by every suite that
asks for the same model (running the trainer and comparing runs: parallel_harness.py; its
STEPS and GLOBAL_BATCH are the suites' defaults).

    def test_fsdp(seeded, reference):
        got = run_distributed(2, seeded() + [...] + global_batch_overrides(GLOBAL_BATCH, 2), STEPS)
        assert_parity(reference(), got)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# tests/<area>/ mirrors runtime/<area>/; the helpers shared by several areas live in
# tests/helpers/ and are imported by module name (parallel ranks get this sys.path too).
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

from parallel_harness import BASE, GLOBAL_BATCH, STEPS, global_batch_overrides, run_single, seeded  # noqa: E402


@pytest.fixture(scope="session")
def seeded_overrides(tmp_path_factory) -> Callable[..., list[str]]:
    """seeded_overrides(n_layers=None) -> BASE (with --model.n_layers=n_layers if given) plus
    the load of that model's seed checkpoint: every run of a comparison starts from it."""
    cache: dict[int | None, list[str]] = {}

    def get(n_layers: int | None = None) -> list[str]:
        if n_layers not in cache:
            model = BASE + ([f"--model.n_layers={n_layers}"] if n_layers else [])
            cache[n_layers] = seeded(model, tmp_path_factory.mktemp(f"seed-{n_layers or 'base'}"))
        return list(cache[n_layers])

    return get


@pytest.fixture(scope="session")
def reference_run(seeded_overrides) -> Callable[..., dict]:
    """reference_run(n_layers=None, extra=(), steps=STEPS) -> the single-process run of
    seeded_overrides(n_layers) + extra on the global batch GLOBAL_BATCH (block calls counted),
    run once per session; training must move (the loss changes every step)."""
    cache: dict[tuple, dict] = {}

    def get(n_layers: int | None = None, extra: tuple[str, ...] = (), steps: int = STEPS) -> dict:
        key = (n_layers, tuple(extra), steps)
        if key not in cache:
            overrides = seeded_overrides(n_layers) + list(extra)
            ref = run_single(overrides + global_batch_overrides(GLOBAL_BATCH, 1), steps,
                             count_block_calls=True)
            assert len(set(ref["losses"])) == steps, ref["losses"]
            cache[key] = ref
        return cache[key]

    return get


# `bash scripts/test.sh --quick` (pytest -m quick): the edit-test loop, under 3 minutes on 2
# cores. Every test of the unit files below (model math against float64 and transformers,
# config, data, chat rendering, checkpoint formats, plan) except the heavy ones named in
# NOT_QUICK (subprocess CLIs, finite differences, compile), plus one parity case per
# parallelism (one trainer run on 2 ranks against the shared single-process reference).
# Matched by file name and test name (with its parameters); a new test in a unit file is quick
# unless it is added to NOT_QUICK.
QUICK_FILES = {
    "test_config.py", "test_parallel_dims.py", "test_plan.py", "test_docs.py",
    "test_model_units.py", "test_model_masks.py", "test_model_loss.py", "test_model_hf_parity.py",
    "test_hf_interop.py", "test_lora.py", "test_lora_export.py", "test_tokenizer.py",
    "test_data.py", "test_chat_render.py", "test_chat_source.py", "test_chat_pack.py",
    "test_checkpoint_pickle_forms.py", "test_checkpoint_safety.py",
}
QUICK_TESTS = {
    "test_parallel_parity.py::test_data_parallel_matches_single_process[fsdp]",
    "test_parallel_tp.py::test_tp_matches_single_process[tp2]",
    "test_parallel_cp.py::test_trainer_context_parallel_matches_single_process[cp2]",
    "test_parallel_ep.py::test_expert_parallel_matches_single_process[ep2_fsdp2]",
    "test_parallel_pp.py::test_schedule_matches_single_process[1F1B]",
}
NOT_QUICK = {  # test names (any parameters) in QUICK_FILES
    "test_sink_gradient_matches_finite_difference", "test_compiled_chunk_chain_matches_eager",
    "test_compiled_expert_math_equals_eager_in_bf16", "test_fsdp_pp_cp_match_one_process",
    "test_build_assets_is_reproducible", "test_cli_subprocess_runs_the_120b_plan",
    "test_show_command_prints_what_the_trainer_gets", "test_prepare_and_bench_commands",
    "test_bad_data_or_tokenizer_is_one_line_exit_2_before_the_model",
    "test_bad_record_met_mid_run_is_one_line_exit_2", "test_damaged_prepared_data_is_one_line_exit_2",
    "test_two_prepares_into_one_folder", "test_planted_metadata_refused_by_the_job_with_one_line",
    "test_every_parallelism_matches_one_process", "test_two_real_ranks_after_the_check_save_every_shard",
    "test_a_batch_the_machine_cannot_hold_is_refused_before_the_model",
}


def _is_quick(item) -> bool:
    file = item.path.name
    if f"{file}::{item.name}" in QUICK_TESTS:
        return True
    return file in QUICK_FILES and item.originalname not in NOT_QUICK


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Markers: `quick` (above); and xdist groups: scripts/test.sh runs the suite on 2
    pytest-xdist workers (--dist loadgroup), the tests of one xdist_group run on one worker,
    one after the other. The Slurm tests share the machine's one local slurmctld (its session
    fixture starts and stops it), so they form one group. tryfirst: xdist reads the groups in
    its own modifyitems hook (it appends `@group` to the ids); run after it, the groups were
    missed, the Slurm tests spread over both workers, and the first worker to finish stopped
    the slurmctld under the other's jobs."""
    for item in items:
        if _is_quick(item):
            item.add_marker(pytest.mark.quick)
        if item.get_closest_marker("slurm") or "slurm_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("slurm"))
