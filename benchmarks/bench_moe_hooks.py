"""The MoE's TP token flow and router replication (runtime/parallel/moe_parallel.py) against
torch's ParallelStyles (issue #24 item 8).

    python -m benchmarks.bench_moe_hooks [--steps 10] [--flavor tiny] [--seq-len 32]

Runs the parity harness (tests/helpers/parallel_harness.py: real trainer, gloo, 1 thread
per rank, fp32, aux loss on) once single-process and once per variant on TP=2 (MoE mode
"tp"), from one seed checkpoint, and prints per variant: the median train-step time (steps
2..N, rank 0) and its numerics against the single-process run (worst first-step gradient
error relative to the tensor's largest value, naming the tensor; losses; final parameters).

Variants (installed in each rank by a harness hook, before the trainer builds the model):
  ours          the code as it is.
  before        the hooks before issue #24 item 8 (every expert weight swapped for its local
                shard around each forward; our own output reduce-scatter hook).
  torch_styles  torchtitan's recipe with torch's parts: the MoE's token flow as
                `PrepareModuleInputOutput(Shard(1) -> Replicate, use_local_input=True;
                Partial -> Shard(1))` and the router as a "NoParallel" (torch has none; built
                from `PrepareModuleInputOutput`: Replicate DTensor in, local out) around its
                Replicate gate weights.
  torch_tokens  only the token flow of torch_styles (router as ours).
  torch_router  only the router of torch_styles (token flow as ours).
No timing is asserted anywhere; numbers go to docs/notes by hand.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))

from parallel_harness import (  # noqa: E402
    BASE,
    global_batch_overrides,
    max_param_diff,
    run_distributed,
    run_single,
    seeded,
)

_DUMP = "BENCH_MOE_HOOKS_DUMP"


# ---------------------------------------------------------------------------- in the ranks
def _record(rank: int):
    """Trainer callback: step times and, after the first backward, every full gradient."""
    out = Path(os.environ[_DUMP])

    def on_trainer(trainer):
        times, grads = [], {}
        step = trainer.train_step

        def timed_step(batch):
            start = time.perf_counter()
            result = step(batch)
            times.append(time.perf_counter() - start)
            if rank == 0:
                torch.save({"times": times, "grads": grads}, out)
            return result

        trainer.train_step = timed_step
        clip = trainer.clip_grad_norm_

        def clip_and_record():
            if not grads:
                for name, p in trainer.model.named_parameters():
                    g = p.grad
                    if g is not None and hasattr(g, "full_tensor"):
                        g = g.full_tensor()  # collective: every rank takes part
                    grads[name] = None if g is None else g.detach().double().clone()
            return clip()

        trainer.clip_grad_norm_ = clip_and_record

    return on_trainer


def ours(rank: int, world_size: int):
    return _record(rank)


def before(rank: int, world_size: int):
    """The hooks as they were before issue #24 item 8: every expert weight swapped for its
    local shard around each forward (GroupedExperts takes them itself), and the output
    reduce-scatter as our own hook instead of torch's PrepareModuleOutput."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    from runtime.parallel import moe_parallel
    from runtime.parallel.dtensor_utils import swap_parameters, to_local

    place = moe_parallel._place_experts

    def place_experts(experts, mesh, columns, mode):
        place(experts, mesh, columns, mode)
        if mode == "tp":
            names = [n for n in moe_parallel._EXPERT_SPLIT
                     if experts._parameters.get(n) is not None
                     and n not in moe_parallel._SUM_GRAD_OVER_TP and n != "mlp2_bias"]
            swap_parameters(experts, experts, {n: to_local for n in names})

    class Tokens(moe_parallel._GatheredTokens):
        def apply(self, moe):
            moe.register_forward_pre_hook(self._gather_input)
            moe.register_forward_hook(self._reduce_scatter_output)

        def _reduce_scatter_output(self, moe, args, out):
            moe_parallel._restore_aux_loss_scale(moe)
            partial = DTensor.from_local(out, self.mesh, [Partial()], run_check=False)
            return partial.redistribute(self.mesh, [Shard(1)]).to_local()

    moe_parallel._place_experts = place_experts
    moe_parallel._GatheredTokens = Tokens
    return _record(rank)


