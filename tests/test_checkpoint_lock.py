"""One job per dump folder (issue 13, item 4): a second job refuses with one line naming the
holder; a lock left by a dead job is taken over only when that is certain."""

import os
import signal
import subprocess
import sys

import pytest
from checkpoint_helpers import ROOT, error_lines, run_job

from runtime.train.dump_lock import LOCK_NAME, DumpFolderLocked, DumpLock, _me, stale_reason

HOLD = "import sys, time; from runtime.train.dump_lock import DumpLock; " \
       "DumpLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def _holder(folder):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_job_refuses_then_takes_over_after_kill_9(tmp_path):
    holder = _holder(tmp_path)
    try:
        proc = run_job(tmp_path, "--training.steps=1")
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = error_lines(proc)
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "in use by" in lines[0]
        assert f"rm {tmp_path / LOCK_NAME}" in lines[0]
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a job killed -9 leaves its lock behind
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()
    proc = run_job(tmp_path, "--training.steps=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"took over a stale lock (host {os.uname().nodename} pid {holder.pid}" in proc.stdout
    assert not (tmp_path / LOCK_NAME).exists()  # released at exit


def test_stale_rules():
    me = _me()
    other_host = {**me, "host": "elsewhere", "pid": 1}
    assert stale_reason(other_host, me) is None  # cannot know: a human decides
    assert stale_reason({**me, "pid": os.getppid(), "pid_start": ""}, me) is None  # alive
    assert "rebooted" in stale_reason({**me, "boot_id": "another-boot", "pid": 1}, me)
    requeued = {**other_host, "slurm_job_id": "77", "slurm_restart_count": "0"}
    assert stale_reason(requeued, {**me, "slurm_job_id": "77", "slurm_restart_count": "1"})
    assert stale_reason(requeued, {**me, "slurm_job_id": "78", "slurm_restart_count": "1"}) is None
    reused = {**me, "pid": os.getppid(), "pid_start": "1"}  # pid alive but started at another time
    assert "another process" in stale_reason(reused, me)


def test_lock_of_another_host_is_never_broken(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"host": "node-7", "pid": 4242, "slurm_job_id": "99"}')
    with pytest.raises(DumpFolderLocked, match="in use by host node-7 pid 4242, Slurm job 99"):
        DumpLock.acquire(tmp_path)
    (tmp_path / LOCK_NAME).write_text("\x00garbage")  # torn write: still needs a human
    with pytest.raises(DumpFolderLocked, match="in use by host \\? pid \\?"):
        DumpLock.acquire(tmp_path)


def test_release_leaves_a_lock_taken_over_by_another(tmp_path):
    first = DumpLock.acquire(tmp_path)
    second = DumpLock.acquire(tmp_path, log=lambda msg: None)  # same process: taken over
    first.release()
    assert (tmp_path / LOCK_NAME).exists()
    second.release()
    assert not (tmp_path / LOCK_NAME).exists()
