"""Helpers shared by the tests in tests/launch/: the local Slurm, job polling and sbatch, submit.py
and bash runners, the skip marks, and a stand-in trainer.

The stand-in ("fake") trainer lets the launcher mechanics (sbatch templates, rank env, signal ->
checkpoint -> exit 75 -> requeue -> resume) be tested independently of the real trainer: a
scratch checkout is made with the real `slurm/` scripts and `runtime/train/slurm_env.py` plus a
tiny `runtime.train` / `runtime.plan` that follow the same contract (metrics.jsonl, checkpoints/
step-N + latest, exit 75 on SIGUSR1, 143 on SIGTERM, exit 2 on a bad mesh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # submit.py is a top-level script, not in the installed package
    sys.path.insert(0, str(REPO))
LOCAL_SLURM = REPO.parent / "shared" / "tools" / "local_slurm.sh"


# The container test runs by default; GPTOSS_TEST_CONTAINER=0 opts out (no podman/debootstrap
# wanted on this machine), and the skip says so.
CONTAINER_TEST = os.environ.get("GPTOSS_TEST_CONTAINER", "1") != "0"
TRAINER_PRESENT = (REPO / "runtime" / "train" / "trainer.py").exists()
PLAN_PRESENT = (REPO / "runtime" / "plan.py").exists()
needs_trainer = pytest.mark.skipif(
    not TRAINER_PRESENT, reason="runtime/train/trainer.py not written yet"
)
needs_plan = pytest.mark.skipif(not PLAN_PRESENT, reason="runtime/plan.py not written yet")

# A tiny, fast training run for the end-to-end tests (~0.1 s/step/rank on CPU).
TINY = [
    "--model.flavor=tiny",
    "--training.seq_len=64",
    "--training.local_batch_size=2",
    "--metrics.log_freq=1",
    "--lr_scheduler.warmup_steps=2",
]

FAKE_TRAIN = r'''
"""Stand-in for runtime.train (launcher tests only): same CLI, outputs, signals, exit codes."""
import json, os, signal, sys, time
from pathlib import Path
from runtime.train.slurm_env import EXIT_REQUEUE, setup_distributed_env

def main(argv):
    cfg = {"config": None, "job.dump_folder": "outputs", "training.steps": "10",
           "fake.step_s": "0.2",
           "checkpoint.interval": "5"}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            key, eq, val = tok[2:].partition("=")
            if not eq:
                val = argv[i + 1]; i += 1
            cfg[key] = val
        i += 1
    dist = setup_distributed_env()
    import torch.distributed as td
    if dist.world_size > 1:
        td.init_process_group("gloo")
    rank, world = (td.get_rank(), td.get_world_size()) if td.is_initialized() else (0, 1)
    print(f"fake trainer: {dist.describe()} host {os.uname().nodename}", flush=True)
    dump = Path(cfg["job.dump_folder"]); ckdir = dump / "checkpoints"
    stop = {"sig": None}
    def on_signal(signum, frame):
        stop["sig"] = signum
    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    start = 0
    if (ckdir / "latest").exists():
        start = int((ckdir / "latest").read_text().strip().split("-")[1])
        print(f"fake trainer: resuming from step {start}", flush=True)
    steps = int(cfg["training.steps"])

    def save(step):
        if td.is_initialized():
            td.barrier()
        if rank == 0:
            d = ckdir / f"step-{step}"; d.mkdir(parents=True, exist_ok=True)
            (d / "state.json").write_text(json.dumps({"step": step}))
            (ckdir / "latest.tmp").write_text(f"step-{step}")
            os.replace(ckdir / "latest.tmp", ckdir / "latest")
            print(f"fake trainer: saved checkpoint step-{step}", flush=True)
        if td.is_initialized():
            td.barrier()

    import torch
    for step in range(start + 1, steps + 1):
        time.sleep(float(cfg["fake.step_s"]))
        if str(rank) == cfg.get("fake.crash_rank") and step == int(cfg.get("fake.crash_step", 2)):
            print(f"fake trainer: rank {rank} crashes at step {step}", flush=True)
            os._exit(3)
        t = torch.tensor([1.0])
        if td.is_initialized():
            td.all_reduce(t)
        if rank == 0:
            dump.mkdir(parents=True, exist_ok=True)
            with open(dump / "metrics.jsonl", "a") as f:
                row = {"step": step, "loss": 10.0 / step, "world": int(t.item())}
                f.write(json.dumps(row) + "\n")
        flag = torch.tensor([1.0 if stop["sig"] else 0.0])
        if td.is_initialized():
            td.all_reduce(flag)
        if flag.item() > 0:  # the real trainer's contract: USR1 -> 75, TERM -> 143 (faults.py)
            save(step)
            code = EXIT_REQUEUE if stop["sig"] == signal.SIGUSR1 else 128 + int(stop["sig"] or 15)
            print(f"fake trainer: stopping after step {step} on a signal, exit {code}", flush=True)
            if td.is_initialized():
                td.barrier()
                td.destroy_process_group()
            return code
        if step % int(cfg["checkpoint.interval"]) == 0 or step == steps:
            save(step)
    if td.is_initialized():
        td.destroy_process_group()
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''

FAKE_PLAN = r'''
"""Stand-in for runtime.plan: --print-config refuses --fake.bad* keys (exit 2); the mesh needs
exactly --fake.world ranks if given (exit 2); a rank needs --fake.gib GiB (exit 1 when that
exceeds --gpu-memory-gib), like the real plan's exit codes."""
import sys
args = sys.argv[1:]
world = int(args[args.index("--world-size") + 1])
opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--fake.") and "=" in a)
bad = [k for k in opts if k.startswith("fake.bad")]
if bad:
    print(f"error: command line: unknown key '--{bad[0]}'", file=sys.stderr)
    sys.exit(2)
