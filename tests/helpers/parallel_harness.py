"""Multi-process parity harness: run the real Trainer on 1 or N CPU ranks (gloo) and compare.

Every parallelism is proven the same way: train a few optimizer steps on one process, train
the same steps on a mesh of N processes with the same global batch and the same initial
weights, and compare per-step losses, gradient norms and the final parameters.

    from parallel_harness import BASE, assert_parity, run_distributed, run_single, seeded

    common = seeded(BASE, tmp_path / "seed")                      # identical initial weights
    ref = run_single(common + ["--training.local_batch_size=4"], steps=3)
    got = run_distributed(2, common + ["--training.local_batch_size=2",
                                       "--parallelism.tensor_parallel_degree=2"], steps=3)
    assert_parity(ref, got)

Rules that keep the comparison meaningful:
- Same global batch: the data loader hands out the same global batch whatever the mesh, so
  keep `local_batch_size x dp x accumulation` equal (dp = replicate x shard; TP/CP/PP ranks
  are not data-parallel and share their samples). `global_batch_overrides(4, dp)` helps.
- Same initial weights: every run loads the seed checkpoint (`make_seed_checkpoint`, a
  model-only DCP dir written by one process), so init order or RNG per rank never matter.
- fp32 everywhere (CPU: compute_dtype auto = float32, FSDP param dtype follows it).

Each run happens in fresh processes, forked from a forkserver that has already imported torch
and the runtime (one per test process, started at the first run). A spawned rank spent ~3.5 s
of CPU importing them, most of a tiny run's cost; a forked rank starts at once. What a spawned
rank would inherit from the test process at launch time is passed explicitly instead: the
environment (tests may monkeypatch it), sys.path and the working directory. A rank sets RANK /
WORLD_SIZE / LOCAL_RANK / MASTER_ADDR=127.0.0.1 / MASTER_PORT (a free port), 1 intra-op
thread, initialises gloo itself (with a timeout, so a rank stuck in a collective after a peer
died cannot hang CI), builds `Trainer(load_config(None, overrides))` and runs it. Every rank
writes the full tensors of its model parts, rank 0 the losses; every rank ends with barrier,
destroy_process_group and `os._exit(0)` (gloo sometimes aborts in its destructors at
interpreter exit). A failing rank writes its traceback, which `RunError` shows.

A result is a dict:
    losses      [float] per optimizer step (mean token loss over the global batch)
    grad_norms  [float] per step (total norm before clipping, over all shards)
    params      {name: fp32 CPU tensor}, the full (unsharded) model state after the last
                step (parameters and persistent buffers, e.g. the MoE expert bias), merged
                over ranks (pipeline stages live on different ranks)
    params_rank_spread  (where, max |diff|) between ranks holding the same tensor: replicas
                that drifted apart (assert_parity requires <= param_atol)
    info        what rank 0 really ran: mesh, grad_accum, global_batch, per-layer
                activation_checkpoint, block_calls, dynamo_unique_graphs, placements, fsdp_mesh,
                fsdp; under pipeline parallelism also schedule, stage_ids, microbatches, layers,
                ep_overlap (DualPipeV x EP: overlapped actions, hand-overs, turn order)
    ranks       [{losses, grad_norms, info}] of every rank (pipeline ranks each report theirs)
    world_size  int;  wall_s  float (seconds in the workers, excluding process start)

`hook="module:function"` (or a module-level function) runs in every rank before the trainer
is built, with (rank, world_size): use it to patch something for a negative control (prove
that a test can fail) or to select a test-only backend. A hook may return a function: it is
called with the built trainer (e.g. to wrap `trainer.clip_grad_norm_`, which sees the step's
gradients after backward and before clipping, or to add module hooks to `trainer.model`). The environment variable
PARALLEL_HARNESS_HOOK=module:function adds a hook to every multi-process run (world > 1)
only, leaving single-process references untouched: a whole parity suite can be rerun with a
deliberately broken parallel path to see each test fail, e.g.
    PARALLEL_HARNESS_HOOK=my_bugs:skip_grad_sync pytest tests/parallel/test_parallel_parity.py
(with my_bugs.py importable, e.g. via PYTHONPATH).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# A tiny run: every mechanism of the model (sinks, sliding windows, MoE with bias), fp32 on
# CPU, 3 optimizer steps in well under a second per rank. Warmup 0 so the very first step uses
# the full learning rate (parameter differences then show up after one step).
BASE = [
    "--model.flavor=tiny",
    "--training.seq_len=32",
    "--training.device=cpu",
    "--training.seed=0",
    "--training.max_norm=1.0",
    "--optimizer.lr=3e-3",
    "--optimizer.eps=1e-3",  # see assert_parity: makes the parameter comparison meaningful
    "--lr_scheduler.warmup_steps=0",
    "--lr_scheduler.decay_type=constant",
    "--checkpoint.enable=false",
    "--metrics.log_freq=1",
    "--metrics.enable_jsonl=false",
]

# The parity suites' defaults: optimizer steps per run, and sequences per optimizer step
# whatever the mesh (local batch = GLOBAL_BATCH / dp / accumulation).
STEPS = 3
GLOBAL_BATCH = 4

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TIMEOUT_S = 180.0
_RESULT = "result.pt"


class RunError(RuntimeError):
    """A worker failed, or the run timed out; the message carries the ranks' tracebacks."""


