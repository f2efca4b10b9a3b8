"""gpu_check part 3: one training step of the reference config split into phases, the device's
idle gaps in a profiled step, and a host-sync audit of one step.

    python benchmarks/check_profile.py --out results.jsonl [--warmup 2]
    python benchmarks/check_profile.py --smoke --out ...        # the tiny debug model on the CPU

After the first (compiling) step and --warmup steps, three more steps run, each instrumented
from outside the runtime (wrapped modules, hooks, patched attributes; nothing in runtime/):
1. phases: a CUDA event (CPU: a clock reading) is recorded at every phase boundary -- mask
   build, embedding + RoPE, each block's forward, head + loss forward, head + loss backward
   (from the model's return to the last block's output gradient), each block's backward (output
   gradient to the next block's), embedding backward + the loss read-back, grad clip, optimizer,
   the rest (zero_grad, lr, expert bias). Event-to-event times are device-timeline times: a
   phase's own idle time is included in it.
2. idle gaps: torch.profiler over one step; device busy time = the union of kernel/memcpy/memset
   intervals inside the step; idle = step span - busy; the largest gaps with their neighbours.
3. host syncs: torch.cuda.set_sync_debug_mode("warn") over one step; every synchronising call
   is listed by the innermost frame in this repository (file:line, function, code) and count.
Records: part "profile", checks "phases" and "host-sync audit".
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks.common import REPO, append_jsonl, check_record, synchronize

PART = "profile"
CONFIG = "benchmarks/configs/20b_2layer_seq4096.toml"
SMOKE = ["--model.flavor=tiny", "--training.seq_len=32", "--training.local_batch_size=2",
         "--training.device=cpu"]


# ----------------------------------------------------------------------------- phase marks

class Marks:
    """Labelled points on the device timeline; the phase named by a mark runs until the next."""

    def __init__(self, device: torch.device):
        self.device, self.points = device, []

    def __call__(self, label: str) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append((label, event))
        else:
            self.points.append((label, time.perf_counter()))

    def phases_ms(self) -> list[tuple[str, float]]:
        synchronize(self.device)
        out = []
        for (label, a), (_, b) in zip(self.points, self.points[1:]):
            ms = a.elapsed_time(b) if self.device.type == "cuda" else (b - a) * 1e3
            out.append((label, ms))
        return out


class MarkedBlock(nn.Module):
    """Wraps one transformer block: marks its forward, and (through a gradient hook on its
    output) the start of its backward. Block 0 also marks the end of the last block backward."""

    def __init__(self, block: nn.Module, index: int, last: bool, marks: Marks):
        super().__init__()
        self.block, self.index, self.last, self.marks = block, index, last, marks

    def forward(self, x, *args, **kwargs):
        self.marks(f"block {self.index} forward")
        out = self.block(x, *args, **kwargs)
        self.marks("head + loss forward" if self.last else "between blocks (forward)")
        if torch.is_grad_enabled():
            out.register_hook(self._backward_starts)
            if self.index == 0 and x.requires_grad:
                x.register_hook(self._backward_ends)
        return out

    def _backward_starts(self, grad):
        self.marks(f"block {self.index} backward")

    def _backward_ends(self, grad):
        self.marks("embedding backward + loss read-back")


@contextlib.contextmanager
def instrumented(trainer, marks: Marks):
    """Phase marks around one Trainer.optimizer_step, all from outside the runtime."""
    import runtime.model.model as model_module

    model = trainer.model
    keys = list(model.layers.keys())
    originals = {k: model.layers[k] for k in keys}
    for i, k in enumerate(keys):
        model.layers[k] = MarkedBlock(originals[k], i, i == len(keys) - 1, marks)

    def between(label: str, after: str, fn):
        def marked(*args, **kwargs):
            marks(label)
            out = fn(*args, **kwargs)
            marks(after)
            return out
        return marked

    def on_model_return(module, inputs, output):
        marks("head + loss backward")

    # (owner, attribute, phase, the phase after it); where the runtime renamed an attribute
    # the phase merges into its neighbour (the record's detail_ms shows which were marked).
    # The model's per-forward mask lookup (cached without document ids) or the builder itself.
    mask_owner = (model, "_attention_masks") if hasattr(model, "_attention_masks") else \
        (model_module, "build_attention_masks")
    targets = [(*mask_owner, "mask build", "embedding + rope"),
               (trainer, "clip_grad_norm_", "grad clip", "after grad clip"),
               (trainer.optimizer, "step", "optimizer", "zero_grad + lr + expert bias")]
    patched = []
    for owner, name, label, after in targets:
        if hasattr(owner, name):
            # own: an attribute of the object itself (a module's function, the lr scheduler's
            # wrapper of optimizer.step) is put back; a class's method is uncovered again.
            own = name in vars(owner)
            patched.append((owner, name, getattr(owner, name) if own else None))
            setattr(owner, name, between(label, after, getattr(owner, name)))
    handle = model.register_forward_hook(on_model_return)
    try:
        yield
    finally:
        for owner, name, original in patched:
            if original is not None:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        handle.remove()
        for k in keys:
            model.layers[k] = originals[k]


def phase_summary(phases: list[tuple[str, float]]) -> dict:
    """The issue's categories from the detailed phases (ms)."""
    cats = collections.OrderedDict((c, 0.0) for c in (
        "blocks forward", "blocks backward", "loss forward", "loss backward", "optimizer", "grad clip",
        "mask build", "other"))
    for label, ms in phases:
        if label.startswith("block ") and label.endswith("forward"):
            cats["blocks forward"] += ms
        elif label.startswith("block ") and label.endswith("backward"):
            cats["blocks backward"] += ms
        elif label == "head + loss forward":
            cats["loss forward"] += ms
        elif label == "head + loss backward":
            cats["loss backward"] += ms
        elif label in ("optimizer", "grad clip", "mask build"):
            cats[label] += ms
        else:
            cats["other"] += ms
    return dict(cats)


