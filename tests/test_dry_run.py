"""The CUDA dry run on a CPU (runtime/dry_run.py, `python -m runtime.plan --trace`): a shipped
GPU config's real training step at its intended world size on fake CUDA tensors, and a
negative control (a tensor made on the CPU inside the model's forward must fail the run with
one line naming the module)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"^trace: peak (\d+\.\d+) GiB, plan (\d+\.\d+) GiB, ratio (\d+\.\d+)$")

# The planted device mismatch: RMSNorm multiplies by a CPU tensor. fake_cuda must be set up
# before torch is imported (runtime/fake_cuda.py).
PLANTED = """
import sys
from runtime import fake_cuda
fake_cuda.install()
import torch
from runtime.model.model import RMSNorm
forward = RMSNorm.forward
RMSNorm.forward = lambda self, x: forward(self, x) * torch.ones(x.shape[-1], dtype=x.dtype)
from runtime import plan
sys.exit(plan.main(sys.argv[1:]))
"""


def _run(args: list[str], code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "runtime.plan"]
    return subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_dry_run_of_20b_sft_at_its_world_size():
    proc = _run(["--config", "configs/gptoss_20b_sft.toml", "--world-size", "8",
                 "--model.n_layers=2", "--trace"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    peak, plan, ratio = map(float, match.groups())
    assert peak > 1.0 and plan > 1.0 and abs(ratio - peak / plan) < 0.01
    flops = next(line for line in lines if line.strip().startswith("flops:"))
    assert abs(float(flops.rsplit("ratio", 1)[1]) - 1.0) < 0.05, flops  # MFU formula
    assert any("not run:" in line and "inductor" in line for line in lines)


def test_planted_cpu_tensor_fails_naming_the_module():
    proc = _run(["--config", "configs/gptoss_20b_sft.toml", "--world-size", "8",
                 "--model.n_layers=2", "--trace"], code=PLANTED)
    assert proc.returncode == 3, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "attention_norm (RMSNorm)" in errors[0] or "ffn_norm (RMSNorm)" in errors[0] \
        or "model.norm" in errors[0] or "norm (RMSNorm)" in errors[0], errors[0]
    assert "cpu" in errors[0], errors[0]