def global_batch_overrides(global_batch: int, dp: int, accumulation: int = 1) -> list[str]:
    """local_batch_size / global_batch_size for `global_batch` samples per optimizer step over
    `dp` data-parallel ranks with `accumulation` micro-steps."""
    local, rem = divmod(global_batch, dp * accumulation)
    if rem or local < 1:
        raise ValueError(f"global batch {global_batch} does not split over dp {dp} x accumulation "
                         f"{accumulation}")
    return [f"--training.local_batch_size={local}", f"--training.global_batch_size={global_batch}"]


def make_seed_checkpoint(overrides: list[str], directory: str | Path) -> str:
    """Write the initial weights of the config's model (after `init_weights`, seed
    training.seed) as a model-only DCP checkpoint {"model": ...}; returns the directory for
    `--checkpoint.initial_load_path`. Runs in a fresh single process."""
    directory = Path(directory)
    _launch(1, list(overrides), steps=0, out_dir=directory, hook=None, timeout=DEFAULT_TIMEOUT_S,
            target=_seed_worker)
    if not (directory / ".metadata").is_file():
        raise RunError(f"seed checkpoint was not written to {directory}")
    return str(directory)


def seeded(overrides: list[str], directory: str | Path) -> list[str]:
    """`overrides` plus the load of a seed checkpoint written for them in `directory`
    (`make_seed_checkpoint`): every run of a comparison starts from these weights."""
    seed = make_seed_checkpoint(overrides, directory)
    return list(overrides) + [f"--checkpoint.initial_load_path={seed}"]


def run_single(overrides: list[str], steps: int, **kwargs) -> dict[str, Any]:
    """Train `steps` optimizer steps in one fresh process without a process group
    (keyword arguments: as run_distributed)."""
    return run_distributed(1, overrides, steps, **kwargs)


def run_distributed(world_size: int, overrides: list[str], steps: int, *,
                    hook: str | Callable | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                    out_dir: str | Path | None = None,
                    count_block_calls: bool = False) -> dict[str, Any]:
    """Train `steps` optimizer steps on `world_size` gloo ranks (world_size 1: no process
    group at all, i.e. the single-process reference). `out_dir` (default: a temporary
    directory, removed afterwards) receives the job's dump folder and the result file.
    count_block_calls: count how often each block's first norm runs (forward plus any
    activation-checkpoint recomputation) into result["info"]["block_calls"] (eager only:
    the counting hooks would be traced by torch.compile)."""
    if out_dir is not None:
        return _run_in(Path(out_dir), world_size, overrides, steps, hook, timeout,
                       count_block_calls)
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        return _run_in(Path(tmp), world_size, overrides, steps, hook, timeout, count_block_calls)


