"""One transformer block, forward + backward: median ms, TFLOP/s and % of the measured matmul
peak, for the sliding-window and the full-causal variant, plus per-piece timings (attention
core, grouped-GEMM experts, projections, whole MoE, whole attention module).

    python benchmarks/bench_block.py --measure-peak --out benchmarks/results/$(date +%F).jsonl
    python benchmarks/bench_block.py --compile --measure-peak --out ...
    # CPU smoke run (tiny shapes):
    python benchmarks/bench_block.py --flavor tiny --tokens 64 --iters 2 --warmup 1

Defaults: the 20b block (dim 2880, 64/8 heads x 64, 32 experts top-4, hidden 2880), 16384
tokens = batch 4 x seq 4096, compute dtype bf16 on CUDA (autocast, as the model runs), fp32
parameters (the trainer's master weights on one GPU; `--param-dtype bfloat16` is what FSDP's
mixed precision hands the block instead).

What is timed: `block(x, rope, masks)` forward and `out.backward(grad)` (a random, dense
gradient), parameter grads dropped between calls. The attention masks and RoPE tables are
built once, outside the timing (the model builds them once per forward for all layers).
CUDA timing: start/end events around each call, synchronize after each; median of --iters.

FLOPs, counted honestly: the per-layer terms of `training_flops_per_token`
(runtime/train/metrics.py) for the layer's kind, x tokens: 6 x active matmul parameters
(q/k/v/o, router, top_k experts) + 12 x heads x head_dim x mean attended keys, where the mean
counts the causal mask and the 128-key sliding window. Pieces use the same conventions
(fwd+bwd = 3 x fwd; roofline.py counts flex attention's backward as 2.5 x fwd instead, so its
attention TF/s read 3.5/3 higher for the same time).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    add_peak_args,
    append_jsonl,
    env_info,
    median,
    peak_memory,
    pick_device,
    resolve_dtype,
    resolve_peak,
    synchronize,
    time_ms,
)

VARIANTS = ("sliding", "full")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_block.py", allow_abbrev=False,
                                description="One transformer block fwd+bwd: ms, TF/s, % of peak.")
    p.add_argument("--flavor", default="20b", help="a key of runtime.model.args.FLAVORS (default 20b)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per call = batch x seq (default 16384)")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length (capped at --tokens)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 on CUDA, fp32 on CPU), "
                                                   "bfloat16, float16, float32")
    p.add_argument("--param-dtype", default="float32",
                   help="parameter dtype: float32 (master weights, one GPU) or bfloat16 (as under FSDP)")
    p.add_argument("--compile", action="store_true", help="torch.compile the block (and the pieces)")
    p.add_argument("--attn-backend", default="auto", choices=("auto", "flex", "math"),
                   help="auto: flex on CUDA, math on CPU")
    p.add_argument("--variants", default="sliding,full", help="comma list of sliding,full")
    p.add_argument("--pieces", default="all", choices=("all", "attention-core", "none"),
                   help="per-piece timings: all, only the attention core (sliding/full), or none")
    p.add_argument("--no-pieces", dest="pieces", action="store_const", const="none",
                   help="the same as --pieces none")
    p.add_argument("--iters", type=int, default=20, help="timed calls (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (after compile)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="append JSON lines here")
    p.add_argument("--label", default=None, help="variant name for the results table")
    add_peak_args(p)
    return p


# ----------------------------------------------------------------------------- FLOPs

def layer_flops_per_token(args, seq_len: int, sliding: bool) -> float:
    """One layer's training FLOPs per token, taken from runtime/train/metrics.py: the
    difference of `training_flops_per_token` between 2 and 1 layers of that kind (so the
    LM head and anything else outside the blocks cancels)."""
    from runtime.train.metrics import training_flops_per_token

    kind = "sliding_attention" if sliding else "full_attention"
    one = args.replace(n_layers=1, layer_types=(kind,))
    two = args.replace(n_layers=2, layer_types=(kind, kind))
    return training_flops_per_token(two, seq_len) - training_flops_per_token(one, seq_len)


def attention_core_flops(args, tokens: int, seq_len: int, sliding: bool) -> float:
    """QK^T and PV, fwd + bwd (3 x fwd), causal/window-aware."""
    from runtime.train.metrics import mean_attended_keys

    keys = mean_attended_keys(seq_len, args.sliding_window if sliding else None)
    return 3 * 4 * tokens * args.n_heads * args.head_dim * keys


def experts_flops(args, tokens: int) -> float:
    return 3 * 2 * tokens * args.top_k * 3 * args.dim * args.moe_inter_dim


def projection_flops(args, tokens: int) -> float:
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return 3 * 2 * tokens * args.dim * (2 * q + 2 * kv)


def router_flops(args, tokens: int) -> float:
    return 3 * 2 * tokens * args.dim * args.num_experts


# ----------------------------------------------------------------------------- helpers

class Ctx:
    """Everything a measurement needs: device, dtypes, peak, common record fields."""

    def __init__(self, a, device, dtype, param_dtype, backend, peak, base):
        self.a, self.device, self.dtype, self.param_dtype = a, device, dtype, param_dtype
        self.backend, self.peak, self.base = backend, peak, base

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def measure(self, fn) -> dict:
        """First call (compile) timed alone, then warmup + iters."""
        synchronize(self.device)
        t0 = time.perf_counter()
        fn()
        synchronize(self.device)
        first = time.perf_counter() - t0
        ms = time_ms(fn, self.device, iters=self.a.iters, warmup=self.a.warmup)
        return {"first_call_s": first, "ms": median(ms), "ms_samples": ms}

    def rates(self, ms: float, flops: float) -> dict:
        tflops = flops / (ms * 1e-3) / 1e12
        pk = self.peak["peak_tflops"]
        return {"flops": flops, "tflops": tflops, "pct_of_peak": 100 * tflops / pk if pk else None}


def _error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300]
    oom = "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError"
    traceback.print_exc()
    return f"{'OOM' if oom else type(exc).__name__}: {text}"


def _reset_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _maybe_compile(module, on: bool):
    if on:
        module.compile(fullgraph=False)  # in place, as runtime/parallel/compile.py does
    return module


def build_masks(backend: str, seq_len: int, window: int, device):
    """The model's per-forward masks for a plain causal sequence (no documents)."""
    from runtime.model import masks as M

    if hasattr(M, "MaskInputs"):  # the context-parallel-aware signature
        return M.build_attention_masks(backend, M.MaskInputs.full_sequence(seq_len, None, device), window)
    return M.build_attention_masks(backend, seq_len, window, None, device)


