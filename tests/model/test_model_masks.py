"""Attention masks without document ids are built once and reused; document masks every
forward. No document ids (masking off) gives the same numbers as all-zero ids."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import runtime.model.model as model_module
from runtime.model.args import FLAVORS
from runtime.model.model import GptOssModel


def build(backend: str = "math") -> GptOssModel:
    # fp64 with the reference expert loop (grouped_mm takes no float64)
    m = GptOssModel(dataclasses.replace(FLAVORS["tiny"], moe_impl="loop", attn_backend=backend))
    m.init_weights(seed=0)
    return m.double()


@pytest.fixture
def model():
    return build()


@pytest.fixture
def builds(monkeypatch):
    calls = []
    real = model_module.build_attention_masks

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "build_attention_masks", counting)
    return calls


@pytest.mark.parametrize("backend", ["math", "flex"])
def test_masks_without_documents_are_built_once(builds, backend):
    model = build(backend)
    tokens = torch.randint(0, model.args.vocab_size, (2, 24))
    with torch.no_grad():
        first = model(tokens)
        second = model(tokens)
        model(tokens[:, :16])  # another length: its own masks
    assert builds == [backend, backend]
    assert torch.equal(first, second)


def test_document_masks_are_built_every_forward(model, builds):
    tokens = torch.randint(0, model.args.vocab_size, (2, 24))
    docs = torch.zeros(2, 24, dtype=torch.long)
    docs[:, 10:] = 1
    with torch.no_grad():
        model(tokens, document_ids=docs)
        model(tokens, document_ids=docs)
    assert builds == ["math", "math"]


def test_no_document_ids_equals_all_zero_ids(model):
    """Masking off may drop the ids altogether: one document per row is the same mask."""
    tokens = torch.randint(0, model.args.vocab_size, (2, 24))
    with torch.no_grad():
        without = model(tokens)
        zeros = model(tokens, document_ids=torch.zeros(2, 24, dtype=torch.long))
    assert torch.equal(without, zeros)


def test_trainer_with_masking_off_builds_one_mask_for_the_run(tmp_path, builds):
    """data.document_mask = false: the loader hands out no document ids, so every step reuses
    the masks built at the first one (before: batch-sized document masks every step)."""
    from runtime.train.config.loader import load_config
    from runtime.train.trainer import Trainer

    trainer = Trainer(load_config(None, [
        "--model.flavor=tiny", "--training.seq_len=32", "--training.device=cpu",
        "--training.local_batch_size=2", "--training.steps=3", "--data.document_mask=false",
        "--checkpoint.enable=false", "--metrics.enable_jsonl=false",
        f"--job.dump_folder={tmp_path}"]))
    assert trainer.run() == 0
    assert builds == ["math"]