if "--print-config" in args:
    print("[fake]")
    sys.exit(0)
if "fake.world" in opts and int(opts["fake.world"]) != world:
    print(f"error: parallelism: the mesh needs {opts['fake.world']} ranks but the job has {world}",
          file=sys.stderr)
    sys.exit(2)
if "--check-only" in args:
    print(f"ok: mesh ok for {world} ranks")
    sys.exit(0)
gpu = float(args[args.index("--gpu-memory-gib") + 1]) if "--gpu-memory-gib" in args else 80.0
need = float(opts.get("fake.gib", "1"))
print(f"  total         {need:.1f} GiB   of {gpu:g} GiB per GPU")
if need > gpu:
    print(f"error: does not fit: {need:.1f} GiB per rank > {gpu:g} GiB per GPU", file=sys.stderr)
    sys.exit(1)
'''


def make_fake_checkout(root: Path) -> Path:
    """A scratch checkout: the real slurm/, submit.py and slurm_env.py; a fake trainer and plan."""
    shutil.copytree(REPO / "slurm", root / "slurm")
    (root / "runtime" / "train").mkdir(parents=True)
    (root / "runtime" / "__init__.py").write_text("")
    (root / "runtime" / "train" / "__init__.py").write_text("")
    shutil.copy(
        REPO / "runtime" / "train" / "slurm_env.py", root / "runtime" / "train" / "slurm_env.py"
    )
    shutil.copy(REPO / "runtime" / "errors.py", root / "runtime" / "errors.py")  # slurm_env's codes
    (root / "runtime" / "train" / "trainer.py").write_text(FAKE_TRAIN)
    (root / "runtime" / "train" / "__main__.py").write_text(
        "import sys\nfrom runtime.train.trainer import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    shutil.copy(REPO / "submit.py", root / "submit.py")
    (root / "runtime" / "plan.py").write_text(FAKE_PLAN)
    (root / "configs").mkdir()
    (root / "configs" / "fake.toml").write_text("[job]\ndump_folder = 'outputs/fake'\n")
    (root / "logs").mkdir()
    return root


# --------------------------------------------------------------------------- slurm helpers
def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, **kw)


def job_field(job_id: str, field: str) -> str | None:
    out = run(["scontrol", "show", "job", str(job_id)]).stdout
    for tok in out.split():
        if tok.startswith(field + "="):
            return tok.split("=", 1)[1]
    return None


def job_state(job_id: str) -> str | None:
    """JobState from slurmctld (kept MinJobAge=300 s after the end), else sacct."""
    state = job_field(job_id, "JobState")
    if state:
        return state
    out = run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State"]).stdout.strip()
    return out.split()[0] if out else None


TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def wait_job(job_id: str, timeout: float, release_requeued: bool = True) -> str:
    """Wait until the job reaches a terminal state. A requeued job waits ~120 s before it may
    start again: `scontrol update StartTime=now` skips that (when release_requeued)."""
    deadline = time.monotonic() + timeout
    released_for = set()
    while time.monotonic() < deadline:
        state = job_state(job_id) or "UNKNOWN"
        if state in TERMINAL:
            return state
        if release_requeued and state == "PENDING":
            restarts = job_field(job_id, "Restarts") or "0"
            if restarts != "0" and restarts not in released_for:
                time.sleep(2)
                run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
                released_for.add(restarts)
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {job_state(job_id)} after {timeout:.0f} s")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
    return rows


def python_env(**extra: str) -> dict[str, str]:
    """Environment for jobs: this interpreter as PYTHON, the checkout importable."""
    env = dict(os.environ)
    # The templates honour a MASTER_ADDR/PORT set by the user; one left over in the test
    # process (from another test) must not pin every job to one port.
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"<{path}: {e}>"


def dump_job_logs(log_root: Path, n: int = 40) -> str:
    parts = []
    for p in sorted(log_root.rglob("*")):
        if p.is_file() and p.suffix in {".out", ".log", ".err"}:
            parts.append(f"==== {p}\n{tail(p, n)}")
    return "\n".join(parts)


# --------------------------------------------------------------------------- runners, job checks
def find_tool(name: str) -> str | None:
    """A console script next to this interpreter (a venv's bin/, not always on PATH) or on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def run_submit(
    *args: str, cwd: Path = REPO, timeout: float = 120, env=None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(cwd / "submit.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or python_env(),
    )


def sbatch(script: Path, *args: str, cwd: Path, env: dict, sbatch_opts=()) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", *sbatch_opts, str(script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def exit_code(job_id: str) -> str | None:
    return job_field(job_id, "ExitCode")


def interrupt_when(
    metrics: Path, n: int, job_id: str, send, timeout: float = 120, logs: Path | None = None
):
    """Once `n` steps are logged, `send()` the interrupt; returns the steps seen by then."""
    wait_for(
        lambda: len(read_metrics(metrics)) >= n or job_state(job_id) in TERMINAL,
        timeout,
        f"{n} logged steps of job {job_id}",
    )
    state = job_state(job_id)
    assert state not in TERMINAL, (
        f"job {job_id} ended ({state}) before it could be interrupted\n"
        + (dump_job_logs(logs) if logs else "")
    )
    send()
    return len(read_metrics(metrics))


def assert_resumed(steps: list[int], total: int, log: str):
    """Every step logged once, the run finished, and the second attempt did not start at 0."""
    assert steps, log
    assert steps[-1] == total, log
    if steps[0] == 1:  # metrics appended across attempts: a restart from 0 would repeat step 1
        assert steps == sorted(set(steps)), f"steps repeat (restarted from 0?): {steps}\n{log}"
    else:  # the file was rewritten by the resumed attempt: it starts after the saved step
        assert steps[0] > 1, log


def run_bash(script: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def fake_job(tmp_path: Path, name: str = "checkout"):
    root = make_fake_checkout(tmp_path / name)
    return root, python_env(CONFIG="configs/fake.toml", OMP_NUM_THREADS="1")


def batch_log(root: Path, jid: str, n: int = 60) -> str:
    return tail(root / "logs" / f"gptoss-debug-{jid}.out", n) + "\n" + dump_job_logs(
        root / "logs" / f"gptoss-debug-{jid}"
    )
