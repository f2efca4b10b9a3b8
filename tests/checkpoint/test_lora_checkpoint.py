"""LoRA runs end to end (issue 22, items 5 and 6): the checkpoint holds the adapters, their
optimizer state and the train state, plus the identity of the base; a resume reloads the base
from checkpoint.initial_load_hf and continues exactly, and refuses another base in one line;
the hand-back writes what lora.export selects, which PEFT and transformers load with our
model's logits."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from checkpoint_helpers import (copy_run, error_lines, losses, make_trainer, run_job, seeded_model,
                                stop_after)
from tolerances import assert_close_to_scale, scaled_error

from runtime.hf import save_hf
from runtime.hf.adapter import CONFIG_FILE, WEIGHTS_FILE
from runtime.train.checkpoint.manager import CheckpointError, find_latest_checkpoint
from runtime.train.checkpoint.resume_checks import stored_model_shapes
from runtime.train.slurm_env import EXIT_REQUEUE

LORA = ["--lora.enable=true", "--lora.rank=4", "--lora.alpha=64", "--model.compute_dtype=float32",
        "--model.attn_backend=math"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny HF base checkpoint (fp32) and a bf16 copy of it (another base: other dtypes)."""
    root = tmp_path_factory.mktemp("base")
    model = seeded_model("tiny", 7)
    save_hf(model, root / "fp32", dtype=torch.float32, progress=False)
    save_hf(model, root / "bf16", dtype=torch.bfloat16, progress=False)
    return root


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    """A finished 4-step LoRA run on the fp32 base (checkpoints step-2, step-4)."""
    folder = tmp_path_factory.mktemp("lora")
    trainer = make_trainer(folder, *LORA, f"--checkpoint.initial_load_hf={base / 'fp32'}")
    assert trainer.run() == 0
    return folder


# ----------------------------------------------------------------------------- item 5
def test_checkpoint_holds_adapters_and_the_base_identity(lora_run, base):
    step = lora_run / "checkpoints" / "step-4"
    stored = stored_model_shapes(step)
    assert stored and all(k.endswith(("lora_A", "lora_B", "expert_bias")) for k in stored), \
        sorted(stored)
    assert any(k.endswith("mlp1_lora_A") for k in stored)  # expert adapters included
    record = json.loads((step / "runtime.json").read_text())
    assert record["lora_base"]["initial_load_hf"] == str(base / "fp32")
    assert record["lora_base"]["fingerprint"].startswith("sha256:")
    size = sum(p.stat().st_size for p in step.iterdir())
    base_size = sum(p.stat().st_size for p in (base / "fp32").glob("*.safetensors"))
    assert size < base_size / 2  # adapters + Adam state, not the base


def test_exact_resume_reloads_the_base(lora_run, base, tmp_path):
    extra = [*LORA, f"--checkpoint.initial_load_hf={base / 'fp32'}"]
    first = make_trainer(tmp_path / "split", *extra)
    stop_after(first, 3)
    assert first.run() == EXIT_REQUEUE
    assert find_latest_checkpoint(tmp_path / "split" / "checkpoints").name == "step-3"
    resumed = make_trainer(tmp_path / "split", *extra)
    assert resumed.step == 3
    assert resumed.run() == 0
    want, got = losses(lora_run), losses(tmp_path / "split")
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=0), step


def test_a_moved_base_is_the_same_base(lora_run, base, tmp_path):
    """... and the default targets spelled in our names are the same adapters."""
    moved = tmp_path / "moved"
    shutil.copytree(base / "fp32", moved)
    folder = copy_run(lora_run, tmp_path / "run")
    trainer = make_trainer(folder, *LORA, f"--checkpoint.initial_load_hf={moved}",
                           '--lora.targets=["wq", "wk", "wv", "wo", "mlp1", "mlp2"]',
                           "--training.steps=5")
    assert trainer.step == 4


def test_another_base_is_refused_before_the_model_is_built(lora_run, base, tmp_path, monkeypatch):
    from runtime.train.trainer import Trainer

    def build(self):
        raise AssertionError("the model was built")

    monkeypatch.setattr(Trainer, "_build_model", build)
    folder = copy_run(lora_run, tmp_path / "run")
    with pytest.raises(CheckpointError, match="LoRA adapters of another base") as err:
        make_trainer(folder, *LORA, f"--checkpoint.initial_load_hf={base / 'bf16'}",
                     "--training.steps=6")
    assert f"initial_load_hf='{base / 'fp32'}'" in str(err.value)  # the remedy names it


