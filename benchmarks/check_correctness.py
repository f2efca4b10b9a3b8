"""gpu_check part 1 (in-process checks): the CUDA paths against independent references, each
with its tolerance and the observed error, one JSON record per check.

    python benchmarks/check_correctness.py --out results.jsonl [--smoke] [--only flex,experts]

Checks (all on the model's own functions; references in float64 on the CPU):
  flex     compiled flex attention (the model's `flex_sink_attention`) vs the math backend,
           forward + backward incl. the sink gradient: bf16 and fp32 x sliding/full x
           with/without document ids. Error = ||got - ref|| / ||ref|| per tensor.
  experts  grouped-GEMM experts vs the per-expert loop, forward + backward, with an expert
           that receives zero rows (its weight gradients must be exactly zero).
  block    one compiled TransformerBlock forward+backward vs the same block eager: graph
           breaks and recompiles counted (expected: 0 and 0).
  train    one eager and one compiled training step (Trainer.optimizer_step, 2 steps) of the
           debug model vs the CPU fp32 step from the same weights and batches: loss, grad norm
           and the second step's loss (which sees the fused AdamW update).
  float8   float8 training steps vs bf16 (only when torchao imports and the GPU is SM89+).
--smoke: tiny shapes on the CPU (eager flex with torch's CPU backward check lifted, the
aot_eager compile backend for the block and the compiled training step): the same code,
minutes -> seconds.
Exit 0 if every check passed (or was skipped with a reason), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import REPO, append_jsonl, check_record, max_abs_error, rel_error
from benchmarks.step_compare import flat_grads, step_errors

PART = "correctness"
CHECKS = ("flex", "experts", "block", "train", "float8")

# Relative-norm tolerances (METHOD: fp32 far under 1e-3, tf32 ~3e-4, bf16 operands 1e-3..1e-2).
# A wrong mask, a lost sink gradient or a mis-routed expert gives errors of order 1.
TOL = {
    torch.float32: {"out": 2e-3, "grad": 2e-3, "sinks": 2e-3},
    torch.bfloat16: {"out": 2e-2, "grad": 3e-2, "sinks": 5e-2},
}


class Runner:
    """Runs named checks; each writes its record at once, so a timeout loses only the rest."""

    def __init__(self, out: str | None, device: torch.device):
        self.out, self.device, self.failed = out, device, []

    def run(self, check: str, fn, *args, **kwargs) -> None:
        from torch._dynamo.utils import counters

        # Each check compiles afresh: the checks' many mask/dtype variants of the one compiled
        # flex function would otherwise exhaust dynamo's recompile limit and fall back to eager.
        torch._dynamo.reset()
        counters.clear()
        t0 = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a crash is a failed check with its message
            traceback.print_exc()
            result = {"passed": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"}
        passed = result.pop("passed")
        rec = check_record(PART, check, passed, self.device, seconds=round(time.perf_counter() - t0, 3),
                           **result)
        append_jsonl(self.out, rec)
        status = "skipped" if rec.get("skipped") else ("ok" if passed else "FAILED")
        detail = f"max rel err {rec['max_error']:.3g} (tol {rec['tolerance']})" if "max_error" in rec else ""
        print(f"[correctness] {check:42s} {status:7s} {detail} {rec.get('error') or rec.get('skipped') or ''}"
              f" ({rec['seconds']:.1f} s)", flush=True)
        if not passed:
            self.failed.append(check)


def _verdict(errors: dict[str, float], tols: dict[str, float]) -> dict:
    worst = max(errors, key=lambda k: errors[k] / tols[k])
    return {"passed": all(errors[k] <= tols[k] for k in errors), "max_error": errors[worst],
            "tolerance": tols[worst], "worst": worst, "errors": errors, "tolerances": tols}


@contextlib.contextmanager
def cpu_flex_backward(device: torch.device):
    """torch refuses flex attention's backward on the CPU; its eager path is differentiable, so
    the CPU smoke run (and tests/model/test_model_units.py) lift that one device check."""
    if device.type == "cuda":
        yield
        return
    import torch.nn.attention.flex_attention as flex_module

    saved = flex_module._validate_device
    flex_module._validate_device = lambda *a, **k: None
    try:
        yield
    finally:
        flex_module._validate_device = saved


@contextlib.contextmanager
def default_compile_backend(backend: str | None):
    """Every torch.compile call made inside (the trainer's blocks, the fused loss) defaults to
    `backend`: the CPU smoke run compiles the same regions with aot_eager in seconds, where
    inductor's C++ compile would take minutes. None: unchanged."""
    if backend is None:
        yield
        return
    original = torch.compile

    def compile_with(*args, **kwargs):
        kwargs.setdefault("backend", backend)
        return original(*args, **kwargs)

    torch.compile = compile_with
    try:
        yield
    finally:
        torch.compile = original


# ----------------------------------------------------------------------------- flex vs math

def _doc_ids(batch: int, seq: int) -> torch.Tensor:
    """Documents of uneven lengths, different per row: [B, S]."""
    ids = torch.zeros(batch, seq, dtype=torch.long)
    ids[0, seq // 5:] = 1
    ids[0, (2 * seq) // 3:] = 2
    ids[-1, seq // 3 + 1:] = 1
    return ids


def _attention_with_grads(attend, mask, q, k, v, sinks, probe, scale):
    leaves = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
    out = attend(*leaves, mask, scale)
    out.backward(probe.to(out.dtype))
    return [out] + [t.grad for t in leaves]


def flex_vs_math(device, dtype, window, docs, shape, seed=0) -> dict:
    from runtime.model.attention import flex_sink_attention, math_sink_attention
    from runtime.model.masks import MaskInputs, dense_mask, flex_block_mask

    B, H, KV, S, D = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, S, D, generator=g).to(dtype) for n in (H, KV, KV))
    sinks = torch.randn(H, generator=g)  # fp32 master parameter, as in the model
    probe = torch.randn(B, H, S, D, generator=g).to(dtype)
    doc_ids = _doc_ids(B, S) if docs else None
    scale = D ** -0.5
    cpu = torch.device("cpu")
    ref = _attention_with_grads(
        math_sink_attention, dense_mask(MaskInputs.full_sequence(S, doc_ids, cpu), window),
        q.double(), k.double(), v.double(), sinks.double(), probe.double(), scale)
    mask = flex_block_mask(MaskInputs.full_sequence(S, doc_ids.to(device) if docs else None, device), window)
    with cpu_flex_backward(device):
        got = _attention_with_grads(flex_sink_attention, mask, *(t.to(device) for t in (q, k, v, sinks, probe)),
                                    scale)
    tol = TOL[dtype]
    names = ("out", "dq", "dk", "dv", "dsinks")
    errors = {n: rel_error(a, b) for n, a, b in zip(names, got, ref)}
    tols = {n: tol["out"] if n == "out" else tol["sinks"] if n == "dsinks" else tol["grad"] for n in names}
    result = _verdict(errors, tols)
    result["max_abs_error"] = {n: max_abs_error(a, b) for n, a, b in zip(names, got, ref)}
    result["shape"] = {"batch": B, "heads": H, "kv_heads": KV, "seq": S, "head_dim": D}
    result["sink_grad_norm"] = float(got[4].double().norm())
    from torch._dynamo.utils import counters

    result["dynamo_graphs"] = int(counters["stats"]["unique_graphs"])  # > 0: flex ran compiled
    if not result["sink_grad_norm"] > 0:  # the sink must be trained through the log-sum-exp
        result.update(passed=False, error="the sink gradient is zero")
    return result


# ----------------------------------------------------------------------------- experts

def grouped_vs_loop(device, dtype, dims, counts, seed=0) -> dict:
    from runtime.model import ModelArgs
    from runtime.model.moe import GroupedExperts, _grouped_mm_aligned

    E, D, F = dims
    args = ModelArgs(dim=D, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, vocab_size=8,
                     moe_inter_dim=F, num_experts=E, top_k=1)
    torch.manual_seed(seed)
    ref_mod = GroupedExperts(args.replace(moe_impl="loop"))
    ref_mod.init_weights(0.05, 0.05)
    with torch.no_grad():
        ref_mod.mlp1_bias.normal_(std=0.1)
        ref_mod.mlp2_bias.normal_(std=0.1)
    mod = copy.deepcopy(ref_mod).to(device)
    mod.impl = "grouped"
    ref_mod.double()
    n = sum(counts)
    x = torch.randn(n, D).to(dtype)
    probe = torch.randn(n, D).to(dtype)
    counts_t = torch.tensor(counts)
    assert _grouped_mm_aligned(x, mod.mlp1_weight, mod.mlp2_weight), "test shapes must take the grouped path"

    def fwd_bwd(m, x, c, p):
        x = x.detach().requires_grad_()
        out = m(x, c)
        out.backward(p.to(out.dtype))
        return [out, x.grad] + [getattr(m, w).grad for w in ("mlp1_weight", "mlp1_bias", "mlp2_weight", "mlp2_bias")]

    ref = fwd_bwd(ref_mod, x.double(), counts_t, probe.double())
    got = fwd_bwd(mod, x.to(device), counts_t.to(device), probe.to(device))
    loop = copy.deepcopy(mod)  # the loop in the same dtype on the device: the error to expect
    loop.impl = "loop"
    loop.zero_grad(set_to_none=True)
    loop_got = fwd_bwd(loop, x.to(device), counts_t.to(device), probe.to(device))
    names = ("out", "dx", "dw1", "db1", "dw2", "db2")
    tol = TOL[dtype]
    errors = {nm: rel_error(a, b) for nm, a, b in zip(names, got, ref)}
    result = _verdict(errors, {nm: tol["out"] if nm == "out" else tol["grad"] for nm in names})
    result["loop_same_dtype_errors"] = {nm: rel_error(a, b) for nm, a, b in zip(names, loop_got, ref)}
    idle = [e for e, c in enumerate(counts) if c == 0]
    idle_grad = max(float(t[idle].abs().max()) for t in got[2:]) if idle else 0.0
    result.update(counts=list(counts), idle_experts=idle, idle_expert_max_grad=idle_grad,
                  dims={"experts": E, "dim": D, "hidden": F}, dtype=str(dtype).replace("torch.", ""))
    if idle_grad != 0.0:
        result.update(passed=False, error=f"experts {idle} got no rows but a gradient of {idle_grad:g}")
    return result


# ----------------------------------------------------------------------------- compiled block

def compiled_block(device, flavor, batch, seq, backend_name, seed=0) -> dict:
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from runtime.model.args import FLAVORS
    from runtime.model.attention import resolve_attn_backend
    from runtime.model.masks import MaskInputs, build_attention_masks
    from runtime.model.model import TransformerBlock
    from runtime.model.rope import RotaryEmbedding

    attn = resolve_attn_backend("auto", device)
    args = FLAVORS[flavor].replace(attn_backend=attn)
    torch.manual_seed(seed)
    eager = TransformerBlock(0, args).to(device)  # layer 0: sliding window
    eager.init_weights(args.init_std, args.init_std / 2)
    block = copy.deepcopy(eager)
    rope = RotaryEmbedding(args).to(device)
    rope.init_weights()
    positions = torch.arange(seq, device=device).expand(batch, seq)
    with torch.no_grad():
        cos_sin = rope(positions)
    doc_ids = _doc_ids(batch, seq).to(device)
    masks = build_attention_masks(attn, MaskInputs.full_sequence(seq, doc_ids, device), args.sliding_window)

    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend(backend_name)
    block.compile(backend=counter, fullgraph=False)  # in place, as runtime/parallel/compile.py

    def fwd_bwd(m, x, g):
        x = x.detach().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = m(x, cos_sin, masks, attn)
        out.backward(g)
        return [out, x.grad, m.attention.wq.weight.grad, m.moe.experts.mlp1_weight.grad]

    errors: dict[str, float] = {}
    frames = []
    for call in range(2):  # the second call, same shapes, must not recompile
        x = torch.randn(batch, seq, args.dim, device=device)
        g = torch.randn(batch, seq, args.dim, device=device, dtype=torch.bfloat16)
        got = fwd_bwd(block, x, g)
        frames.append(counter.frame_count)
        ref = fwd_bwd(eager, x, g)
        for name, a, b in zip(("out", "dx", "dwq", "dw_experts"), got, ref):
            errors[name] = max(errors.get(name, 0.0), rel_error(a, b))
        block.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
    breaks = {str(k): v for k, v in counters["graph_break"].items()}
    n_breaks = sum(breaks.values())
    recompiles = frames[1] - frames[0]
    # compiled vs eager, both bf16: only fusion / reduction order differs
    result = _verdict(errors, {k: TOL[torch.bfloat16]["out"] for k in errors})
    result.update(graph_breaks=n_breaks, graph_break_reasons=breaks, graphs_compiled=frames[0],
                  recompiles=recompiles, expected_graph_breaks=0, expected_recompiles=0,
                  compile_backend=backend_name, flavor=flavor, batch=batch, seq=seq, attn_backend=attn)
    if n_breaks or recompiles:
        result.update(passed=False, error=f"{n_breaks} graph breaks, {recompiles} recompiles (expected 0, 0)")
    return result


# ----------------------------------------------------------------------------- training steps

def _trainer(overrides: list[str], dump: str):
    from runtime.train.config.loader import load_config
    from runtime.train.trainer import Trainer

    base = [f"--job.dump_folder={dump}", "--checkpoint.enable=false", "--metrics.enable_jsonl=false",
            "--metrics.enable_tensorboard=false", "--training.steps=2"]
    return Trainer(load_config(str(REPO / "configs" / "debugmodel.toml"), base + overrides))


def _steps(trainer, batches) -> dict:
    """Trainer.optimizer_step per batch; the first step's clipped gradients are taken on their
    way into the optimizer."""

    losses, norms, grads = [], [], []
    step = trainer.optimizer.step  # (the lr scheduler's wrapper, if any: keep it in the chain)

    def capture(*args, **kwargs):
        if not grads:
            grads.append(flat_grads(trainer.model))
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    for batch in batches:
        trainer.step += 1
        loss, norm, _ = trainer.optimizer_step(batch)
        losses.append(loss)
        norms.append(norm)
    trainer.optimizer.step = step
    return {"losses": losses, "grad_norms": norms, "grads": grads[0] if grads else None}


def cpu_reference(shape_overrides: list[str], dump: str) -> tuple[dict, list, dict]:
    """The fp32 CPU run: its initial weights, its two batches and its numbers."""
    ref = _trainer(shape_overrides + ["--training.device=cpu", "--model.compute_dtype=float32"], dump)
    state = {k: v.detach().clone() for k, v in ref.model.state_dict().items()}
    data = iter(ref.dataloader)
    batches = [next(data) for _ in range(2)]
    return state, batches, _steps(ref, batches)


def train_step_vs_cpu(device, reference, shape_overrides, compile_on, dump, backend=None) -> dict:

    state, batches, ref = reference
    extra = ["--compile.enable=true"] if compile_on else ["--compile.enable=false"]
    with default_compile_backend(backend):
        trainer = _trainer(shape_overrides + [f"--training.device={device.type}"] + extra, dump)
        trainer.model.load_state_dict(state)
        got = _steps(trainer, batches)
    result = _verdict(*step_errors(got, dict(ref)))
    result.update(cpu_fp32={k: v for k, v in ref.items() if k != "grads"}, got=got, compile=compile_on,
                  compile_backend=(backend or "inductor") if compile_on else None,
                  compute_dtype=str(trainer.model.args.compute_dtype),
                  optimizer_fused=bool(trainer.optimizer.defaults.get("fused")))
    return result


def float8_step(device, shape_overrides, dump) -> dict:
    if importlib.util.find_spec("torchao") is None:
        return {"passed": True, "skipped": "torchao is not importable (carry it as a wheel for this check)"}
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return {"passed": True, "skipped": "float8 grouped experts need a CUDA GPU of SM90+"}
    runs = {}
    for name, extra in (("bf16", []), ("float8", ["--quantize.mode=float8"])):
        trainer = _trainer(shape_overrides + ["--training.device=cuda", "--training.steps=3"] + extra, dump)
        data = iter(trainer.dataloader)
        runs[name] = _steps(trainer, [next(data) for _ in range(3)])
    errors = {f"loss_step{i + 1}": abs(a - b) / abs(b)
              for i, (a, b) in enumerate(zip(runs["float8"]["losses"], runs["bf16"]["losses"]))}
    result = _verdict(errors, dict.fromkeys(errors, 5e-2))
    result.update(losses={k: v["losses"] for k, v in runs.items()})
    return result


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="check_correctness.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, metavar="FILE.jsonl")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma list of {', '.join(CHECKS)}")
    a = p.parse_args(argv)
    only = {c.strip() for c in a.only.split(",") if c.strip()}
    if not only <= set(CHECKS):
        p.error(f"--only takes {', '.join(CHECKS)}")
    device = torch.device("cpu") if a.smoke else torch.device("cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("check_correctness.py: no CUDA device (use --smoke on a CPU)", file=sys.stderr)
        return 2
    runner = Runner(a.out, device)
    if a.smoke:
        flex_shape, exp_dims, counts = (2, 4, 2, 64, 16), (4, 32, 16), [5, 0, 9, 3]
        block_shape, backend, flavor = (2, 32), "aot_eager", "tiny"
        shapes = ["--model.flavor=tiny", "--training.seq_len=32", "--training.local_batch_size=2"]
    else:
        # flex shape = tests/model/test_model_units.py's GPU test: `pytest -m gpu` then reuses these kernels
        flex_shape, exp_dims, counts = (2, 4, 2, 256, 64), (8, 512, 256), [300, 0, 129, 57, 512, 1, 64, 200]
        block_shape, backend, flavor = (2, 512), "inductor", "debugmodel"
        shapes = ["--training.seq_len=512", "--training.local_batch_size=4"]
    # Most important first: a step that runs out of time loses only the checks after it.
    flex_variants = [(dtype, window, docs) for dtype in (torch.bfloat16, torch.float32)
                     for window in (8 if a.smoke else 128, None) for docs in (False, True)]

    def flex_checks(dtype):
        for dt, window, docs in flex_variants:
            if dt == dtype:
                name = f"flex vs math {str(dt)[6:]} {'sliding' if window else 'full'}{' +docs' if docs else ''}"
                runner.run(name, flex_vs_math, device, dt, window, docs, flex_shape)

    if "flex" in only:
        flex_checks(torch.bfloat16)
    dtype = torch.float32 if a.smoke else torch.bfloat16
    if "experts" in only:
        runner.run(f"grouped experts vs loop {str(dtype)[6:]}", grouped_vs_loop, device, dtype, exp_dims, counts)
    if "block" in only:
        runner.run(f"compiled block ({backend})", compiled_block, device, flavor, *block_shape, backend)
    with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as dump:
        if "train" in only:
            reference = cpu_reference(shapes, dump)
            runner.run("train step eager vs cpu fp32", train_step_vs_cpu, device, reference, shapes, False, dump)
            runner.run(f"train step compiled ({backend}) vs cpu fp32", train_step_vs_cpu, device, reference,
                       shapes, True, dump, backend if a.smoke else None)
        if "flex" in only:
            flex_checks(torch.float32)
        if "float8" in only:
            runner.run("float8 step vs bf16", float8_step, device, shapes, dump)
    if runner.failed:
        print(f"[correctness] FAILED: {', '.join(runner.failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
