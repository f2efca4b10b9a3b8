"""Checkpoint manifests: the size and CRC32 of every file, written after the data.

`manifest.json` is the last file a save writes into its temp directory, so it also marks the
checkpoint complete. A load first re-reads every listed file: a missing, truncated, extended
or altered file (a zeroed byte range too) makes the checkpoint "damaged", and the caller
falls back to an older one. CRC32 detects accidental damage at ~2 GB/s per core (sha256 is
3x slower here); tampering is the unpickler's and the lock's business, not this file's.

Hashing a 120b checkpoint (~1.4 TB with optimizer state) on one rank would take many minutes:
`files_for_rank` splits the files over the ranks, and the caller combines the results.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 16 << 20


def crc32_file(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def data_files(folder: Path) -> list[str]:
    """Every regular file of a checkpoint directory but the manifest, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)


def files_for_rank(names: list[str], rank: int, world_size: int) -> list[str]:
    return names[rank::world_size]


def describe_files(folder: Path, names: list[str]) -> dict[str, dict]:
    return {name: {"size": (folder / name).stat().st_size, "crc32": crc32_file(folder / name)}
            for name in names}


def write_manifest(folder: Path, files: dict[str, dict], step: int) -> None:
    """Atomically (temp file + fsync + rename) write the manifest of `folder`."""
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "step": step, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> tuple[dict[str, dict] | None, str | None]:
    """(files, None) or (None, why the manifest is unusable)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None, "no manifest.json (incomplete, or written by an older version)"
    try:
        data = json.loads(path.read_bytes())
        files = data["files"]
        ok = isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("size"), int)
            and isinstance(v.get("crc32"), str)
            for v in files.values())
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        return None, "manifest.json is unreadable"
    return files, None


def check_sizes(folder: Path, files: dict[str, dict]) -> str | None:
    """Cheap first pass (stat only): the first missing or resized file, or None."""
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']}"
    return None


def check_checksums(folder: Path, files: dict[str, dict], names: list[str]) -> str | None:
    """The first of `names` whose CRC32 differs from the manifest's, or None."""
    for name in names:
        if crc32_file(folder / name) != files[name]["crc32"]:
            return f"{name} fails its checksum"
    return None