def _run_in(out_dir: Path, world_size, overrides, steps, hook, timeout,
            count_block_calls) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    _launch(world_size, list(overrides), steps, out_dir, hook, timeout, target=_train_worker,
            options={"count_block_calls": count_block_calls})
    result = torch.load(out_dir / _RESULT, weights_only=False)
    result["world_size"] = world_size
    result["params"], result["params_rank_spread"] = _merge_rank_params(out_dir, world_size)
    result["ranks"] = [torch.load(out_dir / f"record-rank{r}.pt", weights_only=False)
                       for r in range(world_size)]
    return result


def _merge_rank_params(out_dir: Path, world_size: int) -> tuple[dict, tuple[str, float]]:
    """Every rank wrote the full tensors of the model parts it holds (all of them, or its
    pipeline stages): merge by name, and measure how far ranks holding the same tensor
    disagree (replicas out of sync show up here even when rank 0 looks right)."""
    merged: dict[str, torch.Tensor] = {}
    spread = ("", 0.0)
    for rank in range(world_size):
        for name, value in torch.load(out_dir / f"params-rank{rank}.pt").items():
            if name not in merged:
                merged[name] = value
                continue
            if value.shape != merged[name].shape:
                diff = math.inf
            else:
                diff = (value - merged[name]).abs().max().item() if value.numel() else 0.0
            if diff > spread[1]:
                spread = (f"{name} (rank {rank} vs a lower rank)", diff)
    return merged, spread


# --------------------------------------------------------------------------- hooks

def compile_with_aot_eager(rank: int, world_size: int) -> None:
    """Hook: `torch.compile` (and so `nn.Module.compile`) defaults to backend="aot_eager" in
    this rank. The trainer's compile (whole blocks, or regional parts and the experts' math)
    then runs dynamo tracing and AOTAutograd (joint graph, functionalised backward) exactly
    as with inductor, minus inductor's C++ code generation, which takes over a minute per
    run on a small CPU. The config has no backend key, hence a hook."""
    import torch

    original = torch.compile
    if getattr(original, "_parity_aot_eager", False):
        return

    def compile(*args, **kwargs):
        kwargs.setdefault("backend", "aot_eager")
        return original(*args, **kwargs)

    compile._parity_aot_eager = True
    torch.compile = compile


# --------------------------------------------------------------------------- comparison