def _rope_and_masks(args, batch, seq_len, device, backend):
    from runtime.model.rope import RotaryEmbedding

    rope = RotaryEmbedding(args).to(device)
    rope.init_weights()
    positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
    with torch.no_grad():
        cos_sin = rope(positions)
    masks = build_masks(backend, seq_len, args.sliding_window, device)
    return cos_sin, masks


# ----------------------------------------------------------------------------- the block

def bench_block_variant(c: Ctx, args, batch, seq_len, sliding: bool, cos_sin, masks) -> dict:
    from runtime.model.model import TransformerBlock

    device = c.device
    _reset_memory(device)
    layer_id = 0 if sliding else 1  # even layers slide (ModelArgs.is_sliding)
    block = _maybe_compile(_init(TransformerBlock(layer_id, args.replace(layer_types=None)), c, args),
                           c.a.compile)
    assert block.sliding == sliding
    m = c.measure(_block_step(block, c, args, batch, seq_len, cos_sin, masks))
    flops = layer_flops_per_token(args, seq_len, sliding) * batch * seq_len
    return {**c.base, "kind": "block", "variant": "sliding" if sliding else "full",
            **m, **c.rates(m["ms"], flops), **peak_memory(device)}


def _block_step(block, c: Ctx, args, batch, seq_len, cos_sin, masks):
    x = torch.randn(batch, seq_len, args.dim, device=c.device, dtype=c.param_dtype, requires_grad=True)
    grad = None

    def step():
        nonlocal grad
        block.zero_grad(set_to_none=True)
        x.grad = None
        with c.autocast():
            out = block(x, cos_sin, masks, c.backend)
        if grad is None:  # a random dense output gradient, drawn once (first call: compile)
            grad = torch.randn_like(out)
        out.backward(grad)
    return step


# ----------------------------------------------------------------------------- the pieces

