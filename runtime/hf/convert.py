"""Convert between HF gpt-oss checkpoints and torch.distributed.checkpoint (DCP) directories.

    python -m runtime.hf.convert hf-to-dcp SRC DST [--dtype float32]
    python -m runtime.hf.convert dcp-to-hf SRC DST [--dtype bfloat16] [--flavor F | --config-json PATH]

hf-to-dcp writes `{"model": runtime_state_dict}`, the trainer's `initial_load_path` format.
It materializes the whole model in `--dtype` on this machine (120b: ~470 GB in float32);
for big models prefer the trainer's `checkpoint.initial_load_hf`, which loads sharded.

dcp-to-hf reads the "model" entry of a model-only DCP or of a full trainer checkpoint
(optimizer and the rest are never read), one output shard at a time, so memory stays
around one shard. The architecture comes from --config-json (an HF config.json or its
directory), --flavor (runtime.model.FLAVORS), or else is inferred from the tensor shapes
with gpt-oss defaults for what shapes cannot tell (top_k=4, sliding_window=128, YaRN).
Both run in one process, without a process group.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from runtime.hf.config import hf_config_to_model_args
from runtime.hf.keymap import RUNTIME_ONLY, canonical_runtime_key
from runtime.hf.load import load_hf
from runtime.hf.save import exported_shapes, write_hf_checkpoint
from runtime.model import FLAVORS, ModelArgs
from runtime.safe_dcp import dcp_load, read_metadata_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_KEY = "model"


# ---------------------------------------------------------------------------- HF -> DCP
def hf_to_dcp(src: str, dst: str | Path, *, dtype: torch.dtype = torch.float32,
              allow_download: bool = False, progress: bool = True) -> None:
    model = load_hf(src, dtype=dtype, allow_download=allow_download, progress=progress)
    # Includes the (zeroed) expert_bias buffers, so a trainer with load balancing finds them.
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({MODEL_KEY: model.state_dict()}, checkpoint_id=str(dst), no_dist=True)


# ---------------------------------------------------------------------------- DCP -> HF
@dataclass(frozen=True)
class _Stored:
    name: str  # key inside the "model" dict, as saved (wrapper components included)
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_dcp_model_entries(src: str | Path) -> dict[str, _Stored]:
    """runtime key -> how it is stored, for every tensor under the top-level "model" key."""
    if not (Path(src) / ".metadata").is_file():
        raise FileNotFoundError(f"{src}: not a DCP checkpoint (no .metadata file)")
    metadata = read_metadata_file(Path(src) / ".metadata")  # never unpickles foreign objects
    prefix = MODEL_KEY + "."
    entries: dict[str, _Stored] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if not fqn.startswith(prefix) or not isinstance(meta, TensorStorageMetadata):
            continue
        name = fqn[len(prefix):]
        entries[canonical_runtime_key(name)] = _Stored(name, tuple(meta.size), meta.properties.dtype)
    if not entries:
        raise ValueError(f"{src}: the DCP checkpoint has no tensors under the top-level '{MODEL_KEY}' key")
    return entries


def infer_model_args(shapes: dict[str, tuple[int, ...]]) -> ModelArgs:
    """Architecture from tensor shapes; gpt-oss defaults for everything shapes do not determine."""
    try:
        vocab_size, dim = shapes["tok_embeddings.weight"]
        n_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("layers."))
        (n_heads,) = shapes["layers.0.attention.sinks"]
        head_dim = shapes["layers.0.attention.wq.weight"][0] // n_heads
        n_kv_heads = shapes["layers.0.attention.wk.weight"][0] // head_dim
        num_experts, two_f, _ = shapes["layers.0.moe.experts.mlp1_weight"]
    except (KeyError, ValueError) as err:
        raise ValueError(f"cannot infer the architecture from the checkpoint ({err!r} missing or "
                         "malformed); pass --flavor or --config-json") from err
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                     vocab_size=vocab_size, moe_inter_dim=two_f // 2, num_experts=num_experts,
                     top_k=min(4, num_experts))


def _args_from_config_json(path: str | Path) -> ModelArgs:
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config.json not found")
    try:
        return hf_config_to_model_args(json.loads(path.read_text()))
    except KeyError as err:
        raise ValueError(f"{path}: missing field {err}") from err
    except ValueError as err:
        raise ValueError(f"{path}: {str(err).removeprefix('config.json: ')}") from err


def dcp_to_hf(src: str | Path, dst: str | Path, *, dtype: torch.dtype = torch.bfloat16,
              flavor: str | None = None, config_json: str | Path | None = None,
              max_shard_size: int | str = "5GB", progress: bool = True,
              args: ModelArgs | None = None, experts_format: str = "dense") -> ModelArgs:
    """Write the model of a DCP checkpoint as an HF checkpoint. The architecture comes from
    `args` (the trainer's), `config_json`, `flavor`, or else the tensor shapes."""
    entries = read_dcp_model_entries(src)
    if args is not None:
        pass
    elif config_json is not None:
        args = _args_from_config_json(config_json)
    elif flavor is not None:
        if flavor not in FLAVORS:
            raise ValueError(f"--flavor {flavor!r} is not one of {sorted(FLAVORS)}")
        args = FLAVORS[flavor]
    else:
        args = infer_model_args({k: e.shape for k, e in entries.items()})
        print(f"dcp-to-hf: architecture inferred from shapes (top_k={args.top_k}, sliding_window="
              f"{args.sliding_window}, YaRN defaults); pass --config-json/--flavor if that is wrong",
              file=sys.stderr)
    shapes = exported_shapes(args)
    _check_entries(src, entries, shapes)

    def fetch(keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        # One dcp.load per output shard: only those tensors are read.
        model = {entries[k].name: torch.empty(entries[k].shape, dtype=entries[k].dtype) for k in keys}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp_load({MODEL_KEY: model}, src, no_dist=True)
        for key in keys:
            yield key, model.pop(entries[key].name)

    # A conversion is one process's job, also when called by rank 0 of a training job.
    write_hf_checkpoint(shapes, fetch, args, dst, dtype=dtype, max_shard_size=max_shard_size,
                        experts_format=experts_format, progress=progress, collective=False)
    return args


def _check_entries(src, entries: dict[str, _Stored], shapes: dict[str, tuple[int, ...]]) -> None:
    for key, entry in entries.items():
        if key not in shapes and not RUNTIME_ONLY.match(key):
            raise ValueError(f"{src}: tensor {MODEL_KEY}.{entry.name} is not a parameter of the "
                             "target architecture (unknown name or config mismatch)")
    for key, shape in shapes.items():
        if key not in entries:
            raise ValueError(f"{src}: missing tensor {MODEL_KEY}.{key}")
        if entries[key].shape != shape:
            raise ValueError(f"{src}: tensor {MODEL_KEY}.{entries[key].name} has shape "
                             f"{list(entries[key].shape)} but the architecture expects {list(shape)}")


# ---------------------------------------------------------------------------- CLI
def _require_empty(path: str, overwrite: bool) -> None:
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())) and not overwrite:
        raise ValueError(f"{path}: destination exists and is not empty (pass --overwrite)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.hf.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_dcp = sub.add_parser("hf-to-dcp", help="HF directory or repo id -> model-only DCP")
    to_dcp.add_argument("src")
    to_dcp.add_argument("dst")
    to_dcp.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    to_dcp.add_argument("--allow-download", action="store_true", help="fetch a repo id from the hub")
    to_hf = sub.add_parser("dcp-to-hf", help="DCP (model-only or full trainer checkpoint) -> HF directory")
    to_hf.add_argument("src")
    to_hf.add_argument("dst")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    arch = to_hf.add_mutually_exclusive_group()
    arch.add_argument("--flavor", choices=sorted(FLAVORS))
    arch.add_argument("--config-json", help="an HF config.json (or its directory) describing the model")
    to_hf.add_argument("--max-shard-size", default="5GB")
    for p in (to_dcp, to_hf):
        p.add_argument("--overwrite", action="store_true", help="allow a non-empty destination")
        p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        _require_empty(opts.dst, opts.overwrite)
        if opts.command == "hf-to-dcp":
            hf_to_dcp(opts.src, opts.dst, dtype=DTYPES[opts.dtype], allow_download=opts.allow_download,
                      progress=not opts.no_progress)
        else:
            dcp_to_hf(opts.src, opts.dst, dtype=DTYPES[opts.dtype], flavor=opts.flavor,
                      config_json=opts.config_json, max_shard_size=opts.max_shard_size,
                      progress=not opts.no_progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{opts.command}: wrote {opts.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
