"""Sharded HF loading on gloo with 2 processes equals the single-process load, and each rank
reads only the slices it owns.

Cases (one spawn, to pay process start-up once):
  * FSDP2: `fully_shard` per block + root (every parameter Shard(0), uneven: 3 experts on 2 ranks),
    from a dense fp32 checkpoint and from an MXFP4 one; the sharded forward matches too.
  * EP/ETP/TP-like DTensors on an MXFP4 checkpoint: experts Shard(0) (layer 0), mlp1 Shard(1)
    and mlp2 Shard(2) (layer 1: 96 columns split 48/48, so each rank reads the 32-blocks that
    cover its half, one of them shared), attention colwise/rowwise.
Then `save_hf` from both parallelized models (gather + rank-0 write) reads back equal.
Every `read_slice` call is recorded and compared with the expected per-rank ranges, derived
here independently from torch.chunk semantics.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel_harness import process_context

from runtime.hf.keymap import is_transposed, runtime_to_hf_key
from runtime.model import GptOssModel, ModelArgs

WORLD = 2
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=96,
                 moe_inter_dim=96, num_experts=3, top_k=2, sliding_window=4,
                 compute_dtype="float32", attn_backend="math")

# EP / ETP / TP-like placements for the DTensor case: runtime key -> sharded tensor dim.
EP_TP_SHARDING = {
    "layers.0.moe.experts.mlp1_weight": 0, "layers.0.moe.experts.mlp1_bias": 0,
    "layers.0.moe.experts.mlp2_weight": 0, "layers.0.moe.experts.mlp2_bias": 0,
    "layers.1.moe.experts.mlp1_weight": 1, "layers.1.moe.experts.mlp1_bias": 1,
    "layers.1.moe.experts.mlp2_weight": 2,
    "layers.0.attention.wq.weight": 0, "layers.0.attention.wq.bias": 0,
    "layers.0.attention.wo.weight": 1, "layers.0.attention.sinks": 0,
}


# ---------------------------------------------------------------------------- expectations
def _chunk(size: int, rank: int) -> tuple[int, int]:
    """torch.chunk / Shard semantics: ceil-sized chunks, the last ones short or empty."""
    step = -(-size // WORLD)
    start = min(rank * step, size)
    return start, min(start + step, size)


def _expected_reads(shapes: dict[str, tuple], sharding: dict[str, int], rank: int, mxfp4: bool) -> dict:
    """hf key -> the one (start, stop) index each rank should request, None if it reads nothing."""
    expected = {}
    for key, shape in shapes.items():
        region = [(0, n) for n in shape]
        if key in sharding:
            region[sharding[key]] = _chunk(shape[sharding[key]], rank)
        empty = any(b <= a for a, b in region)
        hf_key = runtime_to_hf_key(key)
        if not is_transposed(key):
            expected[hf_key] = None if empty else tuple(region)
        elif not mxfp4:  # HF stores [E, in, out]
            expected[hf_key] = None if empty else tuple(region[:-2] + [region[-1], region[-2]])
        else:  # blocks covering the columns, whole 16-byte blocks
            c0, c1 = region[-1]
            groups = (c0 // 32, -(-c1 // 32))
            expected[f"{hf_key}_blocks"] = None if empty else tuple(region[:-1] + [groups, (0, 16)])
            expected[f"{hf_key}_scales"] = None if empty else tuple(region[:-1] + [groups])
    return expected


# ---------------------------------------------------------------------------- worker
def _record_reads():
    from runtime.hf.reader import HFCheckpoint

    reads: list[tuple[str, tuple]] = []
    original = HFCheckpoint.read_slice

    def recording(self, name, hf_key, index):
        reads.append((hf_key, tuple((s.start, s.stop) for s in index)))
        return original(self, name, hf_key, index)

    HFCheckpoint.read_slice = recording
    return reads


def _check_reads(reads, shapes, sharding, rank, mxfp4, case):
    expected = _expected_reads(shapes, sharding, rank, mxfp4)
    got: dict[str, list] = {}
    for hf_key, index in reads:
        got.setdefault(hf_key, []).append(index)
    for hf_key, index in expected.items():
        want = [] if index is None else [index]
        actual = got.pop(hf_key, [])
        assert actual == want, f"{case} rank {rank}: {hf_key} read {actual}, expected {want}"
    assert not got, f"{case}: unexpected reads {got}"


def _fsdp_case(path, mxfp4, rank, mesh, reference, reads, tokens):
    from torch.distributed.fsdp import fully_shard

    from runtime.hf.load import load_hf_into

    with torch.device("meta"):
        model = GptOssModel(ARGS)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    reads.clear()
    load_hf_into(model, path, progress=True)  # the line goes to rank 0's stderr only

    shapes = {k: tuple(p.shape) for k, p in reference.named_parameters()}
    _check_reads(reads, shapes, {k: 0 for k in shapes}, rank, mxfp4, f"fsdp[{path.name}]")
    ref = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert param.to_local().shape[0] == _chunk(param.shape[0], rank)[1] - _chunk(param.shape[0], rank)[0]
        assert torch.equal(param.full_tensor(), ref[name]), name
    assert all(not layer.moe.expert_bias.any() for layer in model.layers.values())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=1e-5, rtol=0)
    return model


def _ep_tp_case(path, rank, mesh, reference, reads):
    from torch import nn
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from runtime.hf.load import load_hf_into

    model = GptOssModel(ARGS)  # plain CPU tensors (replicated) except the DTensors below
    for key, dim in EP_TP_SHARDING.items():
        module_name, attr = key.rsplit(".", 1)
        module = model.get_submodule(module_name)
        zeros = torch.zeros(getattr(module, attr).shape)
        setattr(module, attr, nn.Parameter(distribute_tensor(zeros, mesh, [Shard(dim)])))
    reads.clear()
    load_hf_into(model, path, progress=False)

    shapes = {k: tuple(p.shape) for k, p in reference.named_parameters()}
    _check_reads(reads, shapes, EP_TP_SHARDING, rank, True, "ep_tp")
    ref = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        assert isinstance(param, DTensor) == (name in EP_TP_SHARDING)
        assert torch.equal(full, ref[name]), name
    return model


def _worker(rank: int, port: int, dense_dir, mxfp4_dir, out_dir) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from runtime.hf import load_hf, save_hf

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (WORLD,))
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    overrides = {"compute_dtype": "float32", "attn_backend": "math"}
    references = {p: load_hf(p, model_args_overrides=overrides, progress=False) for p in (dense_dir, mxfp4_dir)}
    reads = _record_reads()

    fsdp_model = _fsdp_case(dense_dir, False, rank, mesh, references[dense_dir], reads, tokens)
    _fsdp_case(mxfp4_dir, True, rank, mesh, references[mxfp4_dir], reads, tokens)
    ep_model = _ep_tp_case(mxfp4_dir, rank, mesh, references[mxfp4_dir], reads)

    # save_hf from the parallelized models: every rank gathers, rank 0 writes, all read back.
    for model, reference, out in ((fsdp_model, references[dense_dir], out_dir / "from_fsdp"),
                                  (ep_model, references[mxfp4_dir], out_dir / "from_ep_tp")):
        save_hf(model, out, dtype=torch.float32, max_shard_size="100KB", progress=False)
        saved = dict(load_hf(out, progress=False).named_parameters())
        for name, param in reference.named_parameters():
            assert torch.equal(saved[name], param), f"{out.name}: {name}"

    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown (slow, and noisy with gloo threads)


# ---------------------------------------------------------------------------- test
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from runtime.hf import save_hf

    torch.manual_seed(0)
    model = GptOssModel(ARGS)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.copy_(torch.randn_like(p) * 0.5)
    dense = tmp_path_factory.mktemp("dense")
    mxfp4 = tmp_path_factory.mktemp("mxfp4")
    save_hf(model, dense, dtype=torch.float32, max_shard_size="100KB", progress=False)
    save_hf(model, mxfp4, experts_format="mxfp4", progress=False)
    return dense, mxfp4


def test_sharded_load_equals_single_process_and_reads_only_owned_slices(checkpoints, tmp_path):
    dense, mxfp4 = checkpoints
    process_context()  # ranks fork from the harness's forkserver (torch already imported)
    mp.start_processes(_worker, args=(_free_port(), dense, mxfp4, tmp_path), nprocs=WORLD,
                       join=True, start_method="forkserver")


def test_expected_reads_helper_matches_chunk_semantics():
    # The oracle above must itself agree with torch.chunk (what Shard uses).
    for size in (1, 3, 4, 96):
        pieces = torch.arange(size).chunk(WORLD)
        for rank in range(WORLD):
            start, stop = _chunk(size, rank)
            got = pieces[rank].tolist() if rank < len(pieces) else []
            assert list(range(start, stop)) == got
