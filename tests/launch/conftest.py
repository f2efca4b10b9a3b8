"""The local Slurm for the tests marked `slurm` (test_slurm_*.py, test_failure_report.py,
test_container.py): one session fixture, so one slurmctld start per pytest process (all Slurm
tests form one xdist_group, tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess

import launch_helpers as lh
import pytest
from launch_helpers import CONTAINER_TEST


def _slurm_skip_reason() -> str | None:
    if not lh.LOCAL_SLURM.exists():
        return f"{lh.LOCAL_SLURM} not found (the shared test tools are not next to the repo)"
    if os.geteuid() != 0:
        return "local_slurm.sh needs root"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _slurm_skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, LOCAL_SLURM_NODES="2")
    if CONTAINER_TEST:  # pyxis' --container-* options, running tasks in podman images
        env["LOCAL_SLURM_PYXIS_STUB"] = "1"
    out = subprocess.run(
        ["bash", str(lh.LOCAL_SLURM), "start"], env=env, capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        pytest.fail(f"local_slurm.sh start failed:\n{out.stdout}\n{out.stderr}")
    try:
        yield
    finally:
        subprocess.run(
            ["bash", str(lh.LOCAL_SLURM), "stop"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
