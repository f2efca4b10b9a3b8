"""Read an HF gpt-oss checkpoint directory lazily, any region of any tensor, in runtime layout.

`HFCheckpoint(dir)` validates everything it can from the safetensors headers alone (index vs
files, names, MXFP4 pairs, dtypes, shapes) before a single weight byte is read, so bad input
fails with one line naming the file and tensor instead of half-loading a model. Reads then
go through `read(source, region)`, which maps a region of the runtime tensor (offsets in
runtime layout) to a `get_slice` of the stored tensor(s): only the bytes of that region (for
MXFP4: the 32-value blocks that cover it) leave the disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from runtime.hf.keymap import is_transposed, parse_hf_key
from runtime.hf.mxfp4 import BLOCK, BYTES_PER_BLOCK, dequantize_mxfp4

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# What a snapshot needs: the HF-format weights, configs and tokenizer, not the `original/`
# (OpenAI-format) or `metal/` copies the openai repos also carry (fnmatch: `*` crosses `/`).
SNAPSHOT_PATTERNS = ["config.json", "generation_config.json", "model*.safetensors", INDEX_NAME,
                     "tokenizer*", "special_tokens_map.json", "chat_template*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

Region = Sequence[tuple[int, int]]  # per runtime dim: [start, stop)


def resolve_checkpoint_dir(path_or_repo_id: str | os.PathLike, *, allow_download: bool = False,
                           revision: str | None = None) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id resolved through the hub cache.

    Offline unless `allow_download=True` (cluster ranks must not race to download 65 GB; fetch
    once with `huggingface-cli download`). HF_HUB_OFFLINE=1 still wins over allow_download.
    A local directory never touches the network.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if path.exists():
        raise FileNotFoundError(f"{text}: is a file; expected an HF checkpoint directory or repo id")
    if not _REPO_ID.match(text):
        raise FileNotFoundError(f"{text}: no such checkpoint directory")
    from huggingface_hub import snapshot_download  # ~0.3 s import: only repo ids need the hub client

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=SNAPSHOT_PATTERNS,
                                      local_files_only=not allow_download))
    except Exception as err:  # the hub raises many types; the user needs one line
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ("" if allow_download else
                f"; download it first (huggingface-cli download {text}) or pass allow_download=True")
        raise FileNotFoundError(
            f"{text}: not a local directory and not available from the Hugging Face hub "
            f"({type(err).__name__}: {detail}){hint}") from err


@dataclass(frozen=True)
class Source:
    """Where one runtime tensor lives. `shape` is in runtime layout."""

    runtime_key: str
    kind: str  # "plain" | "transposed" | "mxfp4"
    file: str
    hf_key: str
    shape: tuple[int, ...]
    scales_file: str | None = None  # mxfp4 only
    scales_key: str | None = None

    @property
    def where(self) -> str:
        return f"{self.file}: tensor {self.hf_key}"


@dataclass(frozen=True)
class _Header:
    file: str
    hf_key: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: "BF16", "F32", "U8", ...


class HFCheckpoint:
    """An opened HF checkpoint directory: `config`, `sources` (runtime key -> Source), `read`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.config = self._read_config()
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}
        try:
            headers = self._read_headers(self._read_weight_map())
            self.sources = _build_sources(headers)
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, path_or_repo_id: str | os.PathLike, *, allow_download: bool = False,
             revision: str | None = None) -> HFCheckpoint:
        return cls(resolve_checkpoint_dir(path_or_repo_id, allow_download=allow_download,
                                          revision=revision))

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._handles.clear()
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ metadata
    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_NAME

    def _read_config(self) -> dict | None:
        if not self.config_path.is_file():
            return None
        try:
            return json.loads(self.config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.config_path}: not valid JSON ({err})") from err

    def _read_weight_map(self) -> dict[str, str]:
        """hf key -> shard file name, from the index or, without one, every *.safetensors."""
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index}: not a safetensors index (no weight_map): {err}") from err
            for hf_key, name in weight_map.items():
                if not (self.directory / name).is_file():
                    raise FileNotFoundError(
                        f"{self.directory / name}: shard listed in {INDEX_NAME} (for tensor {hf_key}) does not exist")
            return dict(weight_map)
        files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.directory}: no {INDEX_NAME} and no *.safetensors files")
        weight_map: dict[str, str] = {}
        for name in files:
            stored = self._handle(name).keys()  # safe_open's header listing, not a dict
            for hf_key in stored:
                if hf_key in weight_map:
                    raise ValueError(f"{self.directory / name}: tensor {hf_key} also in {weight_map[hf_key]}")
                weight_map[hf_key] = name
        return weight_map

    def _read_headers(self, weight_map: dict[str, str]) -> list[_Header]:
        headers, keys_by_file = [], {}
        for hf_key, name in weight_map.items():
            if name not in keys_by_file:
                keys_by_file[name] = set(self._handle(name).keys())
            if hf_key not in keys_by_file[name]:
                raise ValueError(f"{self.directory / name}: tensor {hf_key} listed in {INDEX_NAME} is not in the file")
            view = self._handle(name).get_slice(hf_key)
            headers.append(_Header(name, hf_key, tuple(view.get_shape()), view.get_dtype()))
        return headers

    def _handle(self, name: str):
        if name not in self._handles:
            path = self.directory / name
            try:
                self._handles[name] = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as err:  # SafetensorError, OSError: a truncated or foreign file
                raise ValueError(f"{path}: cannot open as safetensors ({err})") from err
        return self._handles[name]

    def describe(self) -> str:
        index = self.directory / INDEX_NAME
        return str(index if index.is_file() else self.directory)

    # ------------------------------------------------------------------ reading
    def read_slice(self, name: str, hf_key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """The one place bytes are read (tests wrap it to check who reads what)."""
        return self._handle(name).get_slice(hf_key)[index]

    def read(self, source: Source, region: Region) -> torch.Tensor:
        """The runtime-layout tensor[region] of `source` (fp32 for MXFP4, stored dtype otherwise)."""
        index = tuple(slice(start, stop) for start, stop in region)
        if source.kind == "plain":
            return self.read_slice(source.file, source.hf_key, index)
        if source.kind == "transposed":  # HF [E, in, out] holds our [E, out, in]
            hf_index = index[:-2] + (index[-1], index[-2])
            return self.read_slice(source.file, source.hf_key, hf_index).transpose(-2, -1)
        # MXFP4: read the blocks that cover the columns, dequantize, trim to the region.
        c0, c1 = region[-1]
        g0, g1 = c0 // BLOCK, -(-c1 // BLOCK)
        blocks = self.read_slice(source.file, source.hf_key,
                                 index[:-1] + (slice(g0, g1), slice(0, BYTES_PER_BLOCK)))
        scales = self.read_slice(source.scales_file, source.scales_key, index[:-1] + (slice(g0, g1),))
        values = dequantize_mxfp4(blocks, scales)  # [e, r, (g1 - g0) * 32]
        return values[..., c0 - g0 * BLOCK: c1 - g0 * BLOCK]


# ---------------------------------------------------------------------------- source building
def _build_sources(headers: list[_Header]) -> dict[str, Source]:
    """Group the stored tensors by runtime key; every malformed case is a one-line ValueError."""
    parts: dict[str, dict[str, _Header]] = {}
    for header in headers:
        try:
            runtime_key, part = parse_hf_key(header.hf_key)
        except KeyError:
            raise ValueError(f"{header.file}: unknown tensor {header.hf_key} (not a gpt-oss parameter)") from None
        parts.setdefault(runtime_key, {})[part] = header
    return {key: _source(key, entry) for key, entry in parts.items()}


def _source(runtime_key: str, entry: dict[str, _Header]) -> Source:
    tensor, blocks, scales = entry.get("tensor"), entry.get("blocks"), entry.get("scales")
    if tensor is not None and (blocks or scales):
        other = blocks or scales
        raise ValueError(f"{other.file}: tensor {other.hf_key} duplicates {tensor.hf_key} "
                         f"(in {tensor.file}); a checkpoint must hold one of them")
    if tensor is not None:
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{tensor.file}: tensor {tensor.hf_key} has dtype {tensor.dtype}, "
                             f"expected one of {_FLOAT_DTYPES}")
        transposed = is_transposed(runtime_key)
        if transposed and len(tensor.shape) != 3:
            raise ValueError(f"{tensor.file}: tensor {tensor.hf_key} has shape {list(tensor.shape)}, expected 3 dims")
        shape = tensor.shape[:-2] + (tensor.shape[-1], tensor.shape[-2]) if transposed else tensor.shape
        return Source(runtime_key, "transposed" if transposed else "plain", tensor.file, tensor.hf_key, shape)
    return _mxfp4_source(runtime_key, blocks, scales)


def _mxfp4_source(runtime_key: str, blocks: _Header | None, scales: _Header | None) -> Source:
    present = blocks or scales
    if blocks is None or scales is None:
        missing = present.hf_key.rsplit("_", 1)[0] + ("_scales" if scales is None else "_blocks")
        raise ValueError(f"{present.file}: tensor {present.hf_key} has no matching {missing}")
    for header in (blocks, scales):
        if header.dtype != "U8":
            raise ValueError(f"{header.file}: tensor {header.hf_key} has dtype {header.dtype}, expected U8 (MXFP4)")
    # blocks [E, R, G, 16], scales [E, R, G]
    if len(blocks.shape) != 4 or blocks.shape[-1] != BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"{blocks.file}: tensor {blocks.hf_key} has shape {list(blocks.shape)} but "
                         f"{scales.hf_key} has {list(scales.shape)}; expected [E, R, G, {BYTES_PER_BLOCK}] "
                         f"and [E, R, G]")
    shape = blocks.shape[:2] + (blocks.shape[2] * BLOCK,)
    return Source(runtime_key, "mxfp4", blocks.file, blocks.hf_key, shape, scales.file, scales.hf_key)