# ----------------------------------------------------------------------------- idle gaps

BUSY_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def idle_gaps(trace: dict, annotation: str, top: int = 5) -> dict:
    """From a chrome trace: the annotated step's span, the union of device activity inside it,
    idle = span - busy, and the `top` largest gaps (us) with the activity before/after them."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    spans = [e for e in events if e.get("name") == annotation and e.get("cat") == "user_annotation"]
    if not spans:
        return {"span_ms": None, "busy_ms": None, "idle_ms": None, "gaps": []}
    t0 = spans[0]["ts"]
    t1 = t0 + spans[0]["dur"]
    busy = sorted((e["ts"], e["ts"] + e["dur"], e.get("name", "")) for e in events
                  if e.get("cat") in BUSY_CATEGORIES and t0 <= e["ts"] <= t1)
    if not busy:
        return {"span_ms": (t1 - t0) / 1e3, "busy_ms": None, "idle_ms": None, "gaps": [],
                "note": "no device activity in the trace (CPU run)"}
    merged: list[list] = []  # [start, end, first name, last name]
    for s, e, name in busy:
        if merged and s <= merged[-1][1]:
            if e > merged[-1][1]:
                merged[-1][1], merged[-1][3] = e, name
        else:
            merged.append([s, e, name, name])
    busy_us = sum(e - s for s, e, _, _ in merged)
    gaps = [(merged[0][0] - t0, "(step start)", merged[0][2])]
    gaps += [(b[0] - a[1], a[3], b[2]) for a, b in zip(merged, merged[1:])]
    gaps.append((t1 - merged[-1][1], merged[-1][3], "(step end)"))
    gaps.sort(key=lambda g: -g[0])
    return {"span_ms": (t1 - t0) / 1e3, "busy_ms": busy_us / 1e3, "idle_ms": (t1 - t0 - busy_us) / 1e3,
            "device_ops": len(busy), "gaps_over_100us": sum(1 for g in gaps if g[0] > 100),
            "gaps": [{"us": round(g[0], 1), "after": g[1][:90], "before": g[2][:90]} for g in gaps[:top]]}


def top_kernels(trace: dict, n: int = 10) -> list[dict]:
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") == "kernel":
            totals[e.get("name", "")][0] += e["dur"]
            totals[e.get("name", "")][1] += 1
    best = sorted(totals.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"kernel": k[:120], "ms": v[0] / 1e3, "calls": v[1]} for k, v in best]


def profiled_step(trainer, batch, device) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks.bench_train import one_step

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        with record_function("gpu_check_step"):
            one_step(trainer, batch)
            synchronize(device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-trace-") as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    return {**idle_gaps(trace, "gpu_check_step"), "top_kernels": top_kernels(trace)}


# ----------------------------------------------------------------------------- host syncs

def _site(stack: list[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    """The innermost frame inside this repository, this file excluded."""
    here = Path(__file__).resolve()
    for frame in reversed(stack):
        path = Path(frame.filename).resolve()
        if path != here and REPO in path.parents:
            return frame
    return None


def sync_audit(trainer, batch, device) -> dict:
    """Each synchronising CUDA call of one step, by repository site."""
    from benchmarks.bench_train import one_step

    sites: collections.Counter = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "synchroniz" not in text.lower():
            return
        frame = _site(traceback.extract_stack()[:-1])
        where = (f"{Path(frame.filename).resolve().relative_to(REPO)}:{frame.lineno} {frame.name}: "
                 f"{(frame.line or '').strip()}") if frame else f"{filename}:{lineno}"
        sites[(where, text.splitlines()[0][:120])] += 1

    cuda = device.type == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            one_step(trainer, batch)
            synchronize(device)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    listed = [{"site": s, "message": m, "count": c} for (s, m), c in sites.most_common()]
    return {"syncs": sum(sites.values()), "sites": listed,
            **({} if cuda else {"note": "CPU run: no CUDA synchronisation to audit (the capture ran)"})}


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="check_profile.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, metavar="FILE.jsonl")
    p.add_argument("--smoke", action="store_true", help="the tiny debug model on the CPU")
    p.add_argument("--warmup", type=int, default=2, help="steps after the compiling first one")
    a, overrides = p.parse_known_args(argv)
    from benchmarks.bench_train import BENCH_DEFAULTS, one_step
    from runtime.train.config.loader import load_config
    from runtime.train.trainer import Trainer

    config = "configs/debugmodel.toml" if a.smoke else CONFIG
    overrides = (SMOKE if a.smoke else []) + overrides
    device = torch.device("cpu" if a.smoke else "cuda")
    total = 1 + a.warmup + 3
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    dump = tempfile.mkdtemp(prefix="gpu-check-profile-")  # the trainer's dump folder: nothing kept
    try:
        cfg = load_config(str(REPO / config), BENCH_DEFAULTS + [f"--training.steps={total}",
                                                                f"--job.dump_folder={dump}"] + overrides)
        trainer = Trainer(cfg)
        data = iter(trainer.dataloader)
        batches = [next(data) for _ in range(total)]
        for batch in batches[:1 + a.warmup]:
            one_step(trainer, batch)
        marks = Marks(device)
        synchronize(device)
        with instrumented(trainer, marks):
            marks("h2d + token count")
            one_step(trainer, batches[-3])
            marks("end")
        phases = marks.phases_ms()
        results["phases"] = {"step_ms": sum(ms for _, ms in phases), "phases_ms": phase_summary(phases),
                             "detail_ms": [{"phase": label, "ms": ms} for label, ms in phases],
                             **profiled_step(trainer, batches[-2], device)}
        results["host-sync audit"] = sync_audit(trainer, batches[-1], device)
        common = {"config": config, "overrides": overrides, "warmup": a.warmup}
        ok = True
    except Exception as exc:  # noqa: BLE001 - recorded as a failed part
        traceback.print_exc()
        common = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"}
        ok = False
    shutil.rmtree(dump, ignore_errors=True)
    for check in ("phases", "host-sync audit"):
        rec = check_record(PART, check, ok and check in results, device,
                           seconds=round(time.perf_counter() - t0, 3), **common, **results.get(check, {}))
        append_jsonl(a.out, rec)
    if ok:
        ph = results["phases"]
        cats = " | ".join(f"{k} {v:.2f}" for k, v in ph["phases_ms"].items())
        idle = "n/a" if ph.get("idle_ms") is None else f"{ph['idle_ms']:.2f}"
        print(f"[profile] step {ph['step_ms']:.2f} ms: {cats} | idle (profiled step) {idle} ms", flush=True)
        audit = results["host-sync audit"]
        print(f"[profile] host syncs in one step: {audit['syncs']}", flush=True)
        for s in audit["sites"]:
            print(f"[profile]   {s['count']:3d} x {s['site']}", flush=True)
    else:
        print(f"[profile] FAILED: {common['error']}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