def bench_pieces(c: Ctx, args, batch, seq_len, variants, cos_sin, masks) -> list[dict]:
    """Each piece is a builder (allocates its inputs/weights, returns the timed closure) run
    inside `record`, so a piece that fails (OOM, compile) is recorded and the rest go on, and
    its memory is released when `record` returns."""
    from runtime.model.attention import Attention, flex_sink_attention, math_sink_attention
    from runtime.model.moe import GroupedExperts, MoE

    device, dt, tokens = c.device, c.dtype, batch * seq_len
    H, KV, D = args.n_heads, args.n_kv_heads, args.head_dim
    out = []

    def record(name, build, flops, **extra):
        _reset_memory(device)
        try:
            m = c.measure(build())
        except Exception as exc:  # noqa: BLE001 - one failing piece must not lose the others
            out.append({**c.base, "kind": "block_piece", "piece": name, "ms": None, "tflops": None,
                        "pct_of_peak": None, "error": _error(exc), **extra})
            print(f"  piece {name:38s} FAILED: {out[-1]['error']}", flush=True)
            return
        out.append({**c.base, "kind": "block_piece", "piece": name, **m,
                    **c.rates(m["ms"], flops), **peak_memory(device), **extra})
        print(f"  piece {name:38s} {m['ms']:9.3f} ms {out[-1]['tflops']:8.4g} TF/s", flush=True)

    def attention_core(mask):
        """QK^T, softmax with sinks, PV: the model's own backend function."""
        attend = flex_sink_attention if c.backend == "flex" else math_sink_attention
        q = torch.randn(batch, H, seq_len, D, device=device, dtype=dt, requires_grad=True)
        k = torch.randn(batch, KV, seq_len, D, device=device, dtype=dt, requires_grad=True)
        v = torch.randn(batch, KV, seq_len, D, device=device, dtype=dt, requires_grad=True)
        sinks = torch.randn(H, device=device, requires_grad=True)
        g = torch.randn(batch, H, seq_len, D, device=device, dtype=dt)

        def step():
            for t in (q, k, v, sinks):
                t.grad = None
            attend(q, k, v, sinks, mask, D ** -0.5).backward(g)
        return step

    def projections():
        """q/k/v/o linears of the Attention module under the compute autocast."""
        attn = Attention(args, sliding=False).to(device)
        attn.init_weights(args.init_std)
        attn.to(c.param_dtype)
        xa = torch.randn(tokens, args.dim, device=device, dtype=c.param_dtype, requires_grad=True)

        def project():
            with c.autocast():
                return attn.wo(attn.wq(xa)), attn.wk(xa), attn.wv(xa)  # wo eats a [T, H*D] input
        grads = [torch.randn_like(t) for t in project()]

        def step():
            attn.zero_grad(set_to_none=True)
            xa.grad = None
            torch.autograd.backward(list(project()), grads)
        return step

    def attention_module(sliding):
        """Projections + RoPE + core + sinks (Attention.forward)."""
        mod = _maybe_compile(_init(Attention(args, sliding=sliding), c, args), c.a.compile)
        mask = masks.for_layer(sliding)
        xb = torch.randn(batch, seq_len, args.dim, device=device, dtype=c.param_dtype, requires_grad=True)
        with c.autocast():
            gb = torch.randn_like(mod(xb, cos_sin, mask, c.backend))

        def step():
            mod.zero_grad(set_to_none=True)
            xb.grad = None
            with c.autocast():
                o = mod(xb, cos_sin, mask, c.backend)
            o.backward(gb)
        return step

    def experts():
        """Grouped GEMMs + clamped SwiGLU at perfectly balanced routing, rows in the compute dtype."""
        mod = _maybe_compile(_init(GroupedExperts(args), c, args), c.a.compile)
        rows = tokens * args.top_k
        counts = torch.full((args.num_experts,), rows // args.num_experts, device=device, dtype=torch.int64)
        counts[: rows % args.num_experts] += 1
        xe = torch.randn(rows, args.dim, device=device, dtype=dt, requires_grad=True)
        ge = torch.randn(rows, args.dim, device=device, dtype=dt)

        def step():
            mod.zero_grad(set_to_none=True)
            xe.grad = None
            mod(xe, counts).backward(ge)
        return step

    def moe():
        """Router (fp32) + permutation + experts + combine, real (random-init) routing, the
        model's own input dtype path."""
        mod = _maybe_compile(_init(MoE(args), c, args), c.a.compile)
        xm = torch.randn(batch, seq_len, args.dim, device=device, dtype=c.param_dtype, requires_grad=True)
        with c.autocast():
            gm = torch.randn_like(mod(xm))

        def step():
            mod.zero_grad(set_to_none=True)
            xm.grad = None
            with c.autocast():
                o = mod(xm)
            o.backward(gm)
        return step

    for variant in variants:
        mask = masks.for_layer(variant == "sliding")
        extra = {"variant": variant}
        if hasattr(mask, "sparsity"):
            extra["block_mask_sparsity_pct"] = float(mask.sparsity())
        record(f"attention core {variant} ({c.backend}, sinks)", lambda mask=mask: attention_core(mask),
               attention_core_flops(args, tokens, seq_len, variant == "sliding"), **extra)
    if c.a.pieces == "attention-core":
        return out
    record("q/k/v/o projections", projections, projection_flops(args, tokens))
    for variant in variants:
        sliding = variant == "sliding"
        record(f"attention module {variant}", lambda sliding=sliding: attention_module(sliding),
               projection_flops(args, tokens) + attention_core_flops(args, tokens, seq_len, sliding),
               variant=variant)
    impl = "grouped_mm" if args.moe_impl == "grouped" else "loop"
    record(f"experts {impl} (balanced)", experts, experts_flops(args, tokens))
    record("moe (router+permute+experts+combine)", moe,
           experts_flops(args, tokens) + router_flops(args, tokens))
    return out


def _init(module, c: Ctx, args):
    """On the device, initialised like the model (std, residual-output std), in param_dtype."""
    module = module.to(c.device)
    std = args.init_std
    from runtime.model.attention import Attention

    if isinstance(module, Attention):
        module.init_weights(std)
    else:
        module.init_weights(std, std / math.sqrt(2 * args.n_layers))
    return module.to(c.param_dtype)


# ----------------------------------------------------------------------------- main

def run(argv: list[str] | None = None) -> list[dict]:
    from runtime.model.args import FLAVORS
    from runtime.model.attention import resolve_attn_backend

    a = build_parser().parse_args(argv)
    if a.flavor not in FLAVORS:
        raise SystemExit(f"error: --flavor {a.flavor!r} is not one of {', '.join(FLAVORS)}")
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"error: --variants must be a comma list of {', '.join(VARIANTS)}")
    device = pick_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    param_dtype = resolve_dtype(a.param_dtype, device)
    seq_len = min(a.seq_len, a.tokens)
    if a.tokens % seq_len:
        raise SystemExit(f"error: --tokens {a.tokens} must be a multiple of the sequence length {seq_len}")
    batch = a.tokens // seq_len
    backend = resolve_attn_backend(a.attn_backend, device)
    if backend == "flex" and device.type != "cuda":
        raise SystemExit("error: flex attention backward runs on CUDA only; use --attn-backend math on CPU")
    args = FLAVORS[a.flavor].replace(attn_backend=backend, max_seq_len=max(seq_len, FLAVORS[a.flavor].max_seq_len))
    torch.manual_seed(a.seed)

    peak = resolve_peak(a, device, dtype)
    base = {"label": a.label, **env_info(device), "flavor": a.flavor, "dim": args.dim,
            "num_experts": args.num_experts, "top_k": args.top_k, "tokens": batch * seq_len,
            "batch": batch, "seq_len": seq_len, "sliding_window": args.sliding_window,
            "dtype": str(dtype).replace("torch.", ""), "param_dtype": str(param_dtype).replace("torch.", ""),
            "compile": a.compile, "attn_backend": backend, "moe_impl": args.moe_impl,
            "iters": a.iters, "warmup": a.warmup, **peak}
    c = Ctx(a, device, dtype, param_dtype, backend, peak, base)
    cos_sin, masks = _rope_and_masks(args, batch, seq_len, device, backend)

    records = []
    pk = f"{peak['peak_tflops']:.0f} TF/s ({peak['peak_source']})" if peak["peak_tflops"] else "none"
    print(f"bench_block {a.flavor} {batch}x{seq_len} tokens, {base['dtype']} compute, "
          f"{base['param_dtype']} params, {backend}, compile={a.compile} on "
          f"{base['gpu'] or device} | peak {pk}", flush=True)
    for variant in variants:
        try:
            r = bench_block_variant(c, args, batch, seq_len, variant == "sliding", cos_sin, masks)
        except Exception as exc:  # noqa: BLE001 - recorded (OOM, compile); the other variant runs
            r = {**base, "kind": "block", "variant": variant, "ms": None, "tflops": None,
                 "pct_of_peak": None, "error": _error(exc)}
            records.append(r)
            print(f"  block {variant:8s} FAILED: {r['error']}", flush=True)
            _reset_memory(device)
            continue
        records.append(r)
        pct = "n/a" if r["pct_of_peak"] is None else f"{r['pct_of_peak']:.1f}%"
        print(f"  block {variant:8s} fwd+bwd {r['ms']:9.3f} ms {r['tflops']:8.4g} TF/s "
              f"{pct} of peak | first call {r['first_call_s']:.1f} s | "
              f"peak mem {r['peak_memory_gib']:.2f} GiB", flush=True)
    if a.pieces != "none":
        records += bench_pieces(c, args, batch, seq_len, variants, cos_sin, masks)
    for r in records:
        append_jsonl(a.out, r)
    return records


def main(argv: list[str] | None = None) -> int:
    records = run(argv)
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
