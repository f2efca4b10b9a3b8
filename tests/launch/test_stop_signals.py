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


# A stop signal while the trainer waits for its next batch (StopSignal.interrupting): the batch
# may still come for training.stop_data_wait_s; only a source slower than that stops unsaved.

def _waiting(stop, signum, seconds: float):
    """Send `signum` to this process while 'waiting for data' (a sleep) of `seconds`."""
    import threading
    import time

    timer = threading.Timer(0.05, os.kill, args=(os.getpid(), signum))
    timer.start()
    try:
        with stop.interrupting():
            time.sleep(seconds)
    finally:
        timer.cancel()


def test_a_batch_that_comes_within_the_wait_is_trained_and_saved():
    import signal as sig

    from runtime.train import faults

    stop = faults.StopSignal().install()
    stop.data_wait_s = 30.0
    try:
        _waiting(stop, sig.SIGTERM, 0.5)  # the batch arrives 0.45 s after the signal: no raise
        assert stop.should_stop(None) == sig.SIGTERM  # the step runs, then every rank saves
    finally:
        stop.uninstall()


def test_a_huge_wait_waits_without_a_crash(monkeypatch):
    """training.stop_data_wait_s = 1e30 (the config refuses only inf, nan and < 0): the wake-up
    timer must not die of an OverflowError in its thread."""
    import signal as sig
    import threading

    from runtime.train import faults

    crashes = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    stop = faults.StopSignal().install()
    stop.data_wait_s = 1e30
    try:
        _waiting(stop, sig.SIGTERM, 0.5)
        assert stop.should_stop(None) == sig.SIGTERM
    finally:
        stop.uninstall()
    assert crashes == []


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_stalled_source_stops_after_the_wait(monkeypatch, signame):
    """The wake-up after the wait interrupts a blocking call; for SIGINT it is not taken for a
    second Ctrl-C (which would os._exit at once, the wait being longer than its window)."""
    import signal as sig
    import time

    from runtime.train import faults

    exits = []
    monkeypatch.setattr(faults.os, "_exit", lambda code: exits.append(code))
    stop = faults.StopSignal().install()
    stop.data_wait_s = 2 * stop.DUPLICATE_WINDOW_S
    start = time.monotonic()
    try:
        with pytest.raises(faults.StopWhileWaiting):
            _waiting(stop, getattr(sig, signame), 60)  # never comes
        assert time.monotonic() - start < 50  # interrupted, not slept through
        assert exits == []
        code, line = stop.stopped_waiting(3, checkpoint_enabled=True)
        assert code == {"SIGTERM": 143, "SIGINT": 130, "SIGUSR1": 75}[signame]
        assert f"{signame} while waiting for the data of step 3: no batch within " \
               "training.stop_data_wait_s = 1 s, stopped without saving" in line
    finally:
        stop.uninstall()


def test_a_signal_just_before_the_wait_still_waits_for_the_batch():
    """The signal lands between the last step's check and the wait: the wait is counted from
    the signal, so the batch still comes in time; once the time is over it stops at once."""
    import signal as sig
    import time

    from runtime.train import faults

    stop = faults.StopSignal().install()
    stop.data_wait_s = 30.0
    try:
        os.kill(os.getpid(), sig.SIGTERM)
        with stop.interrupting():
            time.sleep(0.2)  # the batch
        stop.data_wait_s = 0.0  # no wait left: the next wait stops before it starts
        with pytest.raises(faults.StopWhileWaiting), stop.interrupting():
            time.sleep(60)
    finally:
        stop.uninstall()


SLOW_RANK = """
import os, sys, time
from runtime.data.loader import ParallelAwareDataLoader
real_next, batches = ParallelAwareDataLoader.__next__, [0]
def next_batch(self):  # rank 1's third batch is slow (a cold file, a busy disk)
    batches[0] += 1
    if batches[0] == 3 and os.environ["RANK"] == "1":
        print("WAITING", flush=True)
        time.sleep(2)
    return real_next(self)
ParallelAwareDataLoader.__next__ = next_batch
from runtime.train.trainer import main
sys.exit(main(sys.argv[1:]))
"""


@needs_trainer
def test_scancel_while_one_rank_waits_for_data_saves_on_every_rank(tmp_path):
    """The race the Slurm scancel test hit: rank 0 was inside the step's first collective when
    rank 1, still waiting for its batch, stopped at once; rank 0 then died of "connection reset
    by peer" (exit 1) and nothing was saved. Now rank 1 waits for its batch, and both ranks
    finish the step, save and exit 143."""
    import signal as sig

    from checkpoint_helpers import start_job_ranks

    dump = tmp_path / "dump"
    procs = start_job_ranks(dump, "--training.steps=100000", "--checkpoint.interval=100000",
                            script=SLOW_RANK)
    try:
        lines = []
        for line in procs[1].stdout:
            lines.append(line)
            if line.startswith("WAITING"):
                break
        assert lines and lines[-1].startswith("WAITING"), "".join(lines)
        for proc in procs:  # scancel signals every task of the step
            proc.send_signal(sig.SIGTERM)
        outs = ["".join(p.communicate(timeout=120)) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    outs[1] = "".join(lines) + outs[1]
    assert [p.returncode for p in procs] == [143, 143], outs
    assert "SIGTERM: stopped after step 3, checkpoint saved; exit 143" in outs[0], outs[0]
    assert (dump / "checkpoints" / "latest").read_text().strip() == "step-3", outs
