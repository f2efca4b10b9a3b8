"""Shared pieces of the tests/test_checkpoint_*.py suites: a tiny trainer (in process or as a
`python -m runtime.train` subprocess) and ways to damage or poison a saved checkpoint."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from runtime.model import GptOssModel
from runtime.model.args import FLAVORS
from runtime.train.checkpoint import manifest
from runtime.train.config.loader import load_config
from runtime.safe_dcp import read_metadata_file
from runtime.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
BASE = ["--model.flavor=tiny", "--training.seq_len=32", "--training.local_batch_size=4",
        "--training.steps=4", "--lr_scheduler.warmup_steps=1", "--metrics.log_freq=1",
        "--checkpoint.interval=2", "--optimizer.lr=3e-3", "--checkpoint.enable=true"]


def seeded_model(flavor: str, seed: int) -> GptOssModel:
    """A seeded fp32 model (math attention) with non-trivial biases and sinks, so every tensor
    counts in an export / load comparison."""
    torch.manual_seed(seed)
    model = GptOssModel(FLAVORS[flavor].replace(compute_dtype="float32", attn_backend="math"))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def make_trainer(folder: Path, *extra: str) -> Trainer:
    torch.manual_seed(0)
    return Trainer(load_config(None, BASE + [f"--job.dump_folder={folder}", *extra]))


def job_command(folder: Path, *extra: str, script: str | None = None) -> tuple[list[str], dict]:
    """`python -m runtime.train` on BASE + extra; `script`: `python -c script` instead (a
    program that patches something, then calls runtime.train.trainer.main)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    program = ["-m", "runtime.train"] if script is None else ["-c", script]
    cmd = [sys.executable, *program, *BASE, f"--job.dump_folder={folder}", *extra]
    return cmd, env


