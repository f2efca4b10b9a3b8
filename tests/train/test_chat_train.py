"""Chat fine-tuning end to end on CPU: configs/debugmodel_sft.toml (tiny model, few steps)
trains on the masked tokens, validation_loss is logged and falls, the last step is handed
back as an HF checkpoint; validation and the hand-back give the same numbers on one process,
FSDP and a pipeline (gloo)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parallel_harness import BASE, global_batch_overrides, run_distributed, run_single, seeded

ROOT = Path(__file__).resolve().parents[2]
SFT = str(ROOT / "configs" / "debugmodel_sft.toml")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_debugmodel_sft_trains_validates_and_hands_back(tmp_path):
    from runtime.train.config.loader import load_config
    from runtime.train.trainer import Trainer

    cfg = load_config(SFT, ["--model.flavor=tiny", "--training.steps=16", "--training.device=cpu",
                            "--validation.freq=8", "--validation.steps=2", "--metrics.log_freq=1",
                            "--checkpoint.interval=1000", "--data.chat_date=2026-01-15",
                            "--optimizer.lr=3e-3", "--lr_scheduler.warmup_steps=2",
                            f"--job.dump_folder={tmp_path}"])
    trainer = Trainer(cfg)
    assert trainer.run() == 0
    records = _records(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in records]
    trained = [r["trained_tokens"] for r in records]
    assert len(losses) == 16 and losses[-1] < losses[0] - 1.0, losses
    # Only assistant tokens are trained: well under the 4 x 512 tokens of a step, and uneven.
    assert all(0 < t < 4 * 512 / 2 for t in trained) and len(set(trained)) > 1
    val = [(r["step"], r["validation_loss"]) for r in records if "validation_loss" in r]
    assert [s for s, _ in val] == [8, 16] and val[1][1] < val[0][1], val
    assert all(r["chat_truncated"] == 0 for r in records)
    hf = tmp_path / "hf"
    assert {"config.json", "tokenizer.json", "chat_template.jinja",
            "generation_config.json"} <= {p.name for p in hf.iterdir()}
    exported = load_file(next(hf.glob("*.safetensors")))
    ours = dict(trainer.model.named_parameters())
    assert torch.equal(exported["model.embed_tokens.weight"], ours["tok_embeddings.weight"])


CHAT = BASE + ["--data.dataset=chat", "--data.chat_date=2026-01-15", "--training.seq_len=384",
               "--validation.enable", "--validation.freq=1", "--validation.steps=2",
               "--metrics.enable_jsonl=true", "--checkpoint.last_save_in_hf",
               "--checkpoint.last_save_hf_dtype=float32"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    common = seeded(CHAT, tmp_path_factory.mktemp("chat_train_seed"))
    out = tmp_path_factory.mktemp("single")
    run_single(common + global_batch_overrides(4, 1), 2, out_dir=out)
    return common, out


@pytest.mark.parametrize("name, world, extra, dp", [
    ("FSDP2", 2, ["--parallelism.data_parallel_shard_degree=2"], 2),
    ("PP2", 2, ["--parallelism.data_parallel_shard_degree=1",
                "--parallelism.pipeline_parallel_degree=2",
                "--parallelism.pipeline_parallel_schedule=1F1B",
                "--parallelism.pipeline_parallel_microbatch_size=1",
                "--checkpoint.enable=true"], 1),
    # validation cuts its batches with the train step's CP helper (shard_batch)
    ("CP2", 2, ["--parallelism.data_parallel_shard_degree=1",
                "--parallelism.context_parallel_degree=2"], 1),
])
def test_validation_and_hand_back_equal_one_process(reference, tmp_path, name, world, extra, dp):
    common, ref_dir = reference
    run_distributed(world, common + extra + global_batch_overrides(4, dp), 2, out_dir=tmp_path)
    want = [r["validation_loss"] for r in _records(ref_dir / "job" / "metrics.jsonl")]
    got = [r["validation_loss"] for r in _records(tmp_path / "job" / "metrics.jsonl")]
    assert len(want) == 2 and len(got) == 2
    for a, b in zip(want, got, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (name, want, got)
    ref_hf = load_file(next((ref_dir / "job" / "hf").glob("*.safetensors")))
    got_hf = load_file(next((tmp_path / "job" / "hf").glob("*.safetensors")))
    assert ref_hf.keys() == got_hf.keys()
    for key, tensor in ref_hf.items():
        assert (got_hf[key] - tensor).abs().max() <= 1e-6 + 1e-5 * tensor.abs().max(), key


def test_validation_says_what_it_measures_and_caps_steps_at_one_pass(tmp_path, monkeypatch):
    """The start-up line counts what one evaluation reads; validation.steps longer than the
    held-out set is capped at one pass (with a line), shorter is kept; -1 is one pass."""

    from chat_conversations import CONVERSATIONS
    from runtime.data import Tokenizer
    from runtime.train.config.loader import load_config
    from runtime.train import validation_loss
    from runtime.train.validation_loss import Validator

    # 104, 149 and 185 tokens: one conversation per 200-token window.
    rows = [CONVERSATIONS[k] for k in ("single_turn", "system_and_thinking", "multi_turn")]
    held_out = tmp_path / "val.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = []

    def validator(steps, global_batch):
        cfg = load_config(SFT, ["--model.flavor=tiny", "--training.seq_len=200",
                                f"--validation.dataset_path={held_out}",
                                f"--validation.steps={steps}", "--data.chat_date=2026-01-15"])
        lines.clear()
        return Validator(cfg, Tokenizer.load(""), global_batch, dp_rank=0, dp_world_size=1,
                         log=lines.append)

    assert validator(10, 3).steps == 1
    assert lines[0].startswith(f"validation: {held_out}: 3 conversations, ") and lines[0].endswith(
        " trained tokens in 1 global batch per evaluation (one pass over the held-out set), "
        "every 50 steps and after the last"), lines
    assert lines[1] == ("validation: steps = 10 capped at 1: one pass over the held-out set "
                        "(a longer evaluation would repeat it)")
    assert validator(2, 1).steps == 2 and len(lines) == 1  # shorter than a pass: kept
    assert "2 conversations, " in lines[0] and "in 2 global batches per evaluation (the " \
        "held-out set is longer)" in lines[0], lines
    assert validator(-1, 1).steps == 3 and len(lines) == 1
    assert "3 conversations, " in lines[0] and "(one pass over the held-out set)" in lines[0]
    # A long read logs progress (every PROGRESS_EVERY_S seconds; here every batch).
    monkeypatch.setattr(validation_loss, "PROGRESS_EVERY_S", 0.0)
    assert validator(2, 1).steps == 2
    assert [re.sub(r"\(\d+ s\)$", "(N s)", line) for line in lines[:2]] == [
        f"validation: reading the held-out set: {k}/2 global batches (N s)" for k in (1, 2)], lines
