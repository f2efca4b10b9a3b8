"""submit.py (submitit) without a cluster: its options and overrides, the sbatch text of
--dry-run, the checks before queueing (mesh, memory, config keys, time), the rank environment it
exports, the pinned submitit, and --local (submitit's local executor, 2 ranks on this machine).
On the local Slurm: test_slurm_submitit.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import launch_helpers as lh
import pytest
from launch_helpers import PLAN_PRESENT, REPO, TINY, needs_plan, needs_trainer, run_submit

from runtime.train.slurm_env import master_port_for_job


def test_submit_parse_time_and_overrides():
    sys.path.insert(0, str(REPO))
    import submit

    assert submit.parse_time_minutes("90") == 90
    assert submit.parse_time_minutes("1:30:00") == 90
    assert submit.parse_time_minutes("2-00:00:00") == 2880
    assert submit.parse_time_minutes("45:30") == 46
    args, overrides = submit.parse_args(
        [
            "--config",
            "c.toml",
            "--nodes",
            "2",
            "--model.n_layers=2",
            "--training.steps",
            "5",
            "--compile.enable",
        ]
    )
    assert args.nodes == 2 and submit.world_size(args) == 16
    assert overrides == ["--model.n_layers=2", "--training.steps", "5", "--compile.enable"]
    args, _ = submit.parse_args(["--config", "c.toml", "--nodes", "3", "--cpu-ranks-per-node", "2"])
    assert submit.world_size(args) == 6


@pytest.mark.parametrize("bad", [["--nodez", "2"], ["stray"], ["--job-nam=x"]])
def test_submit_rejects_unknown_options(bad):
    out = run_submit("--config", "configs/debugmodel.toml", "--dry-run", "--skip-mesh-check", *bad)
    assert out.returncode != 0
    assert "unknown option" in out.stderr or "unexpected argument" in out.stderr


def test_submit_dry_run_prints_sbatch():
    pytest.importorskip("submitit")
    out = run_submit(
        "--dry-run",
        "--skip-mesh-check",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--config",
        "configs/gptoss_20b.toml",
        "--partition",
        "gpu",
        "--account",
        "acct",
        "--time",
        "2:00:00",
        "--container-image",
        "ghcr.io#acme/gptoss-runtime:0.1.0",
        "--dependency",
        "singleton",
        "--folder",
        "/shared/logs/%j",
        "--env",
        "NCCL_DEBUG=INFO",
        "--model.n_layers=2",
        "--training.steps",
        "10",
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=acct",
        "#SBATCH --time=120",
        "#SBATCH --requeue",
        "#SBATCH --dependency=singleton",
        "#SBATCH --job-name=gptoss-gptoss_20b",
        "#SBATCH --output=/shared/logs/%j/%j_0_log.out",
    ]:
        assert line in text, line
    assert re.search(r"#SBATCH --signal=USR2@\d+", text)
    assert "--container-image=ghcr.io#acme/gptoss-runtime:0.1.0" in text
    assert f"--container-mounts={REPO}:{REPO}" in text and f"--container-workdir={REPO}" in text
    assert "-m submitit.core._submit" in text
    assert "world size: 2 node(s) x 8 rank(s) = 16" in text
    assert "'--model.n_layers=2', '--training.steps', '10'" in text
    assert '"NCCL_DEBUG": "INFO"' in text and '"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"' in text
    assert "submitted job" not in text


def test_submit_dry_run_cpu_and_local():
    pytest.importorskip("submitit")
    out = run_submit(
        "--dry-run",
        "--skip-mesh-check",
        "--nodes",
        "2",
        "--cpu-ranks-per-node",
        "1",
        "--config",
        "configs/debugmodel.toml",
    )
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --ntasks-per-node=1" in out.stdout and "gpus-per-node" not in out.stdout
    out = run_submit(
        "--dry-run",
        "--skip-mesh-check",
        "--local",
        "--cpu-ranks-per-node",
        "2",
        "--config",
        "configs/debugmodel.toml",
    )
    assert out.returncode == 0, out.stderr
    assert "local executor: 2 task(s)" in out.stdout


@needs_plan
def test_submit_refuses_mesh_mismatch():
    # gptoss_20b: dp_shard=-1 with EP 8 needs a multiple of 8 ranks
    out = run_submit(
        "--dry-run", "--nodes", "3", "--gpus-per-node", "2", "--config", "configs/gptoss_20b.toml"
    )
    assert out.returncode == 2
    assert "refusing to submit" in out.stderr and "6 ranks" in out.stderr
    assert "#SBATCH" not in out.stdout
    # an explicit mesh that does not multiply out to the world size
    out = run_submit(
        "--dry-run",
        "--nodes",
        "2",
        "--cpu-ranks-per-node",
        "1",
        "--config",
        "configs/debugmodel.toml",
        "--parallelism.data_parallel_shard_degree=4",
    )
    assert out.returncode == 2 and "refusing to submit" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@needs_plan
def test_submit_accepts_matching_mesh():
    pytest.importorskip("submitit")
    out = run_submit(
        "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--config", "configs/gptoss_20b.toml"
    )
    assert out.returncode == 0, out.stderr
    assert "mesh check ok" in out.stdout and "#SBATCH --nodes=2" in out.stdout


@needs_trainer
def test_submit_local_executor(tmp_path):
    """--local: submitit's local executor, 2 ranks (gloo) on this machine."""
    pytest.importorskip("submitit")
    dump = tmp_path / "dump"
    args = [
        "--local",
        "--nodes",
        "1",
        "--cpu-ranks-per-node",
        "2",
        "--config",
        "configs/debugmodel.toml",
        "--time",
        "10",
        "--folder",
        str(tmp_path / "submitit" / "%j"),
        *TINY,
        "--training.steps=6",
        "--checkpoint.interval=6",
        f"--job.dump_folder={dump}",
    ]
    if not PLAN_PRESENT:
        args.append("--skip-mesh-check")
    out = run_submit(*args, timeout=240, env=lh.python_env(OMP_NUM_THREADS="1"))
    logs = lh.dump_job_logs(tmp_path / "submitit")
    assert out.returncode == 0, out.stdout + out.stderr + logs
    assert "submitted job" in out.stdout and "done" in out.stdout
    steps = [r["step"] for r in lh.read_metrics(dump / "metrics.jsonl")]
    assert steps and steps[-1] == 6, logs