def assert_parity(ref: dict, got: dict, *, loss_rtol: float = 1e-5, grad_norm_rtol: float = 1e-4,
                  param_atol: float = 1e-6, param_rtol: float = 1e-5, what: str = "") -> None:
    """Assert two runs agree: per-step losses and grad norms within a relative tolerance,
    every final tensor within |a - b| <= param_atol + param_rtol * |b| (same names).

    Default tolerances (fp32, BASE settings, 3 steps), measured and why:
    - losses 1e-5 relative (observed ~1e-7: only the summation order differs).
    - grad norms 1e-4 relative (observed up to ~2e-5): the gradients themselves agree to
      ~2e-7, but torch's fp32 CPU vector norm of a 0.5M-element tensor (the 8192 x 64 output
      head) is itself off by ~4e-5 relative; sharded runs take norms of halves, so the
      rounding differs.
    - parameters atol 1e-6 + rtol 1e-5 (observed <= 1e-7). This holds because BASE uses
      AdamW eps 1e-3: with the usual 1e-8, Adam's first steps move every weight by
      ~lr * g / (|g| + eps), i.e. by ~lr whatever |g|, so gradient entries that are pure
      rounding noise (|g| ~ 1e-9, true value ~0) move weights by up to ~lr/10 = 3e-4 in
      opposite directions on two meshes. With eps 1e-3 such entries move weights by
      ~lr * 1e-6, the comparison can be tight, and the update is no longer invariant to
      the scale of the gradient, so a wrongly scaled gradient (a missed or doubled
      data-parallel average) changes the parameters, not only the reported grad norm.
    """
    label = f"{what}: " if what else ""
    problems = []
    for run in (ref, got):
        where, spread = run.get("params_rank_spread", ("", 0.0))
        if spread > param_atol:
            problems.append(f"ranks of the {run.get('world_size')}-rank run disagree on "
                            f"{where}: max |diff| {spread:.3e}")
    for key, rtol in (("losses", loss_rtol), ("grad_norms", grad_norm_rtol)):
        a, b = ref[key], got[key]
        if len(a) != len(b):
            problems.append(f"{key}: {len(a)} steps vs {len(b)}")
            continue
        for step, (x, y) in enumerate(zip(a, b), start=1):
            if not (math.isfinite(x) and math.isfinite(y)) or abs(x - y) > rtol * abs(x):
                problems.append(f"{key} step {step}: {x!r} vs {y!r} "
                                f"(rel {abs(x - y) / max(abs(x), 1e-30):.2e} > {rtol:.0e})")
    pa, pb = ref["params"], got["params"]
    if set(pa) != set(pb):
        problems.append(f"parameter names differ: only in reference {sorted(set(pa) - set(pb))}, "
                        f"only in run {sorted(set(pb) - set(pa))}")
    worst = max_param_diff(ref, got)
    for name in sorted(set(pa) & set(pb)):
        a, b = pa[name], pb[name]
        if a.shape != b.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        elif not torch.allclose(b, a, rtol=param_rtol, atol=param_atol):
            diff = (a - b).abs().max().item()
            problems.append(f"param {name}: max |diff| {diff:.3e} > atol {param_atol:.0e} + "
                            f"rtol {param_rtol:.0e} * |ref|")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AssertionError(f"{label}runs differ (reference world {ref.get('world_size')}, run "
                             f"world {got.get('world_size')}; largest param diff {worst[1]:.3e} "
                             f"in {worst[0]}):\n  {shown}{more}")


def max_param_diff(ref: dict, got: dict) -> tuple[str, float]:
    """(name, max |diff|) of the most different common tensor (for reporting tolerances)."""
    best = ("", 0.0)
    for name in set(ref["params"]) & set(got["params"]):
        a, b = ref["params"][name], got["params"][name]
        if a.shape == b.shape and a.numel():
            d = (a - b).abs().max().item()
            if d > best[1]:
                best = (name, d)
    return best


def summarize(ref: dict, got: dict) -> str:
    """One line: worst relative loss / grad-norm diff and worst param diff (for -s logs)."""
    def rel(key):
        pairs = zip(ref[key], got[key])
        return max((abs(x - y) / max(abs(x), 1e-30) for x, y in pairs), default=0.0)
    name, diff = max_param_diff(ref, got)
    return (f"loss rel {rel('losses'):.1e}, grad-norm rel {rel('grad_norms'):.1e}, "
            f"param max |diff| {diff:.1e} ({name})")


# --------------------------------------------------------------------------- processes

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hook_name(hook) -> str | None:
    if hook is None or isinstance(hook, str):
        return hook
    return f"{hook.__module__}:{hook.__qualname__}"


