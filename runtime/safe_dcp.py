"""Reading DCP checkpoints without executing anything stored in them.

torch DCP reads a checkpoint's `.metadata` with `pickle.load` and every non-tensor item
(optimizer hyperparameters, our JSON train state) with `torch.load(weights_only=False)`: a
pickle planted in either file runs arbitrary code. Checkpoints live for weeks on shared
storage, so this module replaces both readers:

- `.metadata` goes through `MetadataUnpickler`, which resolves only DCP's own metadata
  classes and the few torch/pathlib objects they contain (`torch.Size`, dtypes, layouts,
  paths); any other global is refused with one line naming the file. One exception, for
  the enum DCP stores (`_MEM_FORMAT_ENCODING`): Python 3.11.0-3.11.4 pickle an Enum member
  by name, as `getattr(EnumClass, "NAME")` (3.10 and 3.11.5+ by value, `EnumClass(value)`;
  CPython gh-105332), so `builtins.getattr` resolves to a guarded stand-in that returns a
  member of an allow-listed enum and refuses every other call. Python 3.13's
  `pathlib._local.*Path` names resolve to the same `pathlib` classes.
- non-tensor items go through `torch.load(weights_only=True)` (torch's own allow-list:
  containers, numbers, strings, tensors).

`dcp_load(state, path)` is `dcp.load` with both in place; every checkpoint read goes through
it or `read_metadata_file` (the trainer's resume and `checkpoint.initial_load_path`, the
HF converter's dcp-to-hf). A leaf like errors.py (torch only), so every layer may use it.
"""

from __future__ import annotations

import enum
import io
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than plain data; the message is one line."""


_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# DCP's metadata classes (and the enum TensorProperties pickles its memory format as).
_ALLOWED_METADATA_NAMES = frozenset(dcp_metadata.__all__) | {"_MEM_FORMAT_ENCODING"}
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # file, offset, length
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name, e.g. "torch.strided"
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id (FileSystemWriter makes it a Path)
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}
# Python 3.13 made pathlib a package: its paths pickle as pathlib._local.PosixPath. The same
# classes, resolved through `pathlib` so a 3.13 checkpoint also reads on 3.10 - 3.12.
_PATH_NAMES = frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"})


# `getattr` as Python 3.11.0-3.11.4 pickle an Enum member by name: GLOBAL "__builtin__
# getattr" at protocols 0-2 (the unpickler maps it to builtins only inside the base
# find_class, so an override sees the Python 2 name), "builtins getattr" at 3, STACK_GLOBAL
# at 4+.
_GETATTR_GLOBALS = {("builtins", "getattr"), ("__builtin__", "getattr")}
# Enums a DCP .metadata can hold: TensorProperties pickles its memory format as one (torch
# 2.11 - 2.13; the planner's WriteItemType/LoadItemType live in save/load plans, which are
# never written to a file).
_ALLOWED_ENUMS = (dcp_metadata._MEM_FORMAT_ENCODING,)


def _describe(obj: Any) -> str:
    """A short one-line name for an object in a refusal message."""
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, str):
        return repr(obj[:60])
    return f"a {type(obj).__name__}"


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP `.metadata` and nothing else."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def _enum_member_by_name(self, *args: Any) -> enum.Enum:
        """Stands in for `getattr`: whatever opcode calls it (REDUCE, or INST/OBJ at protocols
        0/1) passes the arguments here, so this is the only place they are checked. Returns
        `cls.__members__[name]` for an allow-listed enum class and one of its member names
        (exactly what `getattr` would return); refuses anything else (another object, a
        non-member attribute like `__class__` or `_member_map_`, a default argument)."""
        if len(args) == 2:
            cls, name = args
            if (any(cls is allowed for allowed in _ALLOWED_ENUMS) and type(name) is str
                    and name in cls.__members__):
                return cls.__members__[name]
        shown = ", ".join(_describe(a) for a in args[:3])
        raise UnsafeCheckpointError(
            f"{self.source}: refused to load: it calls builtins.getattr({shown}), which is "
            "not an enum member of a DCP checkpoint's metadata (a planted or foreign file?)")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GETATTR_GLOBALS:
            return self._enum_member_by_name
        if module == "pathlib._local" and name in _PATH_NAMES:
            return getattr(pathlib, name)
        allowed = (module == _METADATA_MODULE and name in _ALLOWED_METADATA_NAMES) or (
            (module, name) in _ALLOWED_GLOBALS) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise UnsafeCheckpointError(
                f"{self.source}: refused to load: it references {module}.{name}, which is not "
                f"part of a DCP checkpoint's metadata (a planted or foreign file?)")
        return super().find_class(module, name)


def read_metadata_file(path: str | Path) -> dcp_metadata.Metadata:
    """A `.metadata` file through the allow-listing unpickler."""
    source = str(path)
    with open(path, "rb") as f:
        try:
            metadata = MetadataUnpickler(f, source).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # truncated/garbage bytes: any unpickling error
            raise UnsafeCheckpointError(f"{source}: not a readable DCP metadata file "
                                        f"({type(e).__name__}: {e})") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise UnsafeCheckpointError(f"{source}: holds a {type(metadata).__name__}, "
                                    "not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata comes from `read_metadata_file`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")  # per-rank metadata files (no_dist loads on newer torch)
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        metadata = read_metadata_file(Path(self.path) / name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items are read with `weights_only=True`."""

    def __init__(self, source: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.source = source  # the checkpoint directory, for messages

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:  # weights_only refuses any non-allow-listed global
            found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(e))
            why = f"it references {found.group(1)}" if found else " ".join(str(e).split())[:160]
            raise UnsafeCheckpointError(
                f"{self.source}: refused to load item {fqn!r}: {why}, which is not plain "
                "data (a planted or foreign file?)") from None
        # Hand the already-safe object to DefaultLoadPlanner's own placement logic.
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        super().load_bytes(read_item, buffer)


def dcp_load(state: dict[str, Any], path: str | Path, *, no_dist: bool = False) -> None:
    """`dcp.load(state, checkpoint_id=path)` that never unpickles anything but plain data
    (no_dist: this process alone, even inside a process group). Raises UnsafeCheckpointError
    (one line) for a refused file."""
    read_metadata_file(Path(path) / ".metadata")  # refuse early, outside DCP's error wrapping
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)),
                 planner=SafeLoadPlanner(str(path)), no_dist=no_dist)
    except CheckpointException as e:  # DCP gathers every rank's failure: surface ours as is
        for exc, _trace in e.failures.values():
            if isinstance(exc, UnsafeCheckpointError):
                raise UnsafeCheckpointError(str(exc)) from None
        raise
