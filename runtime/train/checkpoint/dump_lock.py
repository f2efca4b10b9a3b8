"""One job per dump folder: an exclusive lock file `<job.dump_folder>/.lock`.

Two jobs on one folder would resume from each other's steps, delete each other's in-flight
saves and interleave metrics. Rank 0 creates the lock file with O_CREAT|O_EXCL (atomic on
local filesystems, NFSv3+ and Lustre) holding JSON: host, boot id, pid, Slurm job id and
restart count, start time. A second job refuses with one line naming the holder.

A lock left behind by a job that died without cleaning up (kill -9, node failure) is taken
over only when that is certain, never by age (clocks and heartbeats lie on shared storage):
- same host and boot, and the holder's pid is not running (or is this very process);
- the same host rebooted since (its boot id changed);
- the same Slurm job id with another restart count: Slurm runs one instance of a job at a
  time, so a requeued job replaces its own previous incarnation.
Anything else (a live job, or a dead one on another host) must be removed by hand after
checking: `rm <dump_folder>/.lock` (the error message prints the exact command).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
import uuid
from pathlib import Path

LOCK_NAME = ".lock"


class DumpFolderError(RuntimeError):
    """The dump folder (or a folder in it) cannot be used; the message is one line naming it."""


class DumpFolderLocked(DumpFolderError):
    """Another job holds the dump folder; the message is one line naming it."""


def make_folder(folder: Path, key: str = "job.dump_folder") -> None:
    """Create `folder` (and its parents) or raise DumpFolderError naming `key`: a file in the
    way, a parent that cannot be created, a read-only filesystem, no permission."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DumpFolderError(f"{key} {folder}: a file is in the way (not a folder)") from None
    except NotADirectoryError:
        blocker = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
        raise DumpFolderError(f"{key} {folder}: cannot create it ({blocker or 'a parent'} is a "
                              f"file, not a folder)") from None
    except OSError as e:  # read-only filesystem, no permission
        raise DumpFolderError(f"{key} {folder}: cannot create it ({e.strerror})") from None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The kernel's start time of `pid` (tells a reused pid from the original), or ''."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 (starttime), counted after comm


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "token": uuid.uuid4().hex,  # tells two locks of one process apart (release)
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_reason(holder: dict, me: dict) -> str | None:
    """Why `holder` certainly no longer runs (None: it may still run)."""
    same_host = holder.get("host") == me["host"]
    if same_host and holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
        return "its host rebooted since"
    if same_host and holder.get("pid") == me["pid"]:
        return "held by this process"
    pid = holder.get("pid")
    if same_host and isinstance(pid, int) and not _pid_alive(pid):
        return f"pid {pid} is no longer running"
    if same_host and isinstance(pid, int) and holder.get("pid_start") and (
            _process_start(pid) not in ("", holder["pid_start"])):
        return f"pid {pid} now belongs to another process"
    job = holder.get("slurm_job_id")
    restarted = holder.get("slurm_restart_count") != me["slurm_restart_count"]
    if job and job == me["slurm_job_id"] and restarted:
        return f"Slurm job {job} was requeued"
    return None


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}{job}, "
            f"since {holder.get('started', '?')}")


class DumpLock:
    """Acquire with `DumpLock.acquire(folder)`; `release()` removes the file if still ours."""

    def __init__(self, path: Path, record: dict):
        self.path = path
        self.record = record

    @classmethod
    def acquire(cls, folder: str | Path, log=print) -> "DumpLock":
        folder = Path(folder)
        make_folder(folder)
        path = folder / LOCK_NAME
        me = _me()
        for _ in range(3):  # create, or take over one stale lock (a racing job may win)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(path)
                if holder is None:
                    continue  # removed between our open and read: try again
                reason = stale_reason(holder, me)
                if reason is None:
                    raise DumpFolderLocked(
                        f"job.dump_folder {folder} is in use by {describe(holder)} (lock file "
                        f"{path}); if that job is gone, remove it: rm {path}") from None
                if _take_over(path, holder):
                    log(f"dump folder {folder}: took over a stale lock "
                        f"({describe(holder)}: {reason})")
                continue
            except OSError as e:  # read-only filesystem, no permission
                raise DumpFolderError(f"job.dump_folder {folder}: not writable ({e.strerror})"
                                      ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            lock = cls(path, me)
            atexit.register(lock.release)  # a normal exit frees the folder; kill -9 leaves it stale
            return lock
        raise DumpFolderLocked(f"job.dump_folder {folder}: could not take the lock {path} "
                               "(another job is starting on it at the same moment)")

    def release(self) -> None:
        if self.path is None:
            return
        if _read(self.path) == self.record:  # never remove a lock someone else took over
            self.path.unlink(missing_ok=True)
        self.path = None
        atexit.unregister(self.release)


def _read(path: Path) -> dict | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    # An unreadable lock (a crash between create and write): treat as a holder we know nothing
    # about, so that only a human removes it.
    return holder if isinstance(holder, dict) else {"host": "?", "pid": "?", "started": "?"}


def _take_over(path: Path, holder: dict) -> bool:
    """Remove the stale lock `holder` unless someone replaced it meanwhile. The rename to a
    name of our own is atomic, so of two jobs breaking the same lock only one succeeds."""
    aside = path.with_name(f"{LOCK_NAME}.stale.{socket.gethostname()}.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if _read(aside) != holder:  # it was a fresh lock by a job that broke it first: put it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True
