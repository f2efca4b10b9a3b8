"""Chat data that never fails silently, through the real entry points: all conversations
dropped is one line and exit 2 (never an endless loop, in training and in --show); a stop
signal is honoured while the trainer waits for data; a step with no trained token skips the
optimizer (no decay, no schedule advance) and counts against training.max_skipped_steps."""

from __future__ import annotations

import json
import shutil
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from checkpoint_helpers import BASE, ROOT, error_lines, job_command, make_trainer
from runtime.data.loader import ParallelAwareDataLoader
from runtime.model.loss import IGNORE_INDEX
from runtime.train.faults import NonFiniteLossError


def _chats(path: Path, n: int, words: int) -> Path:
    """n short conversations whose answers have about `words` words."""
    lines = [json.dumps({"messages": [
        {"role": "user", "content": f"Repeat {i}."},
        {"role": "assistant", "content": " ".join(["word"] * words) + f" {i}"}]})
        for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


CHAT = ["--data.dataset=chat", "--data.chat_date=2026-01-15"]


def test_all_dropped_exits_2_with_one_line(tmp_path, capsys):
    from runtime.data.__main__ import main as data_main

    data = _chats(tmp_path / "long.jsonl", 5, 200)  # every one longer than seq_len 32
    cmd, env = job_command(tmp_path / "job", *CHAT, f"--data.dataset_path={data}",
                           "--data.chat_overflow=drop")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = error_lines(proc)
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "every conversation of" in err[0] and "5 longer than training.seq_len = 32" in err[0]
    assert "the longest has" in err[0]
    assert data_main([*cmd[3:], "--show", "1"]) == 2  # --show looped forever too
    assert capsys.readouterr().err.count("every conversation of") == 1


BLOCKING = """
import sys, time
from runtime.data.chat import pack
real, calls = pack.WholeDocumentStream._window, [0]
def window(self, *args):  # the source stalls after {limit} windows (a stuck download, a slow disk)
    calls[0] += 1
    while calls[0] > {limit}:
        time.sleep(0.5)
    return real(self, *args)
pack.WholeDocumentStream._window = window
from runtime.data.loader import ParallelAwareDataLoader
real_next, batches = ParallelAwareDataLoader.__next__, [0]
def next_batch(self):  # says when the trainer starts waiting for the batch that never comes
    batches[0] += 1
    if batches[0] == 3:
        print("WAITING", flush=True)
    return real_next(self)
ParallelAwareDataLoader.__next__ = next_batch
from runtime.train.trainer import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("prefetch", [0, 2])
def test_stop_signal_while_waiting_for_data(tmp_path, prefetch):
    data = _chats(tmp_path / "chats.jsonl", 40, 3)
    folder = tmp_path / "job"
    cmd, env = job_command(folder, *CHAT, f"--data.dataset_path={data}",
                           "--training.seq_len=128", "--training.local_batch_size=2",
                           "--training.steps=50", f"--data.prefetch={prefetch}",
                           "--training.stop_data_wait_s=1",
                           script=BLOCKING.format(limit=4))  # 2 steps, then stalls
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(150, proc.kill)
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("WAITING"):
                break
        assert lines and lines[-1].startswith("WAITING"), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    out = "".join(lines) + out
    assert proc.returncode == 143, out + err
    assert ("SIGTERM while waiting for the data of step 3: no batch within "
            "training.stop_data_wait_s = 1 s, stopped without saving") in out
    assert "Traceback" not in err and not (folder / ".lock").exists()


def _untrained_steps(monkeypatch, steps: set[int]) -> None:
    """Batches of these (1-based) loader calls carry no trained label."""
    real, calls = ParallelAwareDataLoader.__next__, [0]

    def masked(self):
        batch = real(self)
        calls[0] += 1
        if calls[0] in steps:
            batch = {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
        return batch

    monkeypatch.setattr(ParallelAwareDataLoader, "__next__", masked)


def test_untrained_step_skips_the_optimizer(tmp_path, monkeypatch, capsys):
    _untrained_steps(monkeypatch, {2, 3})
    trainer = make_trainer(tmp_path, "--checkpoint.enable=false", "--training.steps=4",
                           "--optimizer.weight_decay=0.5")
    seen = []
    trainer.optimizer.register_step_post_hook(lambda *_: seen.append(trainer.step))
    assert trainer.run() == 0
    assert seen == [1, 4]  # steps 2 and 3: no optimizer step, so no weight decay either
    # the schedule is a function of the step: it advanced through the skipped steps too
    assert trainer.lr_scheduler.last_epoch == 4 and trainer.skipped_steps == 2
    out = capsys.readouterr().out
    assert "step 2: no trained token in the global batch, step skipped (1 of at most 3)" in out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["trained_tokens"] for r in rows][1:3] == [0, 0] and rows[1]["loss"] is None
    lrs = [r["lr"] for r in rows]
    schedule = trainer.lr_scheduler
    assert lrs == pytest.approx([schedule.base_lrs[0] * schedule.lr_lambdas[0](s)
                                 for s in range(4)], rel=1e-12)  # as if nothing were skipped
    assert len(set(lrs)) == 4  # (a schedule that changes every step: the check can fail)


def test_untrained_steps_are_capped(tmp_path, monkeypatch):
    _untrained_steps(monkeypatch, {1, 2, 3})
    trainer = make_trainer(tmp_path, "--checkpoint.enable=false", "--training.steps=4",
                           "--training.max_skipped_steps=2")
    with pytest.raises(NonFiniteLossError, match="no trained token in the global batch at step "
                                                 "3: 3 steps skipped, more than training.max_"):
        trainer.run()


def test_a_resume_with_this_configs_schedule_lands_on_the_saved_one(tmp_path, monkeypatch):
    # Skipped steps advance the schedule, so excluding lr_scheduler from a resume (this
    # config's schedule at the resumed step) gives what resuming the saved scheduler gives.
    _untrained_steps(monkeypatch, {2, 3})
    steps = "--training.steps=6"  # the same schedule in all three
    assert make_trainer(tmp_path, steps, "--checkpoint.interval=3").run() == 0
    ckpt = tmp_path / "checkpoints"
    shutil.rmtree(ckpt / "step-6")  # resume from step-3: saved after the skipped steps 2 and 3
    (ckpt / "latest").write_text("step-3\n")
    loaded = make_trainer(tmp_path, steps)
    restarted = make_trainer(tmp_path, steps, "--checkpoint.exclude_from_loading=['lr_scheduler']")
    assert loaded.step == restarted.step == 3
    assert loaded.lr_scheduler.last_epoch == restarted.lr_scheduler.last_epoch == 3
    assert loaded.lr_scheduler.get_last_lr() == pytest.approx(restarted.lr_scheduler.get_last_lr(),
                                                              rel=1e-12)
    for trainer in (loaded, restarted):
        trainer.dump_lock.release()
