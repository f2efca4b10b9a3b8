"""Project GPT-OSS 120b training throughput on 8/64/128 H100s from MEASURED per-layer times
(bench_block.py) and a stated communication model. A projection, not a measurement: every
input that is an assumption is a flag, printed with the result.

    python benchmarks/project_120b.py --results benchmarks/results/2026-11-24.jsonl
    python benchmarks/project_120b.py --assume-layer-ms 30      # show the arithmetic now

Model (per GPU, per optimizer step; every rank processes --tokens-per-gpu tokens):
  layout     world = pp x dp_shard (no TP/CP); EP groups are the `ep` innermost dp_shard ranks
             (one node when ep = 8), as configs/gptoss_120b.toml; experts FSDP-sharded over
             the dp_shard / ep ranks that hold the same experts (one per node).
  compute    sum over the stage's layers of layer_ms(kind) x tokens_per_gpu / layer_tokens
             (linear in tokens; the 120b block = the 20b block in FLOPs per token: same dims,
             top-4 of 128 instead of 32; each GPU runs E/ep local experts on the same number
             of routed rows), x 4/3 with full activation checkpointing (forward recomputed),
             + the LM head + loss: 6 x dim x vocab FLOPs per token at the blocks' measured
             TFLOP/s unless --head-ms, x the 1F1B bubble (m + pp - 1) / m with pp > 1.
  optimizer  memory-bound AdamW over this GPU's shard: params/GPU x --optimizer-bytes-per-param
             (32: fp32 param r/w, grad r, m r/w, v r/w, + the bf16 copy; NOTES.md: ~90 GB for
             2.8B params) / --hbm-tbps.
  FSDP       per stage: all-gather of bf16 params for forward and again for backward (once
             with pp > 1: no reshard), reduce-scatter of fp32 grads; a ring moves
             (f - 1) / f x the full size through each GPU; dense params over f = dp_shard,
             expert params (1/ep of the stage's experts) over f = dp_shard / ep. A group that
             stays in one node runs at --nvlink-gbps, else at --ib-gbps (the ring's
             inter-node hop, one NIC per GPU).
  EP         all-to-all per layer forward: tokens x top_k x dim x 2 bytes x 2 (dispatch +
             combine) x (1 - 1/ep); backward the same again. ep <= GPUs per node: NVLink;
             wider: the off-node share over IB, the on-node share over NVLink, in parallel.
  PP         activations (tokens x dim x 2 bytes) forward and their gradients backward per
             stage boundary, over IB when stages sit on different nodes.
  step time  "serial": compute + optimizer + FSDP + EP + PP, nothing overlapped;
             "overlap": FSDP hidden behind compute (prefetch), EP/PP exposed:
             max(compute + EP + PP, FSDP) + optimizer. The truth lies between.
  memory     fp32 param + grad + Adam m + v = 16 bytes/param over the world; activations are
             not modelled (reported: states only).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.model.args import FLAVORS, ModelArgs

GB = 1e9
GIB = 2 ** 30


# ----------------------------------------------------------------------------- parameters

def param_counts(args: ModelArgs) -> dict:
    """Exact parameter counts of GptOssModel(args), split into dense and expert parts."""
    D, H, KV, hd, E, F, V = (args.dim, args.n_heads, args.n_kv_heads, args.head_dim,
                             args.num_experts, args.moe_inter_dim, args.vocab_size)
    attention = (D * H * hd + H * hd) + 2 * (D * KV * hd + KV * hd) + (H * hd * D + D) + H  # + sinks
    norms = 2 * D
    router = D * E + E
    experts = E * (2 * F * D + 2 * F + D * F + D)
    dense_layer = attention + norms + router
    outside = 2 * V * D + D  # embedding, output head, final norm
    dense = args.n_layers * dense_layer + outside
    expert = args.n_layers * experts
    return {"dense": dense, "expert": expert, "total": dense + expert,
            "dense_per_layer": dense_layer, "expert_per_layer": experts, "outside_layers": outside}


# ----------------------------------------------------------------------------- inputs

@dataclass
class Assumptions:
    sliding_ms: float              # one sliding layer fwd+bwd at layer_tokens (measured or assumed)
    full_ms: float                 # one full-causal layer fwd+bwd at layer_tokens
    layer_tokens: int = 16384      # tokens per call of those measurements
    layer_source: str = "assumed"
    tokens_per_gpu: int = 8192     # per optimizer step (configs/gptoss_120b.toml: 2 x 4096)
    seq_len: int = 4096
    ep: int = 8
    pp: int = 1
    microbatches: int = 8          # pp > 1 only
    activation_checkpoint: str = "full"  # full | none
    head_ms: float | None = None   # LM head + loss per step; None: FLOPs at the blocks' rate
    optimizer_bytes_per_param: float = 32.0
    hbm_tbps: float = 3.0          # effective HBM bandwidth for the optimizer (H100 SXM: 3.35 spec)
    gpus_per_node: int = 8
    nvlink_gbps: float = 450.0     # GB/s per direction per GPU, effective (H100 SXM NVLink 4)
    ib_gbps: float = 50.0          # GB/s per GPU = 400 Gb/s NDR, one NIC per GPU
    param_gather_bytes: int = 2    # bf16 all-gather
    grad_reduce_bytes: int = 4     # fp32 reduce-scatter (mixed_precision_reduce = float32)
    memory_gib: float = 80.0
    peak_tflops: float | None = None  # for MFU; from the results' measured peak when present


def _link_time_s(nbytes: float, intra_node: bool, a: Assumptions) -> float:
    return nbytes / ((a.nvlink_gbps if intra_node else a.ib_gbps) * GB)


def project(gpus: int, a: Assumptions, args: ModelArgs | None = None) -> dict:
    """One projection row; raises ValueError for a layout that cannot exist."""
    from runtime.train.metrics import training_flops_per_token

    args = args or FLAVORS["120b"]
    if gpus % a.pp:
        raise ValueError(f"{gpus} GPUs not divisible by pp={a.pp}")
    dp_shard = gpus // a.pp
    if dp_shard % a.ep or args.num_experts % a.ep:
        raise ValueError(f"ep={a.ep} must divide dp_shard={dp_shard} and {args.num_experts} experts")
    if args.n_layers % a.pp:
        raise ValueError(f"pp={a.pp} must divide {args.n_layers} layers")
    counts = param_counts(args)
    layers = args.n_layers // a.pp
    n_sliding = sum(args.is_sliding(i) for i in range(args.n_layers)) / a.pp
    n_full = layers - n_sliding
    tokens = a.tokens_per_gpu
    scale = tokens / a.layer_tokens

    # --- compute
    ac = 4 / 3 if a.activation_checkpoint == "full" else 1.0
    layers_ms = (n_sliding * a.sliding_ms + n_full * a.full_ms) * scale * ac
    from benchmarks.bench_block import layer_flops_per_token  # the honest per-layer count

    # The measured layers' achieved rate (one sliding + one full: their FLOPs / their time).
    rate_tflops = ((layer_flops_per_token(args, a.seq_len, True)
                    + layer_flops_per_token(args, a.seq_len, False)) * a.layer_tokens
                   / ((a.sliding_ms + a.full_ms) * 1e-3) / 1e12)
    head_flops = 6 * args.dim * args.vocab_size * tokens
    head_ms = a.head_ms if a.head_ms is not None else head_flops / (rate_tflops * 1e12) * 1e3
    bubble = (a.microbatches + a.pp - 1) / a.microbatches if a.pp > 1 else 1.0
    compute_ms = (layers_ms + head_ms) * bubble

    # --- optimizer (memory-bound) and memory
    params_per_gpu = counts["total"] / gpus
    optimizer_ms = params_per_gpu * a.optimizer_bytes_per_param / (a.hbm_tbps * 1e12) * 1e3
    state_gib = 16 * params_per_gpu / GIB

    # --- FSDP
    gathers = 2 if a.pp == 1 else 1
    per_param = gathers * a.param_gather_bytes + a.grad_reduce_bytes
    dense_stage = counts["dense"] / a.pp
    expert_stage = counts["expert"] / a.pp
    f_dense, f_expert = dp_shard, dp_shard // a.ep
    dense_bytes = per_param * dense_stage * (f_dense - 1) / f_dense
    expert_bytes = per_param * expert_stage / a.ep * (f_expert - 1) / f_expert if f_expert > 1 else 0.0
    dense_intra = f_dense <= a.gpus_per_node
    expert_intra = dp_shard <= a.gpus_per_node  # the group strides over ep-sized blocks
    fsdp_ms = (_link_time_s(dense_bytes, dense_intra, a) + _link_time_s(expert_bytes, expert_intra, a)) * 1e3

    # --- EP all-to-all
    ep_fwd_bytes = tokens * args.top_k * args.dim * 2 * 2 * (1 - 1 / a.ep)
    ep_bytes = 2 * ep_fwd_bytes * layers  # forward + backward, every layer of the stage
    if a.ep <= a.gpus_per_node:
        ep_ms = _link_time_s(ep_bytes, True, a) * 1e3
    else:
        on_node = (a.gpus_per_node - 1) / (a.ep - 1)
        ep_ms = max(_link_time_s(ep_bytes * on_node, True, a),
                    _link_time_s(ep_bytes * (1 - on_node), False, a)) * 1e3
    if a.activation_checkpoint == "full":
        ep_ms *= 1.5  # the recomputed forward repeats dispatch + combine: 3 passes instead of 2

    # --- PP point-to-point
    pp_bytes = 2 * tokens * args.dim * 2 if a.pp > 1 else 0.0
    pp_ms = _link_time_s(pp_bytes, dp_shard < a.gpus_per_node, a) * 1e3

    serial_ms = compute_ms + optimizer_ms + fsdp_ms + ep_ms + pp_ms
    overlap_ms = max(compute_ms + ep_ms + pp_ms, fsdp_ms) + optimizer_ms
    flops_per_token = training_flops_per_token(args, a.seq_len)
    row = {
        "gpus": gpus, "nodes": -(-gpus // a.gpus_per_node), "pp": a.pp, "dp_shard": dp_shard,
        "ep": a.ep, "params_total": counts["total"], "params_per_gpu": params_per_gpu,
        "state_gib_per_gpu": state_gib, "states_fit": state_gib < a.memory_gib,
        "tokens_per_gpu": tokens, "layers_per_stage": layers,
        "layers_ms": layers_ms, "head_ms": head_ms, "bubble_factor": bubble,
        "compute_ms": compute_ms, "optimizer_ms": optimizer_ms,
        "fsdp_bytes_per_gpu": dense_bytes + expert_bytes, "fsdp_ms": fsdp_ms,
        "fsdp_dense_link": "nvlink" if dense_intra else "ib",
        "fsdp_expert_link": "nvlink" if expert_intra else "ib",
        "ep_bytes_per_gpu": ep_bytes, "ep_ms": ep_ms, "pp_ms": pp_ms,
        "step_ms_serial": serial_ms, "step_ms_overlap": overlap_ms,
        "tokens_per_s_per_gpu_serial": tokens / (serial_ms * 1e-3),
        "tokens_per_s_per_gpu_overlap": tokens / (overlap_ms * 1e-3),
        "flops_per_token": flops_per_token, "layer_rate_tflops": rate_tflops,
    }
    row["tokens_per_s_serial"] = row["tokens_per_s_per_gpu_serial"] * gpus
    row["tokens_per_s_overlap"] = row["tokens_per_s_per_gpu_overlap"] * gpus
    if a.peak_tflops:
        for k in ("serial", "overlap"):
            row[f"mfu_{k}"] = row[f"tokens_per_s_per_gpu_{k}"] * flops_per_token / (a.peak_tflops * 1e12)
    return row


# ----------------------------------------------------------------------------- results

def layer_ms_from_results(path: str, label: str | None = None) -> dict:
    """The fastest measured block per variant (optionally of one --label), 20b/120b dims."""
    from benchmarks.common import read_jsonl

    best: dict[str, dict] = {}
    peak = None
    for r in read_jsonl(path):
        if r.get("kind") == "peak" and r.get("peak_tflops"):
            peak = r["peak_tflops"]
        if r.get("kind") != "block" or r.get("flavor") not in ("20b", "120b"):
            continue
        if label is not None and r.get("label") != label:
            continue
        if r.get("peak_tflops") and peak is None:
            peak = r["peak_tflops"]
        v = r["variant"]
        if v not in best or r["ms"] / r["tokens"] < best[v]["ms"] / best[v]["tokens"]:
            best[v] = r
    if set(best) != {"sliding", "full"}:
        raise SystemExit(f"error: {path} has no 20b block records for both variants "
                         f"(found: {sorted(best) or 'none'}); run bench_block.py first")
    if best["sliding"]["tokens"] != best["full"]["tokens"]:
        raise SystemExit("error: sliding and full block records were measured at different --tokens")
    s, f = best["sliding"], best["full"]
    return {"sliding_ms": s["ms"], "full_ms": f["ms"], "layer_tokens": s["tokens"], "peak": peak,
            "source": f"measured: {path} ({s.get('label') or 'block'}, {s.get('gpu')}, {s.get('date', '')[:10]}, "
                      f"compile={s.get('compile')})"}


def format_table(rows: list[dict], a: Assumptions) -> str:
    head = ("| GPUs | nodes | layout | params/GPU | states GiB/GPU | compute ms | optimizer ms | "
            "FSDP ms (links) | EP a2a ms | PP ms | step ms serial / overlap | "
            "tokens/s/GPU serial / overlap | global tokens/s (overlap) | MFU overlap |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        mfu = f"{100 * r['mfu_overlap']:.1f}%" if "mfu_overlap" in r else "-"
        fit = "" if r["states_fit"] else f" (> {a.memory_gib:.0f}: does not fit)"
        lines.append(
            f"| {r['gpus']} | {r['nodes']} | pp{r['pp']} x fsdp{r['dp_shard']}, ep{r['ep']} | "
            f"{r['params_per_gpu'] / 1e9:.2f}B | {r['state_gib_per_gpu']:.1f}{fit} | "
            f"{r['compute_ms']:.1f} | {r['optimizer_ms']:.1f} | "
            f"{r['fsdp_ms']:.1f} ({r['fsdp_dense_link']}/{r['fsdp_expert_link']}) | {r['ep_ms']:.1f} | "
            f"{r['pp_ms']:.2f} | {r['step_ms_serial']:.1f} / {r['step_ms_overlap']:.1f} | "
            f"{r['tokens_per_s_per_gpu_serial']:,.0f} / {r['tokens_per_s_per_gpu_overlap']:,.0f} | "
            f"{r['tokens_per_s_overlap']:,.0f} | {mfu} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = Assumptions(sliding_ms=0.0, full_ms=0.0)
    p = argparse.ArgumentParser(prog="project_120b.py", allow_abbrev=False,
                                description="GPT-OSS 120b throughput projection (see the module doc).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--results", metavar="FILE.jsonl", help="bench_block.py results (20b block)")
    src.add_argument("--assume-layer-ms", type=float, metavar="X",
                     help="assume X ms per layer fwd+bwd (both kinds) at --layer-tokens")
    p.add_argument("--assume-full-ms", type=float, default=None,
                   help="with --assume-layer-ms: a different full-causal layer time")
    p.add_argument("--label", default=None, help="with --results: only block records of this label")
    p.add_argument("--layer-tokens", type=int, default=d.layer_tokens,
                   help="tokens per call of --assume-layer-ms (default 16384)")
    p.add_argument("--gpus", default="8,64,128", help="comma list of world sizes")
    for name in ("tokens_per_gpu", "seq_len", "ep", "pp", "microbatches", "gpus_per_node",
                 "param_gather_bytes", "grad_reduce_bytes"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("optimizer_bytes_per_param", "hbm_tbps", "nvlink_gbps", "ib_gbps", "memory_gib"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--head-ms", type=float, default=None,
                   help="LM head + loss per step (default: its FLOPs at the blocks' measured rate)")
    p.add_argument("--activation-checkpoint", choices=("full", "none"), default=d.activation_checkpoint)
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: the results' peak)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.results:
        m = layer_ms_from_results(ns.results, ns.label)
        sliding, full, layer_tokens, source = m["sliding_ms"], m["full_ms"], m["layer_tokens"], m["source"]
        peak = ns.peak_tflops or m["peak"]
    else:
        sliding = ns.assume_layer_ms
        full = ns.assume_full_ms if ns.assume_full_ms is not None else ns.assume_layer_ms
        layer_tokens, source, peak = ns.layer_tokens, "assumed (--assume-layer-ms)", ns.peak_tflops
    a = Assumptions(
        sliding_ms=sliding, full_ms=full, layer_tokens=layer_tokens, layer_source=source,
        tokens_per_gpu=ns.tokens_per_gpu, seq_len=ns.seq_len, ep=ns.ep, pp=ns.pp,
        microbatches=ns.microbatches, activation_checkpoint=ns.activation_checkpoint,
        head_ms=ns.head_ms, optimizer_bytes_per_param=ns.optimizer_bytes_per_param,
        hbm_tbps=ns.hbm_tbps, gpus_per_node=ns.gpus_per_node, nvlink_gbps=ns.nvlink_gbps,
        ib_gbps=ns.ib_gbps, param_gather_bytes=ns.param_gather_bytes,
        grad_reduce_bytes=ns.grad_reduce_bytes, memory_gib=ns.memory_gib, peak_tflops=peak)
    rows = []
    for g in [int(x) for x in ns.gpus.split(",") if x.strip()]:
        try:
            rows.append(project(g, a))
        except ValueError as e:
            print(f"skip {g} GPUs: {e}", file=sys.stderr)
    if ns.json:
        print(json.dumps({"assumptions": asdict(a), "rows": rows}, indent=1))
        return 0
    print(f"GPT-OSS 120b projection. Layer times: sliding {sliding:.2f} ms, full {full:.2f} ms at "
          f"{layer_tokens} tokens [{source}].")
    print("Assumptions: " + ", ".join(f"{k}={v}" for k, v in asdict(a).items()
                                     if k not in ("sliding_ms", "full_ms", "layer_source")))
    print()
    print(format_table(rows, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