def test_submit_refuses_time_shorter_than_signal_delay():
    out = run_submit("--dry-run", "--config", "configs/debugmodel.toml", "--cpu-ranks-per-node",
                     "1", "--time", "3", "--signal-delay-s", "180")
    assert out.returncode == 2 and "not longer than --signal-delay-s 180" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@needs_plan
def test_submit_unknown_key_is_a_config_error():
    out = run_submit("--dry-run", "--config", "configs/debugmodel.toml", "--cpu-ranks-per-node",
                     "1", "--training.stepz=3")
    assert out.returncode == 2
    assert "config error" in out.stderr and "--training.stepz" in out.stderr, out.stderr
    assert "mesh" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


@needs_plan
def test_submit_checks_memory_before_queueing():
    """120b on 2 nodes x 8 GPUs: the mesh is valid but a rank needs ~125 GiB: refused on 80 GiB
    GPUs (the default) with the plan's reason; on H200s (141 GiB, from the partition name) it
    fits; --skip-memory-check skips the check."""
    pytest.importorskip("submitit")
    base = ["--dry-run", "--nodes", "2", "--config", "configs/gptoss_120b.toml"]
    out = run_submit(*base, timeout=600)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "does not fit the memory of 16 ranks" in out.stderr and "GiB per rank > 80" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "#SBATCH" not in out.stdout
    out = run_submit(*base, "--partition", "h200-long", timeout=600)
    assert out.returncode == 0, out.stderr
    assert "memory ok for 141 GiB per GPU (h200 in --partition)" in out.stdout
    out = run_submit(*base, "--skip-memory-check", timeout=600)
    assert out.returncode == 0 and "memory check skipped" in out.stdout, out.stderr
    assert "--training.skip_memory_check=true" in out.stdout  # the trainer's check skipped too


def test_submitit_pinned_and_its_helpers_used():
    submitit = pytest.importorskip("submitit")
    pin = re.search(r'"submitit==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert submitit.__version__ == pin, "submit.py relies on private submitit names: re-check them"
    assert f'"submitit=={pin}"' in (REPO / "Dockerfile").read_text()
    from submitit.core.job_environment import JobEnvironment
    from submitit.slurm.slurm import _make_sbatch_string  # noqa: F401  (dry-run's sbatch text)

    assert callable(JobEnvironment._usr_sig)
    text = (REPO / "submit.py").read_text()
    assert "TorchDistributedEnvironment" in text and "_set_dist_env_from_submitit" not in text


def test_submit_exports_dist_env_through_submitit():
    pytest.importorskip("submitit")
    env = dict(os.environ, SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="16",
               SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu[07-08]",
               SLURM_PROCID="13", SLURM_LOCALID="5", PYTHONPATH=str(REPO))
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)
    code = ("import os, submit, submitit; submit._export_dist_env(submitit.JobEnvironment(), False); "
            "print(' '.join(os.environ.get(k, '-') for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', "
            "'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'CUDA_VISIBLE_DEVICES')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["13", "16", "5", "8", "1", "gpu07", str(master_port_for_job(4242)), "-"]
