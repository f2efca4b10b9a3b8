"""python submit.py on the local Slurm (submitit's SlurmExecutor): the time-limit signal ->
checkpoint -> requeue -> resume, and scancel -> save and stop, not requeued. Run them under
`flock /tmp/slurm-tests.lock`."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import launch_helpers as lh
import pytest
from launch_helpers import (
    PLAN_PRESENT,
    REPO,
    TINY,
    assert_resumed,
    interrupt_when,
    needs_trainer,
    run_submit,
)


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
