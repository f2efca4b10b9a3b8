"""The identity of an HF checkpoint directory from its safetensors headers alone.

A LoRA checkpoint stores only the adapters; its base weights are read again from
`checkpoint.initial_load_hf` on every resume, so the checkpoint records which base it was
trained on and a resume refuses another one. The fingerprint is a SHA-256 over every tensor's
(file, name, dtype, shape, data offsets) as the headers state them: a few KB read per file,
no tensor byte, so it costs milliseconds even for 120b. It tells apart another model, size,
dtype (bf16 vs MXFP4) or file layout; two checkpoints written with identical headers (the
same model saved twice with other values) look alike, which the recorded path also names.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from runtime.hf.reader import INDEX_NAME, resolve_checkpoint_dir

# safetensors' own bound on the header size (its reader refuses larger ones).
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of one .safetensors file: {name: {dtype, shape, data_offsets}} plus
    "__metadata__". ValueError naming the file if it is not safetensors."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header size)")
        (size,) = struct.unpack("<Q", raw)
        if size > _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header size {size})")
        body = f.read(size)
    try:
        header = json.loads(body)
    except ValueError:
        header = None
    if not isinstance(header, dict) or len(body) != size:
        raise ValueError(f"{path}: not a safetensors file (unreadable header)")
    return header


def weight_files(directory: Path) -> list[str]:
    """The files the index names or, without one, every *.safetensors (as the loader reads)."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index}: not a safetensors index ({err})") from None
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no {INDEX_NAME} and no *.safetensors files")
    return files


def header_fingerprint(path_or_repo_id: str | os.PathLike) -> str:
    """'sha256:<hex>' of the tensor headers of an HF checkpoint (local dir or cached repo id)."""
    directory = resolve_checkpoint_dir(path_or_repo_id)
    digest = hashlib.sha256()
    for name in weight_files(directory):
        header = read_safetensors_header(directory / name)
        entries = sorted((key, value.get("dtype"), value.get("shape"), value.get("data_offsets"))
                         for key, value in header.items()
                         if key != "__metadata__" and isinstance(value, dict))
        digest.update(json.dumps([name, entries], separators=(",", ":")).encode())
    return f"sha256:{digest.hexdigest()}"