def _launch(world_size: int, overrides: list[str], steps: int, out_dir: Path, hook,
            timeout: float, target: Callable, options: dict | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stale_files = [*out_dir.glob("error-rank*.txt"), *out_dir.glob("params-rank*.pt"),
                   *out_dir.glob("record-rank*.pt")]
    for stale in stale_files + [out_dir / _RESULT]:
        stale.unlink(missing_ok=True)
    ctx = process_context()
    port = _free_port()
    options = {**(options or {}), "environ": dict(os.environ), "sys_path": list(sys.path),
               "cwd": os.getcwd()}
    procs = [ctx.Process(target=target, daemon=False,
                         args=(rank, world_size, port, overrides, steps, str(out_dir),
                               _hook_name(hook), options))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    failed_at = None
    try:
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = now  # peers are probably stuck in a collective: short grace
            if now > deadline or (failed_at is not None and now - failed_at > 10):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    codes = [p.exitcode for p in procs]
    if all(c == 0 for c in codes) and (target is _seed_worker or (out_dir / _RESULT).is_file()):
        return
    errors = []
    for rank in range(world_size):
        path = out_dir / f"error-rank{rank}.txt"
        if path.is_file():
            errors.append(f"--- rank {rank} ---\n{path.read_text()}")
    why = "timed out" if failed_at is None and any(c is None or c < 0 for c in codes) else "failed"
    raise RunError(f"{world_size}-rank run {why} (exit codes {codes}; timeout {timeout:.0f}s); "
                   f"overrides {overrides}\n" + ("\n".join(errors) or "(no traceback written)"))


# Imported once by the forkserver, so that every rank forked from it starts with them loaded.
_PRELOAD = ["torch", "torch.distributed.checkpoint", "runtime.train.trainer",
            "runtime.train.checkpoint.manager", "parallel_harness"]


def process_context():
    """The forkserver context every multi-process test starts its ranks from (preloading
    _PRELOAD; the server starts at the first run)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _setup_rank(rank: int, world_size: int, port: int, hook: str | None,
                options: dict) -> list[Callable]:
    """Environment, process group and hooks of one rank; returns the hooks' trainer callbacks."""
    # The test process's state at launch time, not the forkserver's (started earlier).
    os.environ.clear()
    os.environ.update(options["environ"])
    sys.path[:] = options["sys_path"]
    os.chdir(options["cwd"])
    if str(REPO) not in sys.path:  # `import runtime` from a checkout that is not installed
        sys.path.insert(0, str(REPO))
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    })
    torch.set_num_threads(1)
    if world_size > 1:
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
    hooks = [hook]
    if world_size > 1:
        hooks.append(os.environ.get("PARALLEL_HARNESS_HOOK"))
    on_trainer = []
    for spec in filter(None, hooks):
        module, _, name = spec.partition(":")
        fn: Any = importlib.import_module(module)
        for part in name.split("."):
            fn = getattr(fn, part)
        callback = fn(rank, world_size)
        if callable(callback):
            on_trainer.append(callback)
    return on_trainer


def _finish(rank: int, out_dir: str, error: BaseException | None) -> None:
    import torch.distributed as dist

    if error is not None:
        Path(out_dir, f"error-rank{rank}.txt").write_text(
            "".join(traceback.format_exception(type(error), error, error.__traceback__)))
        os._exit(1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)


def _config(overrides: list[str], steps: int, out_dir: str):
    from runtime.train.config.loader import load_config

    extra = [f"--job.dump_folder={Path(out_dir) / 'job'}"]
    if steps > 0:
        extra.append(f"--training.steps={steps}")
    return load_config(None, list(overrides) + extra)


def _model_parts(trainer) -> list:
    """The rank's model parts: [model], or its pipeline stages."""
    return list(trainer.model_parts)


def _blocks(trainer) -> dict[str, Any]:
    """Layer id -> transformer block, over the rank's model parts."""
    return {name: block for part in _model_parts(trainer)
            for name, block in part.layers.items()}


def _describe(trainer, block_calls: dict[str, int]) -> dict[str, Any]:
    """What the run actually did on rank 0, for tests to assert that the mode under test was
    engaged (layer ids are strings: "0", "1", ...)."""
    import sys

    parts = _model_parts(trainer)
    dynamo = sys.modules.get("torch._dynamo.utils")
    return {
        "mesh": trainer.dims.describe(),
        "grad_accum": trainer.grad_accum,
        "global_batch": trainer.global_batch,
        "activation_checkpoint": {n: b.activation_checkpoint for n, b in _blocks(trainer).items()},
        "block_calls": block_calls,
        # Compiled frames (torch.compile engaged), 0 when dynamo never ran.
        "dynamo_unique_graphs": int(dynamo.counters["stats"]["unique_graphs"]) if dynamo else 0,
        # name -> "DTensor(Shard(dim=0),)" / "Tensor": how each parameter is held on rank 0.
        "placements": {n: f"DTensor{tuple(p.placements)}" if hasattr(p, "placements") else "Tensor"
                       for part in parts for n, p in part.named_parameters()},
        "fsdp_mesh": _fsdp_mesh(parts[0]),
        "fsdp": [hasattr(p, "placements") for p in parts[0].parameters()][:1],
        **_describe_pipeline(trainer),
    }


