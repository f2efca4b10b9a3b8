"""The single-device training job: resume equality, crash-safe saves, gradient accumulation,
LR schedules, signals, non-finite losses, config errors (tiny model, CPU)."""

import json
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import losses, stop_after

from runtime.train.checkpoint import manager as checkpoint_module
from runtime.train.checkpoint.manager import find_latest_checkpoint
from runtime.train.config.loader import load_config
from runtime.train.faults import NonFiniteLossError
from runtime.train.optim import lr_factor
from runtime.train.slurm_env import EXIT_REQUEUE
from runtime.train.trainer import Trainer, main

BASE = ["--model.flavor=tiny", "--training.seq_len=32", "--training.local_batch_size=4",
        "--training.steps=4", "--lr_scheduler.warmup_steps=1", "--metrics.log_freq=1",
        "--checkpoint.interval=2", "--optimizer.lr=3e-3"]


def make_trainer(tmp_path: Path, *extra: str) -> Trainer:
    torch.manual_seed(0)
    return Trainer(load_config(None, BASE + [f"--job.dump_folder={tmp_path}", *extra]))


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_resume_after_signal_gives_identical_next_losses(tmp_path, async_mode):
    mode = f"--checkpoint.async_mode={async_mode}"
    full = make_trainer(tmp_path / "full", "--checkpoint.enable=true", mode)
    assert full.run() == 0
    expected = losses(tmp_path / "full")

    first = make_trainer(tmp_path / "split", "--checkpoint.enable=true", mode)
    stop_after(first, 3)  # not a checkpoint interval: the stop itself must save
    assert first.run() == EXIT_REQUEUE
    assert find_latest_checkpoint(tmp_path / "split" / "checkpoints").name == "step-3"

    resumed = make_trainer(tmp_path / "split", "--checkpoint.enable=true", mode)
    assert resumed.step == 3
    assert resumed.run() == 0
    got = losses(tmp_path / "split")
    assert sorted(got) == [1, 2, 3, 4]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "--checkpoint.enable=true", "--training.steps=2")
    assert trainer.run() == 0
    folder = tmp_path / "checkpoints"
    assert (folder / "latest").read_text().strip() == "step-2"

    real_save = checkpoint_module.dcp.save

    def crash_midway(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # shards written...
        (Path(checkpoint_id) / ".metadata").unlink()  # ...but the job dies before the end
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint_module.dcp, "save", crash_midway)
    trainer = make_trainer(tmp_path, "--checkpoint.enable=true", "--training.steps=4")
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert (folder / "latest").read_text().strip() == "step-2"
    assert not (folder / "step-4").exists()
    monkeypatch.setattr(checkpoint_module.dcp, "save", real_save)

    again = make_trainer(tmp_path, "--checkpoint.enable=true", "--training.steps=4")
    assert again.step == 2  # the previous checkpoint loads
    assert not list(folder.glob(".step-*.tmp"))  # the half-written one was cleaned up
    assert again.run() == 0


def test_keep_latest_k_prunes_old_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path, "--checkpoint.enable=true", "--checkpoint.interval=1",
                           "--checkpoint.keep_latest_k=2")
    assert trainer.run() == 0
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert names == ["step-3", "step-4"]


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_gradient_accumulation_4x1_equals_1x4(tmp_path):
    one_batch = make_trainer(tmp_path / "a", "--training.steps=2")
    accumulated = make_trainer(tmp_path / "b", "--training.steps=2", "--training.local_batch_size=1",
                               "--training.global_batch_size=4")
    assert accumulated.grad_accum == 4
    accumulated.model.load_state_dict(one_batch.model.state_dict())
    # Gradients of one optimizer step, compared before Adam (whose g/sqrt(v) would blow
    # rounding noise in near-zero gradients up to lr-sized differences).
    batch = next(iter(make_trainer(tmp_path / "c").dataloader))  # leave a's and b's loaders untouched
    loss_a, norm_a = one_batch.train_step(batch)
    loss_b, norm_b = accumulated.train_step(batch)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert norm_b == pytest.approx(norm_a, rel=1e-5)
    grads_b = dict(accumulated.model.named_parameters())
    for name, p in one_batch.model.named_parameters():
        torch.testing.assert_close(grads_b[name].grad, p.grad, atol=1e-7, rtol=1e-5, msg=name)
    # And whole runs: the same losses step for step.
    for trainer in (one_batch, accumulated):
        trainer.optimizer.zero_grad(set_to_none=True)
    assert one_batch.run() == 0 and accumulated.run() == 0
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in (1, 2):
        assert lb[step] == pytest.approx(la[step], rel=1e-5)


def test_loss_falls_on_embedded_data(tmp_path):
    trainer = make_trainer(tmp_path, "--training.steps=25", "--optimizer.lr=1e-2",
                           "--lr_scheduler.warmup_steps=3")
    assert trainer.run() == 0
    got = losses(tmp_path)
    assert got[1] > 8.5  # ~ln(8192) at initialisation
    late = sum(got[s] for s in range(16, 26)) / 10  # single steps are noisy (packed documents)
    assert late < got[1] - 1.2  # observed ~7.2-7.3 on torch 2.11 and 2.13


def test_metrics_jsonl_has_the_documented_keys(tmp_path):
    trainer = make_trainer(tmp_path, "--training.steps=1")
    assert trainer.run() == 0
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu", "memory_gib"):
        assert key in row
    assert row["tokens_per_s"] > 0 and row["memory_gib"] > 0


def test_nonfinite_loss_errors_with_step_or_skips(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path / "err", "--training.steps=2")
    real = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        trainer.run()

    skipper = make_trainer(tmp_path / "skip", "--training.steps=2", "--training.on_nonfinite=skip")
    before = _params(skipper)
    real = skipper.model.forward
    monkeypatch.setattr(skipper.model, "forward", lambda *a, **k: real(*a, **k) * float("nan"))
    assert skipper.run() == 0
    after = _params(skipper)
    for name in before:
        if not name.endswith("expert_bias"):
            assert torch.equal(before[name], after[name]), name


def test_config_errors_exit_2_before_building(tmp_path, capsys):
    assert main(["--config", "configs/debugmodel.toml", "--training.stepz=3"]) == 2
    assert "training.stepz" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert main(["--config", "configs/debugmodel.toml", "--print-config"]) == 0
    assert "[training]" in capsys.readouterr().out


def test_lr_schedules_shape():
    kw = dict(total_steps=100, warmup_steps=10, decay_ratio=0.2, min_lr_factor=0.1)
    warm = [lr_factor(s, decay_type="cosine", **kw) for s in range(1, 11)]
    assert warm == sorted(warm) and warm[-1] < 1.0 and warm[0] > 0
    for decay in ("linear", "cosine", "wsd"):
        values = [lr_factor(s, decay_type=decay, **kw) for s in range(11, 101)]
        assert all(a >= b for a, b in zip(values, values[1:])), decay  # never increases
        assert values[-1] == pytest.approx(0.1)
    assert lr_factor(50, decay_type="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + __import__("math").cos(__import__("math").pi * 40 / 90)))
    assert lr_factor(80, decay_type="wsd", **kw) == 1.0  # stable phase until the last 20%
    assert lr_factor(90, decay_type="wsd", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(60, decay_type="constant", **kw) == 1.0
    assert lr_factor(55, decay_type="linear", **kw) == pytest.approx(0.1 + 0.9 * (1 - 45 / 90))