def test_another_base_exits_2_with_one_line(lora_run, base, tmp_path):
    folder = copy_run(lora_run, tmp_path / "run")
    proc = run_job(folder, *LORA, f"--checkpoint.initial_load_hf={base / 'bf16'}",
                   "--training.steps=6", "--checkpoint.keep_latest_k=1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "another base" in lines[0] and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (folder / "checkpoints").glob("step-*")) == ["step-2", "step-4"]


@pytest.mark.parametrize("change, named", [
    (["--lora.enable=false"], "lora.enable = false"),
    (["--lora.alpha=8"], "lora.alpha = 8.0 here, 64.0 in the checkpoint"),
    (["--lora.rank=8"], "lora.rank = 8 here, 4 in the checkpoint"),
    (['--lora.targets=["q_proj"]'], 'lora.targets = ["q_proj"] here, ["q_proj", "k_proj", '),
    (["--lora.layers=0"], 'lora.layers = "0" here, "all" in the checkpoint'),
    (["--lora.use_rslora=true"], "lora.use_rslora = True here, False in the checkpoint"),
])
def test_lora_settings_a_resume_cannot_honour(lora_run, base, tmp_path, change, named, monkeypatch):
    """Refused before the model is built, one line naming the key and both values."""
    from runtime.train.trainer import Trainer

    def build(self):
        raise AssertionError("the model was built")

    monkeypatch.setattr(Trainer, "_build_model", build)
    folder = copy_run(lora_run, tmp_path / "run")
    keep = [a for a in LORA if not a.startswith(tuple(c.split("=")[0] for c in change))]
    with pytest.raises(CheckpointError, match=re.escape(named)) as err:
        make_trainer(folder, *keep, *change, f"--checkpoint.initial_load_hf={base / 'fp32'}",
                     "--training.steps=6")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- item 6
@pytest.fixture(scope="module")
def exported(lora_run, base, tmp_path_factory):
    """The trained LoRA model (resumed at step 4) and its hand-back in each lora.export mode."""
    folder = copy_run(lora_run, tmp_path_factory.mktemp("export") / "run")
    trainer = make_trainer(folder, *LORA, f"--checkpoint.initial_load_hf={base / 'fp32'}",
                           "--checkpoint.last_save_in_hf=true",
                           "--checkpoint.last_save_hf_dtype=float32")
    assert trainer.step == 4
    outs = {}
    for mode in ("adapter", "merged", "both"):
        trainer.cfg.lora.export = mode
        trainer.cfg.job.dump_folder = str(folder / mode)
        (folder / mode).mkdir()
        outs[mode] = trainer.export_hf()
    return trainer, outs


def _names(path):
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def test_export_modes_write_what_they_name(exported):
    _, outs = exported
    adapter_files = {CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json"}
    assert _names(outs["adapter"]) == ["adapter"]  # no merged weights
    assert adapter_files <= set(_names(outs["adapter"] / "adapter"))
    assert "adapter" not in _names(outs["merged"])
    assert {"config.json", "model.safetensors.index.json"} <= set(_names(outs["merged"]))
    assert {"adapter", "config.json"} <= set(_names(outs["both"]))
    assert adapter_files <= set(_names(outs["both"] / "adapter"))
    assert not [n for n in _names(outs["both"]) if n.endswith(".tmp")]


@pytest.fixture(scope="module")
def ours(exported):
    trainer, _ = exported
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    model = trainer.model.eval()
    with torch.no_grad():
        return tokens, model(tokens).float()


def test_peft_loads_the_adapter_with_our_logits(exported, ours, base):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    _, outs = exported
    tokens, logits = ours
    hf = AutoModelForCausalLM.from_pretrained(base / "fp32", attn_implementation="eager",
                                              experts_implementation="eager",
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = hf(tokens).logits
        adapted = peft.PeftModel.from_pretrained(copy.deepcopy(hf), outs["both"] / "adapter")
        got = adapted.eval()(tokens).logits
    assert_close_to_scale(got, logits, 1e-5, "PEFT adapter vs our LoRA model")
    assert scaled_error(base_logits, logits) > 1e-3  # negative control: training moved them


def test_merged_export_has_our_logits_in_transformers(exported, ours):
    from transformers import AutoModelForCausalLM

    _, outs = exported
    tokens, logits = ours
    for mode in ("merged", "both"):
        hf = AutoModelForCausalLM.from_pretrained(outs[mode], attn_implementation="eager",
                                                  experts_implementation="eager",
                                                  dtype=torch.float32).eval()
        with torch.no_grad():
            assert_close_to_scale(hf(tokens).logits, logits, 1e-5, f"merged ({mode})")


@pytest.mark.parametrize("extra, pp, named", [
    (['--lora.trainable_extra=["sinks"]'], 1, "no place for the attention sinks"),
    (["--lora.export=merged"], 2, "with parallelism.pipeline_parallel_degree = 2 is not supported"),
])
def test_an_export_this_run_cannot_write_is_a_config_error(extra, pp, named):
    from runtime.errors import ConfigError
    from runtime.train.config.loader import load_config
    from runtime.train.checkpoint.hf_export import check_lora_export

    cfg = load_config(None, ["--model.flavor=tiny", "--lora.enable=true",
                             "--checkpoint.last_save_in_hf=true", *extra])
    with pytest.raises(ConfigError, match=named):
        check_lora_export(cfg, pp)
    cfg.checkpoint.last_save_in_hf = False  # negative control: no hand-back, nothing to refuse
    check_lora_export(cfg, pp)
