"""Shared fixtures of the parity suites (tests/test_parallel_*.py): seed checkpoints and
single-process reference runs, written once per pytest session and shared by every suite that
asks for the same model (running the trainer and comparing runs: parallel_harness.py; its
STEPS and GLOBAL_BATCH are the suites' defaults).

    def test_fsdp(seeded, reference):
        got = run_distributed(2, seeded() + [...] + global_batch_overrides(GLOBAL_BATCH, 2), STEPS)
        assert_parity(reference(), got)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from parallel_harness import BASE, GLOBAL_BATCH, STEPS, global_batch_overrides, run_single, seeded


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


def pytest_collection_modifyitems(config, items):
    """scripts/test.sh runs the suite on 2 pytest-xdist workers (--dist loadgroup): the tests of
    one xdist_group run on one worker, one after the other. The Slurm tests share the machine's
    one local slurmctld (its session fixture starts and stops it), so they form one group."""
    for item in items:
        if item.get_closest_marker("slurm") or "slurm_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("slurm"))
