"""gpu_check part 1, the distributed path: two training steps of the debug model through a real
process group, FSDP2 with bf16 mixed precision (fp32 reduce) and full activation checkpointing,
against the CPU fp32 steps from the same weights and batches.

    torchrun --nproc-per-node 1 benchmarks/check_fsdp_step.py --out results.jsonl     # NCCL
    torchrun --nproc-per-node 1 benchmarks/check_fsdp_step.py --smoke --out ...       # gloo, CPU

The trainer skips FSDP on one rank (nothing to shard), so the parallel passes are applied here
the way runtime/parallel/parallelize.py orders them (AC -> [compile] -> fully_shard on a
one-rank dp_shard mesh): the NCCL/FSDP2 code path runs once on one GPU. Rank 0 writes one
record; exit 1 if it failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from benchmarks.check_correctness import PART
from benchmarks.common import REPO, append_jsonl, check_record
from benchmarks.step_compare import flat_grads, step_errors

CHECK = "torchrun fsdp2 bf16 + full AC step vs cpu fp32"


def random_batch(vocab: int, batch: int, seq: int, seed: int) -> dict:
    """Packed documents: tokens/labels [B, S], positions restarting per document, document ids."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    doc_ids = torch.zeros(batch, seq, dtype=torch.long)
    doc_ids[:, seq // 3:] = 1
    doc_ids[0, (3 * seq) // 4:] = 2
    starts = torch.cat([torch.ones(batch, 1, dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1)
    idx = torch.arange(seq).expand(batch, seq)
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "positions": idx - last_start,
            "document_ids": doc_ids}


def build_model(model_args, cfg, device, mesh=None):
    from runtime.model import GptOssModel
    from runtime.parallel.activation_checkpoint import apply_ac
    from runtime.parallel.compile import apply_compile
    from runtime.parallel.data_parallel import apply_fsdp, mixed_precision_policy

    with torch.device("meta"):
        model = GptOssModel(model_args)
    if mesh is not None:
        apply_ac(model, "full", "op")
        if cfg.compile.enable:
            apply_compile(model, regional=True)
        apply_fsdp(model, mesh, mixed_precision_policy(cfg.training, model_args.compute_dtype, device),
                   reshard=True)
    model.to_empty(device=device)
    model.init_weights()
    return model


def run_steps(model, cfg, batches, device) -> dict:
    from runtime.parallel.gradients import clip_grad_norm_
    from runtime.train.optim import build_optimizer

    optimizer = build_optimizer(model, cfg.optimizer, device)
    losses, norms, grads = [], [], None
    for batch in batches:
        b = {k: v.to(device) for k, v in batch.items()}
        loss_sum = model(b["tokens"], positions=b["positions"], document_ids=b.get("document_ids"),
                         labels=b["labels"], loss_chunk_size=cfg.training.loss_chunk_size)
        n_tokens = b["labels"].numel()
        (loss_sum / n_tokens).backward()
        norms.append(float(clip_grad_norm_(model.parameters(), cfg.training.max_norm)))
        if grads is None:
            grads = flat_grads(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum.item() / n_tokens)
    return {"losses": losses, "grad_norms": norms, "grads": grads}


def check(smoke: bool, compile_on: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from runtime.train.config.loader import load_config

    device = torch.device("cpu") if smoke else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    shapes = (["--model.flavor=tiny", "--training.seq_len=32", "--training.local_batch_size=2"] if smoke
              else ["--training.seq_len=512", "--training.local_batch_size=4"])
    cfg = load_config(str(REPO / "configs" / "debugmodel.toml"),
                      shapes + [f"--compile.enable={str(compile_on).lower()}"])
    args = cfg.model_args()
    batches = [random_batch(args.vocab_size, cfg.training.local_batch_size, cfg.training.seq_len, s)
               for s in (1, 2)]

    torch.manual_seed(0)
    ref_model = build_model(args.replace(compute_dtype="float32"), cfg, torch.device("cpu"))
    state = {k: v.detach().clone() for k, v in ref_model.state_dict().items()}
    ref = run_steps(ref_model, cfg, batches, torch.device("cpu"))

    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
    model = build_model(args.replace(compute_dtype="bfloat16"), cfg, device, mesh)
    with torch.no_grad():  # the reference's weights into the (one-rank, so whole) shards
        for name, p in model.named_parameters():
            (p.to_local() if hasattr(p, "to_local") else p).copy_(state[name])
    got = run_steps(model, cfg, batches, device)

    errors, tols = step_errors(got, ref)
    worst = max(errors, key=lambda k: errors[k] / tols[k])
    fsdp = type(model.layers["0"]).__name__
    return {"passed": all(errors[k] <= tols[k] for k in errors) and fsdp.startswith("FSDP"),
            "max_error": errors[worst], "tolerance": tols[worst], "worst": worst, "errors": errors,
            "tolerances": tols, "cpu_fp32": ref, "got": got, "backend": dist.get_backend(),
            "world_size": dist.get_world_size(), "fsdp_block_class": fsdp,
            "activation_checkpoint": model.layers["0"].activation_checkpoint, "compile": compile_on,
            "mixed_precision": {"param": cfg.training.mixed_precision_param,
                                "reduce": cfg.training.mixed_precision_reduce}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="check_fsdp_step.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, metavar="FILE.jsonl")
    p.add_argument("--smoke", action="store_true", help="gloo on the CPU, tiny model")
    p.add_argument("--compile", action="store_true", help="also compile the blocks (regional, as under AC)")
    a = p.parse_args(argv)
    if "RANK" not in os.environ:
        print("check_fsdp_step.py: run me under torchrun --nproc-per-node 1", file=sys.stderr)
        return 2
    device = torch.device("cpu") if a.smoke else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    t0 = time.perf_counter()
    try:
        result = check(a.smoke, a.compile)
    except Exception as exc:  # noqa: BLE001 - recorded as a failed check
        traceback.print_exc()
        result = {"passed": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"}
    passed = result.pop("passed")
    if dist.get_rank() == 0:
        rec = check_record(PART, CHECK, passed, device, seconds=round(time.perf_counter() - t0, 3), **result)
        append_jsonl(a.out, rec)
        detail = f"max rel err {rec['max_error']:.3g} (tol {rec['tolerance']})" if "max_error" in rec else ""
        print(f"[correctness] {CHECK:42s} {'ok' if passed else 'FAILED':7s} {detail} {rec.get('error') or ''}"
              f" ({rec['seconds']:.1f} s)", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