def run_job(folder: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real entry point in a fresh process (what Slurm runs)."""
    cmd, env = job_command(folder, *extra)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def start_job_ranks(folder: Path, *extra: str, world: int = 2,
                    script: str | None = None) -> list[subprocess.Popen]:
    """The real entry point (or `script`, see job_command) started as `world` local ranks, as
    torchrun starts them; stdout and stderr are pipes."""
    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        cmd, env = job_command(folder, *extra, script=script)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def run_job_ranks(folder: Path, *extra: str, world: int = 2,
                  timeout: int = 300) -> list[tuple[int, str, str]]:
    """The real entry point as `world` local ranks (what torchrun starts): (returncode, stdout,
    stderr) per rank. A rank still running at the timeout is killed and the test fails there."""
    procs = start_job_ranks(folder, *extra, world=world)
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def metrics_steps(folder: Path) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


class Payload:
    """Unpickling this creates `marker` (what a planted pickle would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def losses(folder: Path) -> dict[int, float]:
    """Step -> loss from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def stop_after(trainer: Trainer, step: int) -> None:
    """Deliver SIGUSR1 to ourselves right after `step` is logged (as Slurm would)."""
    original = trainer.metrics.log

    def log(s, *args, **kwargs):
        record = original(s, *args, **kwargs)
        if s == step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return record

    trainer.metrics.log = log


def rewrite_manifest(ckpt: Path) -> None:
    """What an attacker with write access would also do: make the manifest match again."""
    files = manifest.describe_files(ckpt, manifest.data_files(ckpt))
    manifest.write_manifest(ckpt, files, step=0)


def plant_metadata(ckpt: Path, marker: Path) -> None:
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(Payload(marker), f)
    rewrite_manifest(ckpt)


def plant_item(ckpt: Path, marker: Path) -> str:
    """Replace one non-tensor item inside a .distcp file by a payload pickle (offsets and the
    manifest updated); returns the item's name."""
    md = read_metadata_file(ckpt / ".metadata")
    index, info = next((i, s) for i, s in md.storage_data.items()
                       if isinstance(md.state_dict_metadata[i.fqn], BytesStorageMetadata))
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    evil = buf.getvalue()
    path = ckpt / info.relative_path
    data = path.read_bytes()
    path.write_bytes(data[:info.offset] + evil + data[info.offset + info.length:])
    delta = len(evil) - info.length
    for other in md.storage_data.values():
        if other.relative_path == info.relative_path and other.offset > info.offset:
            other.offset += delta
    info.length = len(evil)
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    rewrite_manifest(ckpt)
    return index.fqn


def finished_run(tmp_path_factory, *extra: str) -> Path:
    """A finished run of `make_trainer` in a fresh folder (BASE: 4 steps, checkpoints step-2
    and step-4). Tests copy it (`copy_run`) before damaging or resuming it."""
    folder = tmp_path_factory.mktemp("saved")
    assert make_trainer(folder, *extra).run() == 0
    return folder


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run folder (or one checkpoint) without its dump-folder lock."""
    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


# `python -c PARKED_JOB <runtime.train arguments>`: the real entry point, with two test-only
# pauses (environment): WAIT_PUBLISHED=N makes step N+1 (the first step after an async save of
# step N began, so no step boundary has passed) wait until step-N is published, and exits 3
# if that does not happen in the background; PARK_AT_SAVE=M parks the job (forever) when it
# is about to save step M, after logging it, for the test to kill it there;
# FILL_AT_SAVE=M:PATH:BYTES fills the disk of PATH (a new file there) up to BYTES free when
# the save of step M starts writing (after its free-space check): another job filling the disk.
PARKED_JOB = r"""
import os, shutil, sys, time
import torch.distributed.checkpoint as dcp
from runtime.train.checkpoint.manager import CheckpointManager
from runtime.train.trainer import Trainer, main

published = int(os.environ.get("WAIT_PUBLISHED", "-1"))
park = int(os.environ.get("PARK_AT_SAVE", "-1"))
run_step, run_save = Trainer.optimizer_step, CheckpointManager.save

def optimizer_step(self, batch):
    if self.step == published + 1:
        final = self.checkpointer.folder / f"step-{published}" / "manifest.json"
        latest = self.checkpointer.folder / "latest"
        deadline = time.monotonic() + 120
        while not (final.is_file() and latest.is_file()
                   and latest.read_text().strip() == f"step-{published}"):
            if time.monotonic() > deadline:
                print(f"step-{published} was not published in the background", flush=True)
                os._exit(3)
            time.sleep(0.01)
        print(f"step-{published} published while step {self.step} ran", flush=True)
    return run_step(self, batch)

def save(self, step, **kwargs):
    if step == park:
        print(f"parked before saving step {step}", flush=True)
        time.sleep(600)
    return run_save(self, step, **kwargs)

def filling(write):
    fill_step, path, leave = (os.environ.get("FILL_AT_SAVE") or "-1::0").split(":")
    def wrapped(state, checkpoint_id, **kwargs):
        if checkpoint_id.endswith(f".step-{fill_step}.tmp"):
            free = shutil.disk_usage(os.path.dirname(path)).free
            with open(path, "wb") as f:
                f.write(bytes(max(0, free - int(leave))))
        return write(state, checkpoint_id=checkpoint_id, **kwargs)
    return wrapped

Trainer.optimizer_step, CheckpointManager.save = optimizer_step, save
dcp.save, dcp.async_save = filling(dcp.save), filling(dcp.async_save)
sys.exit(main(sys.argv[1:]))
"""


def parked_job(folder: Path, *extra: str, wait_published: int = -1, park_at_save: int = -1,
               fill_at_save: str = "") -> subprocess.Popen:
    """The job of `run_job` with PARKED_JOB's pauses, stdout and stderr merged into a pipe."""
    cmd, env = job_command(folder, *extra)
    env.update(WAIT_PUBLISHED=str(wait_published), PARK_AT_SAVE=str(park_at_save),
               FILL_AT_SAVE=fill_at_save)
    assert cmd[1:3] == ["-m", "runtime.train"]
    return subprocess.Popen([sys.executable, "-c", PARKED_JOB, *cmd[3:]], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(proc: subprocess.Popen, marker: str, timeout: float = 240) -> list[str]:
    """proc's output lines up to the first containing `marker` (or its end); kills it if that
    takes longer than `timeout` seconds."""
    import threading

    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if marker in line:
                break
    finally:
        watchdog.cancel()
    return lines
