"""The CUDA dry run on a CPU (runtime/dry_run.py, `python -m runtime.plan --trace`): each
shipped GPU config's real training step at its intended world size on fake CUDA tensors (2
layers), its traced peak within the plan's tolerance (runtime/plan.py: within 15%, never
more than 5% over the plan), and two negative controls: a tensor made on the CPU inside the
model's forward fails the run with one line naming the module; an extra saved activation
(planted in the fused loss) moves the traced peak past the plan and fails the check."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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


# Several dry runs in one process (one import of torch): "config:world:clean|flops|planted
# [:--override ...]" each (flops: also counted, against the MFU formula). The planted memory regression: the fused loss keeps every chunk's fp32
# logits until its backward (an extra saved activation).
RUNS = """
import sys
from runtime import fake_cuda
fake_cuda.install()
import runtime.model.loss as loss
from runtime import plan
from runtime.train.config.loader import build_parser, parse_args

def plant_saved_logits():
    kept, chunk, backward = [], loss._chunk_loss_and_grad, loss._FusedLinearCrossEntropy.backward
    def keeping(logits, labels, dtype):
        kept.append(logits)
        return chunk(logits, labels, dtype)
    def releasing(ctx, grad_out):
        kept.clear()
        return backward(ctx, grad_out)
    loss._chunk_loss_and_grad = keeping
    loss._FusedLinearCrossEntropy.backward = staticmethod(releasing)
    def undo():
        loss._chunk_loss_and_grad = chunk
        loss._FusedLinearCrossEntropy.backward = staticmethod(backward)
    return undo

for spec in sys.argv[1:]:
    config, world, kind, *overrides = spec.split(":")
    cfg, _ = parse_args(["--config", config, "--model.n_layers=2", *overrides], build_parser("test"))
    memory = plan.plan_job(cfg, int(world), config_name=config)
    undo = plant_saved_logits() if kind == "planted" else None
    try:
        code = plan.run_trace(memory, cfg, count_flops=kind == "flops")
    finally:
        if undo is not None:
            undo()
    print(f"exit {spec} {code}", flush=True)
"""


def _run(args: list[str], code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "runtime.plan"]
    return subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _within_tolerance(ratio: float) -> bool:
    """The issue's bar for the plan: within 15% of the traced peak, and never under it by
    more than 5% (refusals rely on it)."""
    return 0.85 <= ratio <= 1.05


def _trace_line(lines: list[str]) -> tuple[float, float, float]:
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    peak, plan, ratio = map(float, match.groups())
    assert peak > 1.0 and plan > 1.0 and abs(ratio - peak / plan) < 0.01
    return peak, plan, ratio


def _cli_dry_run(config: str, world: int) -> None:
    proc = _run(["--config", config, "--world-size", str(world), "--model.n_layers=2", "--trace"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    _, _, ratio = _trace_line(lines)
    assert _within_tolerance(ratio), lines[-1]
    flops = next(line for line in lines if line.strip().startswith("flops:"))
    assert abs(float(flops.rsplit("ratio", 1)[1]) - 1.0) < 0.05, flops  # MFU formula
    assert any("not run:" in line and "inductor" in line for line in lines)


def test_dry_run_of_20b_sft_at_its_world_size():
    _cli_dry_run("configs/gptoss_20b_sft.toml", 8)


@pytest.mark.slow  # ~25 s on 2 idle cores: 128 ranks' meshes and a second, uncheckpointed step
def test_dry_run_of_120b_at_its_world_size():
    _cli_dry_run("configs/gptoss_120b.toml", 128)


def test_dry_runs_of_20b_one_gpu_lora_120b_sft_and_a_planted_memory_regression():
    """20b at 16 ranks (gradient accumulation: FSDP's unsharded fp32 gradients between
    micro-batches), the benchmarks' reference config on one GPU (no FSDP: fp32 weights under
    bf16 autocast, no activation checkpointing), 120b LoRA at 8 without EP (frozen base; 6 GiB
    FSDP blocks, three of them gathered in a block's forward; FLOPs of a frozen base), 120b SFT
    at 64, and the same
    120b SFT run with an extra saved activation: its peak moves up past the plan and the dry
    run exits 4 naming the excess."""
    specs = ["configs/gptoss_20b.toml:16:clean", "benchmarks/configs/20b_2layer_seq4096.toml:1:clean",
             "configs/gptoss_120b_lora.toml:8:flops:--parallelism.expert_parallel_degree=1",
             "configs/gptoss_120b_sft.toml:64:clean", "configs/gptoss_120b_sft.toml:64:planted"]
    proc = _run(specs, code=RUNS)
    out, err = proc.stdout.splitlines(), proc.stderr.splitlines()
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks, ends = {}, [i for i, line in enumerate(out) if line.startswith("exit ")]
    assert len(ends) == len(specs), proc.stdout[-3000:]
    for start, end, spec in zip([-1, *ends], ends, specs):
        clean = not spec.endswith("planted")
        assert out[end] == f"exit {spec} {0 if clean else 4}", \
            "\n".join(out[start + 1:end + 1]) + proc.stderr[-2000:]
        peak, _, ratio = _trace_line(out[start + 1:end])
        assert _within_tolerance(ratio) == clean, out[end - 1]
        peaks[spec] = peak
        flops = [line for line in out[start + 1:end] if line.strip().startswith("flops:")]
        assert len(flops) == (":flops" in spec)
        if flops:  # LoRA: a frozen base gets no weight gradients (4 FLOPs per weight, not 6)
            assert abs(float(flops[0].rsplit("ratio", 1)[1]) - 1.0) < 0.05, flops[0]
    clean, planted = peaks[specs[-2]], peaks[specs[-1]]
    assert planted > clean + 1.0, (clean, planted)  # four fp32 chunks of logits, > 1 GiB
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: dry run: the traced peak {planted:.2f} GiB exceeds "
                                "the plan"), errors[0]
    assert "Activation" in errors[0], errors[0]  # where the excess is


def test_planted_cpu_tensor_fails_naming_the_module():
    proc = _run(["--config", "configs/gptoss_20b_sft.toml", "--world-size", "8",
                 "--model.n_layers=2", "--trace"], code=PLANTED)
    assert proc.returncode == 3, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "attention_norm (RMSNorm)" in errors[0] or "ffn_norm (RMSNorm)" in errors[0] \
        or "model.norm" in errors[0] or "norm (RMSNorm)" in errors[0], errors[0]
    assert "cpu" in errors[0], errors[0]
