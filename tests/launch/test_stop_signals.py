"""runtime/train/faults.py's stop signals and the exit codes launchers act on, in-process and
through `python -m runtime.train`."""

from __future__ import annotations

import os
import subprocess
import sys

import launch_helpers as lh
import pytest
from launch_helpers import REPO, TINY, needs_trainer

from runtime.train.slurm_env import EXIT_REQUEUE

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
