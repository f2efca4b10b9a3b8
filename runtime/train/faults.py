"""Graceful stops on signals (scancel, the Slurm time limit, Ctrl-C), and non-finite losses or
gradient norms (stop, or skip the step up to training.max_skipped_steps times; a step with no
trained token is skipped and counted the same way).

What each signal means (the contract the launchers in slurm/ and submit.py rely on):

  SIGUSR1  the time-limit warning (`#SBATCH --signal=USR1@<s>`): finish the step, save a
           checkpoint, exit 75 (EXIT_REQUEUE) so the launcher requeues the job, which resumes.
           Without a checkpoint to resume from (checkpoint.enable = false), a requeued job would
           start again at step 0, so the run exits 128 + SIGUSR1 instead and is not requeued.
  SIGTERM  scancel, preemption, the time limit itself: finish the step, save, exit for good
           (128 + SIGTERM = 143, what a shell reports for a process that SIGTERM ended). If Slurm
           preempts with requeue, Slurm itself requeues the job; the launchers never do.
  SIGINT   Ctrl-C: as SIGTERM (exit 130). A second Ctrl-C stops at once (os._exit(130)):
           safe, because a checkpoint is only ever published by a rename after it is complete.

A signal that arrives while the trainer waits for its next batch still finishes a step and
saves when the batch arrives within training.stop_data_wait_s (default 10 s): with several
ranks, a rank that stopped at once would leave the others inside the step's first collective
(which then fails with "connection reset by peer", or hangs for the NCCL timeout), and one
rank's stop must never depend on where in its loop the signal found it. Only a batch that
does not come within that time (a stalled source) stops without saving.

During start-up (from the entry point's first line to the first step: imports, config, lock,
data checks, model build, resume) there is no step to finish and nothing new to save: the
same signals stop at once. The handler raises `StartupStopped` (a BaseException, so no
`except Exception` swallows it; `finally` blocks still clean up); the Trainer releases the
dump-folder lock and the entry point prints one line and exits with the code above (USR1:
75 when checkpoints are on, as the job resumes from its last one, else 138). This module
imports no torch at load time: `python -m runtime.train` installs it before `import torch`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time

from runtime.errors import EXIT_REQUEUE


class NonFiniteLossError(RuntimeError):
    pass


class StopWhileWaiting(Exception):
    """A stop signal arrived while the trainer waited for data (StopSignal.interrupting)."""


class StartupStopped(BaseException):
    """A stop signal arrived during start-up (before the first step)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignal:
    """Records the stop signals; the trainer finishes the step, saves and exits with
    :meth:`exit_code`.

    Ranks may receive a signal at slightly different times (or different signals: submitit's
    preemption is SIGTERM then the time-limit signal), so `should_stop` agrees on the strongest
    one across ranks (one tiny all-reduce per step) before anyone starts saving.
    """

    # weakest first: when several arrive, the time-limit signal wins, so the checkpoint is made
    # for a requeue (submitit's preemption sends SIGTERM, then its time-limit signal); whether
    # the job is requeued is the scheduler's call: a cancelled job is not.
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    #: a second SIGINT this soon after the first is the same Ctrl-C delivered twice (torchrun's
    #: agent forwards the terminal's SIGINT to workers that already got it), not a second one
    DUPLICATE_WINDOW_S = 0.5

    def __init__(self):
        self.received: int | None = None  # the strongest signal this process got
        self.agreed: int | None = None  # the strongest signal any rank got (after should_stop)
        self.starting = False  # start-up: a signal raises StartupStopped (once)
        self._deferring = False
        self._raised = False
        self._first_sigint: float | None = None
        self._previous = {}
        self._interrupting = False
        self._received_at: float | None = None  # time.monotonic() of the first stop signal
        self.data_wait_s = 0.0  # training.stop_data_wait_s: Trainer.run() sets it (0: at once)
        self._wake_timer: threading.Timer | None = None
        self._waking = False  # the next signal is the wake-up sent by _wake_timer

    def install(self, starting: bool = False) -> "StopSignal":
        """Take over the stop signals; `starting`: stop at once (raise StartupStopped) until
        `started()` is called at the first step."""
        self.starting = starting
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def started(self) -> None:
        """The first step begins: from now on a signal finishes the step and saves. A signal
        that arrived during a `deferred()` block and was not raised yet is raised now."""
        self._raise_pending()
        self.starting = False

    @contextlib.contextmanager
    def deferred(self):
        """Within this block a start-up signal is only recorded, and raised at its end: what
        the block creates (the dump-folder lock file) is never left half-made."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self.starting and self.received is not None and not self._raised:
            self._raised = True
            raise StartupStopped(self.received)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self._waking:  # our own wake-up (_wake_after): the wait for data is over
            self._waking = False
            if self._interrupting:
                self._stop_waiting()
            return
        if self._received_at is None:  # the wait for data is counted from the first signal
            self._received_at = time.monotonic()
        if self.starting:  # raised once; a repeat (torchrun forwards Ctrl-C again) is ignored
            self.received = self.received or signum
            if not self._deferring:
                self._raise_pending()
            return
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > self.DUPLICATE_WINDOW_S:
                print("second Ctrl-C: stopping now, without saving (the last complete "
                      "checkpoint stays the latest)", file=sys.stderr, flush=True)
                os._exit(128 + signal.SIGINT)
            if self._first_sigint is None:
                self._first_sigint = now
                print("Ctrl-C: finishing this step, saving, then exiting "
                      "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        if self.received is None or self._strength(signum) > self._strength(self.received):
            self.received = signum
        if self._interrupting:  # waiting for data: give the batch its time, then stop
            self._wait_or_stop()

    @contextlib.contextmanager
    def interrupting(self):
        """While inside (the trainer waiting for the next batch), a stop signal lets the
        batch arrive for `data_wait_s` seconds after the signal (the step then runs, and
        should_stop saves), then raises StopWhileWaiting from the main thread: a stop never
        depends on data arriving (a slow or stuck source, a queue that never fills)."""
        self._interrupting = True
        try:
            if self.received is not None:  # arrived after the last step's check
                self._wait_or_stop()
            yield
        finally:
            self._interrupting = False
            if self._wake_timer is not None:
                self._wake_timer.cancel()
                self._wake_timer = None
        # _waking is cleared by _handle only: a wake-up already sent must still be known as
        # ours when it lands after the batch (a SIGINT would otherwise read as a 2nd Ctrl-C)

    def _wait_or_stop(self) -> None:
        """Inside interrupting(): raise StopWhileWaiting once data_wait_s have passed since
        the signal, else wake the main thread up when they will have."""
        left = self._received_at + self.data_wait_s - time.monotonic()
        if left <= 0:
            self._stop_waiting()
        if self._wake_timer is None:
            # TIMEOUT_MAX: a huge training.stop_data_wait_s (1e30) means "wait", not a crash
            self._wake_timer = threading.Timer(min(left, threading.TIMEOUT_MAX), self._wake_after)
            self._wake_timer.daemon = True
            self._wake_timer.start()

    def _stop_waiting(self) -> None:
        self._interrupting = False
        raise StopWhileWaiting(self.received)

    def _wake_after(self) -> None:
        """Timer thread: a real signal to the main thread interrupts its blocking wait (a
        queue, a lock, a sleep) where a flag could not; _handle knows it by `_waking`."""
        if self._interrupting:
            self._waking = True
            signal.pthread_kill(threading.main_thread().ident, self.received)

    def stopped_waiting(self, step: int, checkpoint_enabled: bool) -> tuple[int, str]:
        """(exit code, log line) after StopWhileWaiting: no collective (other ranks may be
        anywhere) and no save; the last complete checkpoint stays the latest."""
        self.agreed = self.received
        code = self.exit_code(checkpoint_saved=checkpoint_enabled)
        name = signal.Signals(self.agreed).name
        return code, (f"{name} while waiting for the data of step {step}: no batch within "
                      f"training.stop_data_wait_s = {self.data_wait_s:g} s, stopped without "
                      f"saving (the last checkpoint stays the latest); exit {code}")

    @classmethod
    def _strength(cls, signum: int | None) -> int:
        return 0 if signum is None else cls.SIGNALS.index(signum) + 1

    def should_stop(self, device) -> int | None:
        """The signal every rank stops on (None: keep going). A collective on every rank."""
        import torch
        import torch.distributed as dist

        strength = self._strength(self.received)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([float(strength)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            strength = int(t.item())
        self.agreed = self.SIGNALS[strength - 1] if strength else None
        return self.agreed

    def exit_code(self, checkpoint_saved: bool) -> int:
        """75 (requeue) for the time-limit signal when the run can resume from a checkpoint,
        else 128 + the signal: the job ends for good."""
        if self.agreed == signal.SIGUSR1 and checkpoint_saved:
            return EXIT_REQUEUE
        return 128 + int(self.agreed or signal.SIGTERM)

    def describe(self, step: int, code: int, checkpoint_saved: bool) -> str:
        """One line for the log: which signal, what was done, what happens next."""
        name = signal.Signals(self.agreed or signal.SIGTERM).name
        saved = "checkpoint saved" if checkpoint_saved else "no checkpoint (checkpoint.enable = false)"
        if code == EXIT_REQUEUE:
            return f"{name} (time limit): stopped after step {step}, {saved}; exit {code}: requeue"
        if self.agreed == signal.SIGUSR1:
            return (f"{name} (time limit): stopped after step {step}, {saved}: a requeued job "
                    f"would restart from step 0, so exit {code} (not requeued)")
        return f"{name}: stopped after step {step}, {saved}; exit {code} (not requeued)"


def startup_exit(signum: int, can_resume: bool) -> int:
    """After StartupStopped: print one line (rank 0) and return the exit code to use."""
    code = EXIT_REQUEUE if signum == signal.SIGUSR1 and can_resume else 128 + signum
    name = signal.Signals(signum).name
    after = ": requeue (resumes from its last checkpoint)" if code == EXIT_REQUEUE else \
        " (not requeued)"
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"{name} during start-up: stopped before the first step, nothing trained or "
              f"saved; exit {code}{after}", file=sys.stderr, flush=True)
    return code


def check_finite(value: float, step: int, policy: str, quantity: str = "loss") -> bool:
    """True if the step may proceed; raises on a non-finite `quantity` ("loss", "grad norm")
    unless policy == 'skip'."""
    if math.isfinite(value):
        return True
    if policy == "skip":
        return False
    raise NonFiniteLossError(
        f"non-finite {quantity} {value} at step {step} "
        f"(set training.on_nonfinite='skip' to skip such steps)")


def count_skipped_step(skipped: int, limit: int, step: int, reason: str) -> str:
    """After a skipped step (`skipped` so far, this one included; `reason` such as
    "non-finite loss nan"): the line to log, or NonFiniteLossError once more than `limit`
    steps were skipped."""
    if skipped > limit:
        raise NonFiniteLossError(
            f"{reason} at step {step}: {skipped} steps skipped, more than "
            f"training.max_skipped_steps ({limit}); the run stops (the last checkpoint is intact)")
    return f"step {step}: {reason}, step skipped ({skipped} of at most {limit})"
