"""Our hf/ load/save against torch DCP's HuggingFace storage reader/writer (issue #24 item 8).

    python -m benchmarks.bench_hf_parts [--flavor debugmodel] [--big] [--repeat 3]

For each model (the debugmodel flavor and, with --big, a larger synthetic config) on CPU, one
process, no process group:
  load   runtime `load_hf_into` vs `dcp.load` of an HF-keyed state dict (transposed expert
         views) through `HuggingFaceStorageReader` (dense checkpoint) or
         `QuantizedHuggingFaceStorageReader` (MXFP4 checkpoint); tensors compared exactly.
  save   runtime `save_hf` vs `dcp.save` through `HuggingFaceStorageWriter` (full tensors,
         fqn_to_index_mapping = our shard plan); files compared byte for byte and tensor by
         tensor.
Prints one line per measurement (best of --repeat). No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import filecmp
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.quantized_hf_storage import QuantizedHuggingFaceStorageReader

from runtime.hf.keymap import is_transposed, runtime_to_hf_key, runtime_to_hf_tensor
from runtime.hf.load import load_hf_into
from runtime.hf.save import _plan_shards, _stored_bytes, exported_shapes, parse_size, save_hf
from runtime.model import FLAVORS, GptOssModel, ModelArgs

BIG = ModelArgs(dim=1024, n_layers=4, n_heads=16, n_kv_heads=4, head_dim=64, vocab_size=16384,
                moe_inter_dim=1024, num_experts=16, top_k=4)


def _model(args: ModelArgs, seed: int = 0) -> GptOssModel:
    torch.manual_seed(seed)
    model = GptOssModel(args)
    model.init_weights()
    return model


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ---------------------------------------------------------------------------- load
def _hf_view_state_dict(model: GptOssModel, mxfp4: bool) -> dict[str, torch.Tensor]:
    """HF key -> the model's parameter in HF layout (a transposed *view*: DCP copies into it)."""
    sd = {}
    for key, param in model.named_parameters():
        hf_key = runtime_to_hf_key(key)
        if is_transposed(key):
            if mxfp4:  # the quantized reader dequantizes *_blocks into our [E, out, in]
                sd[f"{hf_key}_blocks"] = param.data
            else:
                sd[hf_key] = param.data.transpose(-2, -1)
        else:
            sd[hf_key] = param.data
    return sd


def dcp_load_into(model: GptOssModel, directory: Path, mxfp4: bool) -> None:
    reader = (QuantizedHuggingFaceStorageReader(str(directory)) if mxfp4
              else HuggingFaceStorageReader(str(directory)))
    dcp.load(_hf_view_state_dict(model, mxfp4), storage_reader=reader, no_dist=True)


def bench_load(args: ModelArgs, directory: Path, mxfp4: bool, repeat: int) -> None:
    with torch.device("meta"):
        ours, theirs = GptOssModel(args), GptOssModel(args)
    ours.to_empty(device="cpu")
    theirs.to_empty(device="cpu")
    t_ours = _best(lambda: load_hf_into(ours, directory, progress=False), repeat)
    t_dcp = _best(lambda: dcp_load_into(theirs, directory, mxfp4), repeat)
    p_ours, p_dcp = dict(ours.named_parameters()), dict(theirs.named_parameters())
    equal = all(torch.equal(p_ours[k], p_dcp[k]) for k in p_ours)
    kind = "mxfp4" if mxfp4 else "dense"
    print(f"load {kind:5s}: ours {t_ours:.3f} s, dcp {t_dcp:.3f} s, tensors equal: {equal}")


# ---------------------------------------------------------------------------- save
def dcp_save_hf(model: GptOssModel, out: Path, dtype=torch.bfloat16, max_shard_size="5GB") -> None:
    """The HF export through HuggingFaceStorageWriter (full tensors, one process)."""
    shapes = exported_shapes(model.args)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {k: _stored_bytes(k, s, itemsize, False) for k, s in shapes.items()}
    plan = _plan_shards(list(shapes), sizes, parse_size(max_shard_size))
    params = dict(model.named_parameters())
    sd, index = {}, {}
    for i, keys in enumerate(plan, start=1):
        for key in keys:
            hf_key = runtime_to_hf_key(key)
            sd[hf_key] = runtime_to_hf_tensor(key, params[key].detach().to(dtype)).contiguous()
            index[hf_key] = i
    writer = HuggingFaceStorageWriter(str(out), fqn_to_index_mapping=index)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save(sd, storage_writer=writer, no_dist=True)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def bench_save(model: GptOssModel, tmp: Path, repeat: int, max_shard_size: str) -> None:
    ours, theirs = tmp / "save_ours", tmp / "save_dcp"
    t_ours = _best(lambda: save_hf(model, ours, progress=False, max_shard_size=max_shard_size), repeat)
    t_dcp = _best(lambda: dcp_save_hf(model, theirs, max_shard_size=max_shard_size), repeat)
    files = sorted(p.name for p in ours.glob("*.safetensors"))
    same_names = files == sorted(p.name for p in theirs.glob("*.safetensors"))
    bitwise = same_names and all(filecmp.cmp(ours / f, theirs / f, shallow=False) for f in files)
    a, b = _tensors(ours), _tensors(theirs)
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(theirs / files[0]), framework="pt") as f:
        header = f.metadata()
    print(f"save dense: ours {t_ours:.3f} s, dcp {t_dcp:.3f} s, files {len(files)}, same names "
          f"{same_names}, bitwise equal {bitwise}, tensors equal {equal}; dcp header metadata "
          f"{header}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flavor", default="debugmodel")
    parser.add_argument("--big", action="store_true", help="also the larger synthetic config")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-shard-size", default="20MB")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    configs = [(opts.flavor, FLAVORS[opts.flavor])] + ([("big", BIG)] if opts.big else [])
    for name, args in configs:
        model = _model(args)
        n = sum(p.numel() for p in model.parameters())
        print(f"== {name}: {n / 1e6:.1f} M parameters, torch {torch.__version__}")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            bench_save(model, tmp, opts.repeat, opts.max_shard_size)
            for mxfp4 in (False, True):
                src = tmp / f"src_{mxfp4}"
                save_hf(model, src, dtype=torch.float32, progress=False,
                        experts_format="mxfp4" if mxfp4 else "dense")
                bench_load(args, src, mxfp4, opts.repeat)


if __name__ == "__main__":
    main()
