"""Free space for checkpoints: a save that cannot fit is refused before it starts, and a save
that failed because the disk filled is named as such.

A full disk is hard to recognise from the failure alone: DCP writes through torch's zip
writer, which reports ENOSPC as `RuntimeError: ... unexpected pos 704 vs 598` (no errno). So a
failed save is classed as "out of space" when an ENOSPC/EDQUOT error is in its chain, or when
what is still free cannot hold the rest of the save (its expected size minus what it had
written); anything else is re-raised as the bug it is.

The expected size of a save is that of the last complete checkpoint (its manifest's sizes:
exact, since every save of a run has the same tensors); before the first one, the bytes of the
state about to be written (an estimate: DCP adds a few KB of index and pickled items).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch

from runtime.errors import DiskFullError

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_SPACE_WORDS = ("No space left on device", "Disk quota exceeded")


def free_bytes(folder: Path) -> int:
    """Bytes this (unprivileged) user may still write in `folder`'s filesystem."""
    return shutil.disk_usage(folder).free


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (0 if it is gone)."""
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def state_bytes(state: dict, rank: int) -> int:
    """This rank's share of the bytes DCP writes for `state` (Stateful objects or tensors):
    a DTensor's local shard once per replica group, a plain tensor on rank 0 only (DCP
    writes each replicated tensor once)."""
    from torch.distributed.tensor import DTensor, Replicate  # torch >= 2.4, public

    total = 0
    for obj in state.values():
        flat = obj.state_dict() if hasattr(obj, "state_dict") else obj
        for t in _tensors(flat):
            if isinstance(t, DTensor):
                coords = t.device_mesh.get_coordinate() or []
                replica = any(isinstance(p, Replicate) and c != 0
                              for p, c in zip(t.placements, coords))
                total += 0 if replica else t.to_local().nbytes
            elif rank == 0:
                total += t.nbytes
    return total


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def is_out_of_space(error: BaseException, folder: Path, still_needed: int) -> bool:
    """Whether `error` (a failed save into `folder`) was the disk filling up."""
    seen: list[BaseException] = []
    todo = [error]
    while todo:  # the exception chain, and the per-rank failures of DCP's CheckpointException
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        if isinstance(e, OSError) and e.errno in _SPACE_ERRNOS:
            return True
        if any(word in str(e) for word in _SPACE_WORDS):
            return True
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
    try:
        return free_bytes(folder) < still_needed
    except OSError:
        return False


def refuse_if_short(folder: Path, needed: int, basis: str, what: str, after: str) -> int:
    """Free bytes of `folder`; raises DiskFullError when fewer than `needed` (`basis` says
    where that number comes from, `what` is the save, `after` what the user should know)."""
    free = free_bytes(folder)
    if free < needed:
        raise DiskFullError(out_of_space_message(folder, needed, free, basis, what, after))
    return free


def out_of_space_message(folder: Path, needed: int, free: int, basis: str, what: str,
                         after: str) -> str:
    return (f"{what}: no space in {folder}: it needs {needed:,} bytes ({basis}) and "
            f"{free:,} bytes are free; {after}")
