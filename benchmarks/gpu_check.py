"""One command for a GPU window: every CUDA path proven and the first numbers taken, in <= 8
minutes on one H200, written as one JSONL + one markdown summary (+ one log).

    bash benchmarks/gpu_check.sh                        # results under benchmarks/results/
    RESULTS_DIR=$OUT bash benchmarks/gpu_check.sh       # on the lent GPU machine
    bash benchmarks/gpu_check.sh --cpu-smoke            # tiny shapes on the CPU (CI, < 2 min)
    bash benchmarks/gpu_check.sh --parts correctness,block --budget reference=200

Parts, in this order, each step its own subprocess with its own time budget (seconds, GPU /
CPU smoke); a step that fails or runs out of time is recorded and the rest still run. Part 1's
steps run side by side (their time is mostly compiling, which is CPU-bound: 16 cores; their GPU
loads are tiny), the measuring parts alone, one after the other:
  correctness  flex       check_correctness.py --only flex: compiled flex vs math attention,
                          bf16 + fp32 x sliding/full x with/without document ids          150 / 150
               model      check_correctness.py --only experts,block,train,float8: grouped vs
                          loop experts, compiled block (graph breaks, recompiles), eager +
                          compiled training step vs the CPU fp32 step, float8              170 / 170
               torchrun   check_fsdp_step.py under torchrun --nproc-per-node 1 (NCCL,
                          FSDP2 bf16, full AC)                                            90 / 150
               pytest     pytest -m gpu tests (the GPU test set)                         120 / 170
  reference    dryrun     check_dry_run.py: the CUDA dry run's prediction for the reference
                          config (fake CUDA tensors, on the CPU: beside part 1)          150 / 150
               train      check_reference.py: the reference config's tokens/s, first step,
                          peak memory, runtime.plan's estimate and the dry run's beside
                          the measured peak                                             130 /  90
  profile      phases     check_profile.py: one step in phases, idle gaps, host-sync audit 70 /  90
  block        block      check_block.py: bench_block.py, 20b block sliding vs full
                          + the attention core alone                                      90 /  90
               (GPU: 170 + 130 + 70 + 90 = 460 s, + start-up = 8 minutes; not measured yet)
--budget STEP=S overrides a budget (STEP: a part, or part/step). The whole run is also capped
(--total-budget, default 465 s on a GPU): a step gets at most the time left. All steps share one inductor/triton cache ($GPU_CHECK_CACHE, default
$TMPDIR/gptoss-gpu-check-cache): later parts reuse what earlier ones compiled, and a second run
on the same machine is warm (the run record says whether the cache started empty).

Output in $RESULTS_DIR (default benchmarks/results/): gpu_check-<UTC stamp>.jsonl (every
record: kind "gpu_check", part, check, passed, gpu, torch, date + numbers), .md (the summary,
also printed last) and .log (every step's full output). Exit 1 if a correctness step failed,
else 0 (failures of the measuring parts are reported in the summary); 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, append_jsonl, read_jsonl

PARTS = ("correctness", "reference", "profile", "block")
GPU_TOTAL_S, CPU_TOTAL_S = 465, 360  # + ~10 s of this process's own: <= 8 minutes


@dataclass
class Step:
    part: str
    name: str
    argv: list[str]
    budget_gpu: int
    budget_cpu: int
    junit: str | None = None  # pytest's report, read for the counts
    wave: int = 0  # consecutive steps of one wave run at the same time (compiles are CPU-bound)


def plan_steps(py: str, jsonl: str, smoke: bool, scratch: str) -> list[Step]:
    """Part 1's four steps run side by side (their work is mostly compiling: 16 CPU cores, and
    tiny GPU loads); the measuring parts run alone, one after the other."""
    flag = ["--smoke"] if smoke else []
    junit = os.path.join(scratch, "pytest-gpu.xml")
    dry_run = os.path.join(scratch, "dry_run.jsonl")  # check_reference.py copies it into jsonl
    checks = [py, "benchmarks/check_correctness.py", "--out", jsonl, *flag, "--only"]
    return [
        Step("correctness", "flex", checks + ["flex"], 150, 150, wave=1),
        Step("correctness", "model", checks + ["experts,block,train,float8"], 170, 170, wave=1),
        Step("correctness", "torchrun", [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                                         "benchmarks/check_fsdp_step.py", "--out", jsonl] + flag, 90, 150, wave=1),
        Step("correctness", "pytest", [py, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                                       "--junitxml", junit, "tests"], 120, 170, junit=junit, wave=1),
        # The dry run traces on the CPU (fake CUDA tensors): beside part 1, before the GPU measures.
        Step("reference", "dryrun", [py, "benchmarks/check_dry_run.py", "--out", dry_run] + flag, 150, 150,
             wave=1),
        Step("reference", "train", [py, "benchmarks/check_reference.py", "--out", jsonl, "--dry-run", dry_run]
             + flag, 130, 90, wave=2),
        Step("profile", "phases", [py, "benchmarks/check_profile.py", "--out", jsonl] + flag, 70, 90, wave=3),
        Step("block", "block", [py, "benchmarks/check_block.py", "--out", jsonl] + flag, 90, 90, wave=4),
    ]


# ----------------------------------------------------------------------------- running a step

class Log:
    """Every step's output into one log file; status lines ('[...') echoed to the console."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def write(self, text: str, echo: bool = False, to_file: bool = True) -> None:
        with self.lock:
            if to_file:
                self.file.write(text)
            if echo:
                sys.stdout.write(text)
                sys.stdout.flush()

    def say(self, text: str) -> None:
        self.write(f"[gpu_check {dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {text}\n", echo=True)


class Running:
    """One step's process (its own session, so a timeout ends all of its children) with its
    output pumped to the log, each line tagged with the step (steps of a wave interleave)."""

    def __init__(self, step: Step, budget: float, env: dict, log: Log):
        self.step, self.budget = step, budget
        tag = f"{step.part}/{step.name} | "
        log.write(f"{tag}===== {' '.join(step.argv)} (budget {budget:.0f} s)\n")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace",
                                     start_new_session=True)
        self.tail: list[str] = []
        self.ended: float | None = None

        def pump():
            for line in self.proc.stdout:
                log.write(tag + line)
                if line.startswith("["):  # the workers' one-line results
                    log.write(line, echo=True, to_file=False)
                self.tail.append(line)
                del self.tail[:-15]
            self.ended = time.perf_counter()  # end of output: the process has exited (or closed it)

        self.reader = threading.Thread(target=pump, daemon=True)
        self.reader.start()

    def finish(self) -> dict:
        """Wait until the step ends or its budget (counted from its start) is spent; then
        exit code, seconds, timed_out and the output's last lines."""
        timed_out = False
        try:
            code = self.proc.wait(timeout=max(0.0, self.t0 + self.budget - time.perf_counter()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _end_process_group(self.proc)
            code = self.proc.returncode
        self.reader.join(timeout=10)
        end = self.ended if self.ended is not None and not timed_out else time.perf_counter()
        return {"exit_code": code, "timed_out": timed_out, "seconds": round(end - self.t0, 1), "tail": self.tail}


def _end_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's process group, SIGKILL 10 s later if it is still there."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def junit_counts(path: str | None) -> dict:
    if not path or not os.path.exists(path):
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {f"tests_{k}": sum(int(s.get(k, 0)) for s in suites) for k in ("run", "failures", "errors", "skipped")
              if k != "run"}
    counts["tests"] = sum(int(s.get("tests", 0)) for s in suites)
    counts["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None]
    return counts


# ----------------------------------------------------------------------------- environment

def environment(smoke: bool, cache: Path, cache_was_empty: bool, budgets: dict) -> dict:
    import importlib.util
    import platform

    import torch

    from benchmarks.common import _git_commit

    cuda = torch.cuda.is_available() and not smoke
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"kind": "gpu_check", "part": "run", "check": "environment", "passed": True,
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": "cuda" if cuda else "cpu", "git": _git_commit(), "cuda": torch.version.cuda,
            "triton": triton_version, "torchao": importlib.util.find_spec("torchao") is not None,
            "python": platform.python_version(), "cpu_smoke": smoke, "cache_dir": str(cache),
            "cache_was_empty": cache_was_empty, "budgets_s": budgets,
            "gpu_memory_gib": (torch.cuda.get_device_properties(0).total_memory / 2 ** 30) if cuda else None}


# ----------------------------------------------------------------------------- summary

def _fmt(v, spec=".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def describe(r: dict) -> str:
    """One table cell of numbers for a record."""
    if r.get("skipped"):
        return f"skipped: {r['skipped']}"
    if r.get("check", "").startswith("(process)"):
        bits = [f"exit {r.get('exit_code')}{', TIMED OUT' if r.get('timed_out') else ''} (budget {r.get('budget_s')} s)"]
        if "tests" in r:
            bits.append(f"{r['tests']} tests: {r['tests_failures']} failed, {r['tests_errors']} errors, "
                        f"{r['tests_skipped']} skipped {' '.join(r.get('failed_tests') or [])}")
        if r.get("error"):
            bits.append(r["error"])
        return "; ".join(bits).replace("|", "\\|")
    bits = []
    if "max_error" in r:
        bits.append(f"max rel err {_fmt(r['max_error'])} (tol {_fmt(r['tolerance'])}, worst: {r.get('worst')})")
    if "graph_breaks" in r:
        bits.append(f"{r['graph_breaks']} graph breaks, {r['recompiles']} recompiles, "
                    f"{r['graphs_compiled']} graphs")
    if r.get("idle_expert_max_grad") is not None and r.get("idle_experts"):
        bits.append(f"idle expert grad {r['idle_expert_max_grad']:g}")
    if r.get("part") == "reference":
        bits.append(f"{_fmt(r.get('tokens_per_s'), ',.0f')} tokens/s, MFU {_fmt(r.get('mfu'), '.1%')}, "
                    f"first step {_fmt(r.get('first_step_s'), '.1f')} s, peak {_fmt(r.get('peak_memory_gib'), '.2f')} "
                    f"GiB allocated / {_fmt(r.get('peak_memory_reserved_gib'), '.2f')} reserved, plan "
                    f"{_fmt(r.get('plan_total_gib'), '.2f')} GiB (plan / measured {_fmt(r.get('plan_over_measured'), '.2f')}), "
                    f"dry run {_fmt(r.get('dry_run_peak_gib'), '.2f')} GiB (dry run / measured "
                    f"{_fmt(r.get('dry_run_over_measured'), '.2f')}), dry-run FLOPs / formula "
                    f"{_fmt(r.get('dry_run_flops_over_formula'), '.3f')}")
    if r.get("check") == "dry run":
        bits.append(f"traced peak {_fmt(r.get('dry_run_peak_gib'), '.2f')} GiB on fake CUDA tensors (eager), plan "
                    f"{_fmt(r.get('dry_run_plan_gib'), '.2f')} GiB, FLOPs/step {_fmt(r.get('dry_run_flops_per_step'), '.4g')}"
                    f" (formula {_fmt(r.get('flops_formula_per_step'), '.4g')}), exit {r.get('dry_run_exit')}")
    if r.get("check") == "phases":
        cats = ", ".join(f"{k} {v:.2f}" for k, v in (r.get("phases_ms") or {}).items())
        bits.append(f"step {_fmt(r.get('step_ms'), '.2f')} ms: {cats}; profiled step idle "
                    f"{_fmt(r.get('idle_ms'), '.2f')} of {_fmt(r.get('span_ms'), '.2f')} ms")
    if r.get("check") == "host-sync audit":
        bits.append(f"{r.get('syncs')} synchronising calls at {len(r.get('sites') or [])} sites (listed below)")
    if r.get("part") == "block":
        for key in ("block_sliding", "block_full", "attention_core_sliding", "attention_core_full"):
            v = r.get(key) or {}
            bits.append(f"{key.replace('_', ' ')} {_fmt(v.get('ms'), '.3f')} ms = {_fmt(v.get('pct_of_peak'), '.1f')}% "
                        "of peak")
    if r.get("error"):
        bits.append(f"error: {r['error'][:200]}")
    return "; ".join(bits).replace("|", "\\|").replace("\n", " ")


def summary(records: list[dict], correctness_failed: bool, total_s: float) -> str:
    env = next((r for r in records if r.get("part") == "run"), {})
    lines = [f"# gpu_check {env.get('date', '')}", "",
             f"GPU: {env.get('gpu') or 'none (CPU)'} | torch {env.get('torch')} | CUDA {env.get('cuda')} | "
             f"triton {env.get('triton')} | torchao {'yes' if env.get('torchao') else 'no'} | git {env.get('git')} | "
             f"inductor cache {'cold' if env.get('cache_was_empty') else 'warm'} | {total_s:.0f} s in all", "",
             f"**Correctness: {'FAILED' if correctness_failed else 'passed'}**", "",
             "| part | check | passed | numbers | s |", "|---|---|---|---|---|"]
    for r in records:
        if r.get("part") == "run":
            continue
        ok = "skipped" if r.get("skipped") else ("yes" if r.get("passed") else "**NO**")
        lines.append(f"| {r.get('part')} | {r.get('check')} | {ok} | {describe(r)} | {_fmt(r.get('seconds'), '.1f')} |")
    for r in records:
        if r.get("check") == "host-sync audit" and r.get("sites"):
            lines += ["", "Host syncs in one training step (set_sync_debug_mode):", ""]
            lines += [f"- {s['count']} x `{s['site']}`" for s in r["sites"]]
        if r.get("check") == "phases" and r.get("gaps"):
            lines += ["", "Largest device idle gaps in the profiled step:", ""]
            lines += [f"- {g['us']:.0f} us after `{g['after']}`, before `{g['before']}`" for g in r["gaps"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def parse(argv: list[str] | None):
    """The arguments, validated before anything is written; --budget as {step name: seconds}."""
    p = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (what CI runs)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--total-budget", type=float, default=None, metavar="S",
                   help=f"cap on the whole run (default {GPU_TOTAL_S} GPU, {CPU_TOTAL_S} CPU smoke)")
    p.add_argument("--budget", action="append", default=[], metavar="STEP=S",
                   help="override a step's budget in seconds; STEP is a part (all its steps) or "
                        "part/step, e.g. --budget reference=200 --budget correctness/pytest=90")
    p.add_argument("--results-dir", default=os.environ.get("RESULTS_DIR") or str(REPO / "benchmarks" / "results"))
    a = p.parse_args(argv)
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    if not a.parts or any(x not in PARTS for x in a.parts):
        p.error(f"--parts takes a comma list of {', '.join(PARTS)}")
    names = {n for s in plan_steps(sys.executable, "", a.cpu_smoke, "") for n in (s.part, f"{s.part}/{s.name}")}
    a.budgets = {}
    for item in a.budget:
        name, _, seconds = item.rpartition("=")
        try:
            a.budgets[name] = int(float(seconds))
        except ValueError:
            name = None
        if name not in names:
            p.error(f"--budget {item!r}: expected STEP=SECONDS, STEP one of {', '.join(sorted(names))}")
    a.total_budget = a.total_budget or (CPU_TOTAL_S if a.cpu_smoke else GPU_TOTAL_S)
    return a


def waves(steps: list[Step]) -> list[list[Step]]:
    """Consecutive steps of the same wave, together."""
    out: list[list[Step]] = []
    for step in steps:
        if out and out[-1][0].wave == step.wave:
            out[-1].append(step)
        else:
            out.append([step])
    return out


def run_steps(steps: list[Step], a, env: dict, jsonl: str, run_env: dict, log: Log) -> None:
    """Wave by wave, each step in its own process within min(its budget, the run's time left at
    the wave's start); one record per step."""
    start = time.perf_counter()
    for wave in waves(steps):
        left = a.total_budget - (time.perf_counter() - start)
        running = []
        for step in wave:
            own = step.budget_cpu if a.cpu_smoke else step.budget_gpu
            budget = min(own, left)
            base = {"kind": "gpu_check", "part": step.part, "check": f"(process) {step.name}",
                    "gpu": run_env["gpu"], "torch": run_env["torch"],
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "budget_s": round(budget, 1), "command": " ".join(step.argv[1:])}
            if budget < min(10, own):
                append_jsonl(jsonl, {**base, "passed": False, "error": "not run: the run's total budget is spent"})
                log.say(f"{step.part} / {step.name}: NOT RUN (total budget spent)")
                continue
            log.say(f"{step.part} / {step.name} (budget {budget:.0f} s)")
            running.append((Running(step, budget, env, log), base))
        for run, base in running:
            step, res = run.step, run.finish()
            passed = res["exit_code"] == 0 and not res["timed_out"]
            counts = junit_counts(step.junit)
            if step.junit:  # exit 5: nothing collected (no test carries the gpu mark)
                passed = (res["exit_code"] in (0, 5) and not res["timed_out"]
                          and not counts.get("tests_failures") and not counts.get("tests_errors"))
            append_jsonl(jsonl, {**base, "passed": passed, **counts, **{k: v for k, v in res.items() if k != "tail"}})
            state = "ok" if passed else ("TIMED OUT" if res["timed_out"] else f"FAILED (exit {res['exit_code']})")
            log.say(f"{step.part} / {step.name}: {state} in {res['seconds']:.0f} s")
            if not passed:
                log.write("".join(f"    | {line}" for line in res["tail"]), echo=True)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    smoke = a.cpu_smoke
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible (--cpu-smoke runs the CPU version)", file=sys.stderr)
            return 2
    results = Path(a.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    prefix = results / f"gpu_check{'-cpu-smoke' if smoke else ''}-{stamp}"
    jsonl, md = f"{prefix}.jsonl", f"{prefix}.md"
    log = Log(Path(f"{prefix}.log"))
    cache = Path(os.environ.get("GPU_CHECK_CACHE") or Path(tempfile.gettempdir()) / "gptoss-gpu-check-cache")
    cache_was_empty = not cache.exists() or not any(cache.iterdir())
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
           "TRITON_CACHE_DIR": str(cache / "triton")}
    scratch = tempfile.mkdtemp(prefix="gpu-check-")
    steps = [s for s in plan_steps(sys.executable, jsonl, smoke, scratch) if s.part in a.parts]
    for s in steps:
        for name in (s.part, f"{s.part}/{s.name}"):  # the more specific one last: it wins
            if name in a.budgets:
                s.budget_gpu = s.budget_cpu = a.budgets[name]
    run_env = environment(smoke, cache, cache_was_empty,
                          {f"{s.part}/{s.name}": (s.budget_cpu if smoke else s.budget_gpu) for s in steps})
    append_jsonl(jsonl, run_env)
    log.say(f"{'CPU smoke' if smoke else 'GPU'} run: {len(steps)} steps, budget {a.total_budget:.0f} s; "
            f"results {prefix}.{{jsonl,md,log}}")
    start = time.perf_counter()
    try:
        run_steps(steps, a, env, jsonl, run_env, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    records = read_jsonl(jsonl)
    correctness_failed = any(r.get("part") == "correctness" and not r.get("passed") for r in records)
    text = summary(records, correctness_failed, time.perf_counter() - start)
    Path(md).write_text(text)
    log.write("\n" + text, echo=True)
    return 1 if correctness_failed else 0


if __name__ == "__main__":
    sys.exit(main())