def _describe_pipeline(trainer) -> dict[str, Any]:
    from runtime.train.runner import Runner

    pipe = trainer.runner
    if not hasattr(pipe, "schedule"):  # not the pipeline runner
        return {}
    overlap = getattr(pipe, "ep_overlap", None)
    return {"schedule": type(pipe.schedule).__name__, "stage_ids": pipe.stage_ids,
            "is_runner": isinstance(pipe, Runner),  # the trainer's contract (runner.py)
            "microbatches": pipe.microbatches,
            "layers": [sorted(int(k) for k in part.layers) for part in _model_parts(trainer)],
            # DualPipeV x EP overlap: dualpipe_overlap.OverlapStats as a dict, None when off.
            "ep_overlap": None if overlap is None else dataclasses.asdict(overlap.stats)}


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _fsdp_mesh(model) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    """(dim names, sizes) of the mesh the root parameters are distributed on, if any."""
    p = next(model.parameters())
    mesh = getattr(p, "device_mesh", None)
    if mesh is None:
        return None
    return tuple(mesh.mesh_dim_names or ()), tuple(mesh.mesh.shape)


def _seed_worker(rank, world_size, port, overrides, steps, out_dir, hook, options) -> None:
    error = None
    try:
        _setup_rank(rank, world_size, port, hook, options)
        import torch.distributed.checkpoint as dcp

        from runtime.model import GptOssModel
        from runtime.train.checkpoint.manager import ModelState

        cfg = _config(overrides, steps, out_dir)
        torch.manual_seed(cfg.training.seed)
        with torch.device("meta"):
            model = GptOssModel(cfg.model_args())
        model.to_empty(device="cpu")
        model.init_weights(seed=cfg.training.seed)
        dcp.save({"model": ModelState([model])}, checkpoint_id=out_dir)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        error = e
    _finish(rank, out_dir, error)


def _train_worker(rank, world_size, port, overrides, steps, out_dir, hook, options) -> None:
    error = None
    try:
        on_trainer = _setup_rank(rank, world_size, port, hook, options)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from runtime.train.trainer import Trainer

        trainer = Trainer(_config(overrides, steps, out_dir))
        for callback in on_trainer:
            callback(trainer)
        torch.set_num_threads(1)  # the trainer picks cores/ranks; keep runs comparable
        losses, grad_norms = [], []
        train_step = trainer.train_step

        def recording_step(batch):
            loss, grad_norm = train_step(batch)
            losses.append(float(loss))
            grad_norms.append(float(grad_norm))
            return loss, grad_norm

        trainer.train_step = recording_step
        block_calls = {name: 0 for name in _blocks(trainer)}
        if options.get("count_block_calls"):
            for name, block in _blocks(trainer).items():
                def count(module, args, name=name):
                    block_calls[name] += 1
                block.attention_norm.register_forward_pre_hook(count)
        start = time.perf_counter()
        code = trainer.run()
        wall = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"Trainer.run() returned {code}")
        # Full tensors of every part on every rank (collectives over the part's own meshes),
        # written per rank and merged by the parent: pipeline stages live on different ranks.
        params = {}
        for part in _model_parts(trainer):
            state = get_model_state_dict(
                part, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
            params.update({k: v.detach().to("cpu", torch.float32).clone()
                           for k, v in state.items()})
        _save(params, Path(out_dir, f"params-rank{rank}.pt"))
        info = _describe(trainer, block_calls)
        _save({"losses": losses, "grad_norms": grad_norms, "info": info},
              Path(out_dir, f"record-rank{rank}.pt"))
        if rank == 0:
            _save({"losses": losses, "grad_norms": grad_norms, "wall_s": wall, "info": info},
                  Path(out_dir, _RESULT))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        error = e
    _finish(rank, out_dir, error)
