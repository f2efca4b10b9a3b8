"""Which rank's failure a job reports (issue 24 item 1): slurm/rank_exec.sh records each rank's
exit code, end time and host; slurm/common.sh's step outcome and failure report name the first
failure by time (the root cause), then the collateral ones; on the local Slurm, a crashed rank
ends the step at once and the job fails with its code."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import launch_helpers as lh
import pytest
from launch_helpers import REPO, batch_log, exit_code, fake_job, run_bash, sbatch


def test_step_outcome_from_rank_exit_codes(tmp_path):
    """common.sh's verdict on a step from the codes rank_exec.sh wrote (first crash wins)."""
    def outcome(codes: dict[int, str], world: int, srun_rc: int) -> str:
        d = tmp_path / f"exit{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        for rank, code in codes.items():
            (d / f"rank-{rank}").write_text(code + "\n")
        out = run_bash(f"source slurm/common.sh; gptoss_step_outcome {d} {world} {srun_rc}")
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
    out = run_bash(f"source slurm/common.sh; gptoss_report_failures {exit_dir} 3 {tmp_path}")
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


@pytest.mark.slurm
def test_slurm_crashed_rank_ends_the_step_at_once(slurm_cluster, tmp_path):
    """Item 5: rank 1 dies at step 2 while rank 0 waits in a collective; the step ends within
    seconds (was: up to RANK_EXIT_GRACE_S = 600 s), the job fails with rank 1's exit code."""
    root, env = fake_job(tmp_path)
    start = time.monotonic()
    jid = sbatch(root / "slurm" / "debug.sbatch", "--training.steps=400", "--fake.step_s=0.25",
                 "--fake.crash_rank=1", "--fake.crash_step=2", f"--job.dump_folder={tmp_path / 'd'}",
                 cwd=root, env=env)
    state = lh.wait_job(jid, 90, release_requeued=False)
    elapsed = time.monotonic() - start
    log = batch_log(root, jid)
    assert state == "FAILED" and exit_code(jid) == "3:0", log
    assert "rank 1 failed with exit 3 (the step was stopped)" in log, log
    # rank 1's crash is the root cause, not rank 0's collateral gloo error, and its log is shown
    out = lh.tail(root / "logs" / f"gptoss-debug-{jid}.out", 60)
    assert "root cause (first failure): rank 1 on node02 exited 3" in out, log
    assert "rank 1 crashes at step 2" in out, log
    assert elapsed < 60, f"{elapsed:.0f} s: the step was not brought down at once\n{log}"
    assert lh.job_field(jid, "Restarts") == "0"
