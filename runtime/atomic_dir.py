"""Folders published whole, with the umask's modes: a leaf (standard library only).

A folder another program reads (an HF export, prepared data) is written under a temporary
sibling name and renamed into place only once complete, so its final name never holds a
partial folder. Replacing an existing folder uses renameat2(RENAME_EXCHANGE) where the kernel
and filesystem offer it (Linux >= 3.15: ext4, xfs, btrfs, tmpfs, ...): the two folders swap
in one step, so the name always holds the old complete folder or the new one. Elsewhere the
old folder is first renamed aside (`.<name>.old`), then the new one into place: for that
moment the name is absent, never partial, and `restore_aside` puts the old one back if a kill
fell in between.

Python's tempfile creates files 0600 and folders 0700 (private by design), and safetensors
writes its files the same way; a team on a shared cluster could not read them.
`make_temp_dir` uses mkdir's mode (0777 minus the umask) and `honour_umask` gives a file the
mode open() would have (0666 minus the umask).
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def current_umask() -> int:
    """The process umask, read without changing it (Linux >= 4.7), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give a file written with a private mode (0600) the mode open() would have given it."""
    os.chmod(path, 0o666 & ~current_umask())


def make_temp_dir(final: Path) -> Path:
    """A new, empty sibling of `final` named `.<final name>.tmp-<random>` (mkdir's mode)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = final.parent / f".{final.name}.tmp-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def aside_name(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def replace_dir(tmp: Path, final: Path) -> None:
    """Publish the complete folder `tmp` as `final`, replacing a `final` folder that exists
    (which is deleted once the new one is in place)."""
    if not final.exists():
        os.rename(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp)  # now holds the old folder
        return
    aside = aside_name(final)
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(final, aside)
    os.rename(tmp, final)
    shutil.rmtree(aside)


def restore_aside(final: Path) -> bool:
    """After a kill between replace_dir's two renames: the old folder back under its name."""
    aside = aside_name(final)
    if final.exists() or not aside.is_dir():
        return False
    os.rename(aside, final)
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the kernel or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False  # not glibc >= 2.28 (or not Linux)
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