def torch_styles(rank: int, world_size: int, part: str = "both"):
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInputOutput, parallelize_module

    from runtime.parallel import moe_parallel
    from runtime.parallel.dtensor_utils import distributed_parameter

    class Tokens(moe_parallel._GatheredTokens):
        def apply(self, moe):
            parallelize_module(moe, self.mesh, PrepareModuleInputOutput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                use_local_input=True, output_layouts=(Partial(),),
                desired_output_layouts=(Shard(1),)))
            size = self.size
            moe.register_forward_pre_hook(lambda m, a: moe_parallel._divide_aux_loss_scale(m, size))
            moe.register_forward_hook(lambda m, a, out: moe_parallel._restore_aux_loss_scale(m))

    def replicate_router(router, tp_mesh):
        gate = router.gate
        for name in ("weight", "bias"):
            setattr(gate, name, distributed_parameter(getattr(gate, name), tp_mesh, [Replicate()]))
        # torchtitan's NoParallel, with torch's parts: inputs Replicate DTensors, outputs local
        # (Router.forward reads gate.weight itself, so the style wraps the router, not the gate).
        parallelize_module(router, tp_mesh, PrepareModuleInputOutput(
            input_layouts=(Replicate(), Replicate()), desired_input_layouts=(Replicate(), Replicate()),
            output_layouts=(Replicate(),) * 3, desired_output_layouts=(Replicate(),) * 3))

    if part in ("both", "tokens"):
        moe_parallel._GatheredTokens = Tokens
    if part in ("both", "router"):
        moe_parallel._replicate_router = replicate_router
    return _record(rank)


def torch_tokens(rank: int, world_size: int):
    return torch_styles(rank, world_size, part="tokens")


def torch_router(rank: int, world_size: int):
    return torch_styles(rank, world_size, part="router")


VARIANTS = {"ours": ours, "before": before, "torch_styles": torch_styles, "torch_tokens": torch_tokens,
            "torch_router": torch_router}


# ---------------------------------------------------------------------------- parent
def _grad_error(ref: dict, got: dict) -> tuple[str, float]:
    """(tensor, max |diff| / max |ref|) of the worst first-step gradient."""
    worst = ("", 0.0)
    for name, a in ref.items():
        b = got.get(name)
        if a is None or b is None:
            if (a is None) != (b is None):
                return (f"{name} (gradient on one side only)", float("inf"))
            continue
        err = (a - b).abs().max().item() / max(a.abs().max().item(), 1e-30)
        if err > worst[1]:
            worst = (name, err)
    return worst


def _run(world: int, overrides: list[str], steps: int, hook, dump: Path) -> tuple[dict, dict]:
    os.environ[_DUMP] = str(dump)
    run = run_single if world == 1 else (lambda *a, **k: run_distributed(world, *a, **k))
    result = run(overrides, steps, hook=hook, timeout=600)
    return result, torch.load(dump, weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--flavor", default="tiny")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = [o for o in BASE if not o.startswith(("--model.flavor", "--training.seq_len"))]
        model += [f"--model.flavor={opts.flavor}", f"--training.seq_len={opts.seq_len}",
                  "--model.aux_loss_coeff=0.01", "--training.loss_chunk_size=0"]
        common = seeded(model, tmp / "seed") + global_batch_overrides(4, 1)
        ref, ref_rec = _run(1, common, opts.steps, ours, tmp / "ref.pt")
        print(f"reference (1 process): median step {statistics.median(ref_rec['times'][1:]):.4f} s")
        tp2 = ["--parallelism.tensor_parallel_degree=2", "--parallelism.data_parallel_shard_degree=1"]
        for name in opts.variants.split(","):
            try:
                got, rec = _run(2, common + tp2, opts.steps, VARIANTS[name], tmp / f"{name}.pt")
            except Exception as err:  # a variant that cannot run is a result too
                print(f"{name:13s}: failed: {str(err).strip().splitlines()[-1][:200]}")
                continue
            step = statistics.median(rec["times"][1:])
            grad = _grad_error(ref_rec["grads"], rec["grads"])
            loss = max(abs(a - b) / abs(a) for a, b in zip(ref["losses"], got["losses"]))
            param = max_param_diff(ref, got)
            print(f"{name:13s}: median step {step:.4f} s (TP=2); first-step grads worst "
                  f"{grad[1]:.1e} of max ({grad[0]}); losses rel {loss:.1e}; params max |diff| "
                  f"{param[1]:.1e} ({param[0]})")


if __name__ == "__main__":
    main()
