"""Checkpoint manifests: the size and CRC32 of every file, written after the data.

`manifest.json` is the last file a save writes into its temp directory, so it also marks the
checkpoint complete. A load first re-reads every listed file: a missing, truncated, extended
or altered file (a zeroed byte range too) makes the checkpoint "damaged", and the caller
falls back to an older one. The checksums are runtime/checksums.py's (CRC32: accidental
damage); tampering is the unpickler's and the lock's business, not this file's.

Hashing a 120b checkpoint (~1.4 TB with optimizer state) on one rank would take many minutes:
`files_for_rank` splits the files over the ranks, and the caller combines the results.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# The checksum helpers live below every layer (prepared data uses them too); re-exported here.
from runtime.checksums import (check_checksums, check_sizes, crc32_file,  # noqa: F401
                               describe_files, files_for_rank, valid_records)

MANIFEST = "manifest.json"
FORMAT = 1


def data_files(folder: Path) -> list[str]:
    """Every regular file of a checkpoint directory but the manifest, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)


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
        ok = valid_records(files)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        return None, "manifest.json is unreadable"
    return files, None
