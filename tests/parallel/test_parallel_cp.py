"""Context parallelism equals the single-process model: logits and every gradient, with
sliding windows, document masks, sinks and both load balancers (gloo, 2 and 4 ranks).

Tolerances are relative to each tensor's scale (tests/helpers/tolerances.py): the gradients are sums
of many terms of magnitude ~500 and their fp32 rounding depends on the summation order, i.e.
on the CPU (an elementwise atol of 2e-5 failed on a Xeon without AVX-512: 1.3e-4 off, 2.6e-7
of the scale). 1e-5 of the scale leaves that 40x headroom; a CP bug (a missed key chunk, a
wrong mask) is off by O(1) of the scale.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
from parallel_harness import process_context
from tolerances import assert_close_to_scale

from runtime.model import FLAVORS, GptOssModel
from runtime.parallel.context_parallel import local_sequence_indices

SEQ = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 8192, (2, SEQ), generator=g)
    doc_ids = torch.zeros(2, SEQ, dtype=torch.long)
    doc_ids[0, 11:] = 1
    doc_ids[0, 20:] = 2
    doc_ids[1, 5:] = 1
    positions = torch.stack([
        torch.cat([torch.arange(n) for n in counts])
        for counts in ((11, 9, 12), (5, 27))])
    probe = torch.randn(2, SEQ, 8192, generator=g)
    return tokens, positions, doc_ids, probe


def _model():
    args = FLAVORS["tiny"].replace(n_layers=2, sliding_window=6, attn_backend="math",
                                   load_balance_coeff=None)
    torch.manual_seed(0)
    model = GptOssModel(args)
    model.init_weights()
    return model


def _reference(docs: bool):
    model = _model()
    tokens, positions, doc_ids, probe = _inputs()
    logits = model(tokens, positions=positions, document_ids=doc_ids if docs else None)
    (logits * probe).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, world, port, balancer, docs, out_queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from runtime.parallel.context_parallel import apply_cp

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
        model = _model()
        cp = apply_cp(model, mesh, balancer)
        assert model.context_parallel is cp  # the model's forward reads its own handle
        tokens, positions, doc_ids, probe = _inputs()
        local = lambda t: cp.shard(t, SEQ)  # noqa: E731
        logits = model(local(tokens), positions=local(positions),
                       document_ids=local(doc_ids) if docs else None)
        (logits * local(probe)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for g in grads.values():  # every rank saw a part of the sequence: sum the parts
            dist.all_reduce(g)
        # numpy, not tensors: tensors travel as shared-memory handles that die with os._exit
        out_queue.put((rank, cp.local_indices(SEQ, "cpu").numpy(), logits.detach().numpy(),
                       {n: g.numpy() for n, g in grads.items()} if rank == 0 else None))
        out_queue.close()
        out_queue.join_thread()  # flush before os._exit kills the queue's feeder thread
        dist.barrier()
    finally:
        dist.destroy_process_group()
        os._exit(0)


@pytest.mark.parametrize("world, balancer, docs", [
    (2, "headtail", True), (4, "headtail", True), (2, "none", False), (4, "headtail", False)])
def test_context_parallel_matches_single_process(world, balancer, docs):
    ctx = process_context()  # ranks forked with torch already imported
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, balancer, docs, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in range(world)]
    for p in procs:
        p.join(timeout=60)
    ref_logits, ref_grads = _reference(docs)
    for rank, indices, logits, grads in results:
        indices = torch.from_numpy(indices)
        assert_close_to_scale(torch.from_numpy(logits), ref_logits[:, indices], 1e-5,
                              f"logits of rank {rank}")
        if grads is not None:
            for name, ref in ref_grads.items():
                assert_close_to_scale(torch.from_numpy(grads[name]), ref, 1e-5, name)


def test_headtail_indices_balance_and_cover():
    for cp in (1, 2, 4):
        parts = [local_sequence_indices(SEQ, cp, r, "headtail") for r in range(cp)]
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(SEQ))
        work = [int((p + 1).sum()) for p in parts]  # causal cost of each rank's queries
        assert max(work) == min(work)


# ----------------------------------------------------------------- through the trainer
# The same global batch on every mesh (see parallel_harness); CP ranks share their samples
# and split each sequence. Tolerances: the harness defaults (losses 1e-5 relative, parameters
# 1e-6 + 1e-5 |ref|), observed differences are summation-order only.

CP_STEPS = 2
DOCUMENT_MASK = "--data.document_mask=true"


@pytest.fixture(scope="module")
def cp_reference(seeded_overrides, reference_run):
    """(overrides, the single-process run) of the tiny model (2 layers) with document masks."""
    return (seeded_overrides() + [DOCUMENT_MASK],
            reference_run(extra=(DOCUMENT_MASK,), steps=CP_STEPS))


@pytest.mark.parametrize("world, extra, dp", [
    (2, ["--parallelism.context_parallel_degree=2", "--parallelism.data_parallel_shard_degree=1"], 1),
    (4, ["--parallelism.context_parallel_degree=4", "--parallelism.data_parallel_shard_degree=1"], 1),
    (4, ["--parallelism.context_parallel_degree=2", "--parallelism.data_parallel_shard_degree=2"], 2),
    (4, ["--parallelism.context_parallel_degree=2", "--parallelism.tensor_parallel_degree=2",
         "--parallelism.data_parallel_shard_degree=1"], 1),
], ids=["cp2", "cp4", "fsdp2_cp2", "cp2_tp2"])
def test_trainer_context_parallel_matches_single_process(cp_reference, world, extra, dp):
    from parallel_harness import assert_parity, global_batch_overrides, run_distributed, summarize

    common, ref = cp_reference
    got = run_distributed(world, common + extra + global_batch_overrides(4, dp), steps=CP_STEPS)
    assert got["info"]["mesh"], got["info"]
    assert_parity(ref, got), summarize(ref, got)
