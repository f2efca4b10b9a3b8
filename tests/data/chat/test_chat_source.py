"""Chat data: conversations packed one per document with masked labels, overflow, exact
resume, the same global batch on any dp degree, the checkpoint's template, the sample."""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from chat_conversations import CONVERSATIONS
from runtime.data import DataConfig, DataError, Tokenizer, build_dataloader
from runtime.data.chat.masks import HarmonyIds, trained_tokens
from runtime.data.chat.records import parse_record
from runtime.data.chat.source import CHAT_SAMPLE
from runtime.data.chat.template import HarmonyRenderer
from runtime.data.tokenizer import EMBEDDED_TOKENIZER
from runtime.model.loss import IGNORE_INDEX

DATE = "2026-01-15"
FIXTURE = Path(__file__).resolve().parents[3] / "runtime" / "assets" / "harmony_chat_template.jinja"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load("")


def _write(tmp_path: Path, records: list[dict], name="chats.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cfg(path, **kw):
    return DataConfig(**{"dataset": "chat", "dataset_path": str(path), "chat_date": DATE, **kw})


def _encoded(tok, record, loss_on="last_assistant"):
    conv = parse_record(record, "t")
    text = HarmonyRenderer(date=DATE).render(conv.messages, tools=conv.tools,
                                             reasoning_effort=conv.reasoning_effort)
    ids = tok.encode(text, allow_special=True)
    return ids, trained_tokens(ids, tok.decode, HarmonyIds.of(tok), loss_on)


RECORDS = [CONVERSATIONS[k] for k in sorted(CONVERSATIONS)]


@pytest.mark.parametrize("loss_on", ["last_assistant", "all_assistant", "all"])
def test_windows_hold_whole_conversations_with_masked_labels(tmp_path, tok, loss_on):
    path = _write(tmp_path, RECORDS)
    longest = max(len(_encoded(tok, r)[0]) for r in RECORDS)
    S = longest + 40
    loader = build_dataloader(_cfg(path, loss_on=loss_on), tok, S, len(RECORDS))
    batch = next(loader)
    expected = [_encoded(tok, r, loss_on) for r in RECORDS]
    placed = []  # every conversation, in order, from the windows
    for row in range(batch["tokens"].shape[0]):
        tokens, labels = batch["tokens"][row].numpy(), batch["labels"][row].numpy()
        docs, pos = batch["document_ids"][row].numpy(), batch["positions"][row].numpy()
        for d in np.unique(docs):
            cols = np.flatnonzero(docs == d)
            assert (pos[cols] == np.arange(len(cols))).all()  # positions restart per document
            if tokens[cols[0]] == tok.pad_id:
                assert (labels[cols] == IGNORE_INDEX).all()  # padding trains nothing
                continue
            placed.append((tokens[cols].tolist(), labels[cols]))
    assert len(placed) >= len(RECORDS)
    for (ids, trained), (got_ids, got_labels) in zip(expected, placed, strict=False):
        assert got_ids == ids
        want = np.where(trained[1:], np.asarray(ids[1:]), IGNORE_INDEX)
        assert (got_labels[:-1] == want).all() and got_labels[-1] == IGNORE_INDEX


def _cut(record, start):
    messages = record["messages"]
    head = messages[:1] if messages[0]["role"] in ("system", "developer") else []
    return {**record, "messages": head + messages[start:]}


def test_overflow_cut_turns_truncate_and_drop(tmp_path, tok):
    short, long, multi = (CONVERSATIONS[k] for k in ("single_turn", "tool_call", "multi_turn"))
    last_turn = _cut(multi, 3)  # the developer message and the last user turn
    path = _write(tmp_path, [short, long, multi, short])
    S = len(_encoded(tok, last_turn)[0]) + 2
    assert len(_encoded(tok, long)[0]) > S and len(_encoded(tok, multi)[0]) > S

    def first_docs(loader, n):
        batch = next(loader)
        docs = []
        for row in range(batch["tokens"].shape[0]):
            ids, tokens = batch["document_ids"][row], batch["tokens"][row]
            docs += [tokens[ids == d].tolist() for d in ids.unique()
                     if tokens[ids == d][0] != tok.pad_id]
        return docs[:n]

    # cut_turns (default): the multi-turn conversation keeps its last turn and developer
    # message; the one-turn tool conversation cannot be cut: dropped, never trained as prompt
    cut = build_dataloader(_cfg(path, tokenize_batch_docs=1), tok, S, 3)
    docs = first_docs(cut, 3)
    assert docs == [_encoded(tok, short)[0], _encoded(tok, last_turn)[0], _encoded(tok, short)[0]]
    assert cut.stream.overflow_counts == {"truncated": 1, "dropped": 1}
    state = cut.state_dict()
    assert (state["chat_seen"], state["chat_truncated"], state["chat_dropped"]) == (4, 1, 1)
    # truncate: the tool conversation's first S tokens hold no trained token: dropped too;
    # with loss_on = "all" its start trains, so it is kept, cut at S
    trunc = build_dataloader(_cfg(path, chat_overflow="truncate", tokenize_batch_docs=1), tok, S, 3)
    assert first_docs(trunc, 2)[1] == _encoded(tok, multi)[0][:S]
    assert trunc.stream.overflow_counts == {"truncated": 1, "dropped": 1}
    kept = build_dataloader(_cfg(path, chat_overflow="truncate", loss_on="all",
                                 tokenize_batch_docs=1), tok, S, 3)
    assert first_docs(kept, 2)[1] == _encoded(tok, long)[0][:S]
    dropped = build_dataloader(_cfg(path, chat_overflow="drop", tokenize_batch_docs=1), tok, S, 2)
    batch = next(dropped)
    assert dropped.stream.overflow_counts == {"truncated": 0, "dropped": 2}
    assert batch["tokens"][0].tolist() == batch["tokens"][1].tolist()  # short, short
    stats = dropped.stats()
    assert stats["chat_dropped"] == 2 and stats["chat_dropped_share"] == 0.5
    assert 0 < stats["padding_share"] < 1


@pytest.mark.parametrize("overflow", ["drop", "truncate", "cut_turns"])
def test_all_dropped_is_one_error_not_a_hang(tmp_path, tok, overflow):
    long = CONVERSATIONS["tool_call"]
    path = _write(tmp_path, [long] * 3)
    loader = build_dataloader(_cfg(path, chat_overflow=overflow, max_dropped_fraction=1.0),
                              tok, 64, 1)
    with pytest.raises(DataError, match=r"every conversation of .* is dropped \(3 in one epoch: "
                       r"3 longer than training.seq_len = 64 .*the longest has \d+ tokens"):
        next(loader)


def test_max_dropped_fraction(tmp_path, tok):
    short, long = CONVERSATIONS["single_turn"], CONVERSATIONS["tool_call"]
    S = len(_encoded(tok, short)[0]) + 5
    path = _write(tmp_path, [short, long, long, short, long])  # 3 of 5 dropped
    with pytest.raises(DataError, match=r"3 of 5 conversations .* dropped \(60%\), more than "
                                        r"data.max_dropped_fraction = 0.5"):
        for _ in range(4):
            next(build_dataloader(_cfg(path), tok, S, 2))
    loader = build_dataloader(_cfg(path, max_dropped_fraction=0.7), tok, S, 2)
    for _ in range(4):
        next(loader)  # under the limit: trains on the short ones


def test_resume_is_exact_and_dp_slices_match(tmp_path, tok):
    path = _write(tmp_path, RECORDS * 3)
    S = 700

    def draw(loader, n):
        return [next(loader) for _ in range(n)]

    reference = draw(build_dataloader(_cfg(path), tok, S, 4), 6)
    first = build_dataloader(_cfg(path), tok, S, 4)
    draw(first, 2)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_dataloader(_cfg(path, chat_date="2030-12-31"), tok, S, 4)
    resumed.load_state_dict(state)  # the saved render date wins over the config's
    for want, got in zip(reference[2:], draw(resumed, 4), strict=True):
        assert all(torch.equal(want[k], got[k]) for k in want)
    for dp in (2, 4):
        ranks = [draw(build_dataloader(_cfg(path), tok, S, 4, r, dp), 3) for r in range(dp)]
        for step in range(3):
            joined = torch.cat([ranks[r][step]["labels"] for r in range(dp)])
            assert torch.equal(joined, reference[step]["labels"])


def test_checkpoint_template_is_used(tmp_path, tok):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(EMBEDDED_TOKENIZER, ckpt / "tokenizer.json")
    path = _write(tmp_path, RECORDS)
    builtin = next(build_dataloader(_cfg(path), tok, 1024, 4))
    (ckpt / "chat_template.jinja").write_text(FIXTURE.read_text())
    loader = build_dataloader(_cfg(path), Tokenizer.load(str(ckpt)), 1024, 4)
    assert "chat_template.jinja" in loader.stream.encode.renderer.source
    templated = next(loader)
    assert all(torch.equal(builtin[k], templated[k]) for k in builtin)
    (ckpt / "chat_template.jinja").write_text("{{ raise_exception('no chat here') }}")
    with pytest.raises(DataError, match="no chat here"):
        next(build_dataloader(_cfg(path), Tokenizer.load(str(ckpt)), 1024, 4))


def test_bad_chat_input_is_one_line(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"messages": [
        {"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: no assistant"):
        for _ in range(3):
            next(build_dataloader(_cfg(bad, tokenize_batch_docs=1), tok, 1024, 1))
    for arguments in ('["x", 1]', "[1]", "3", [1, 2], "not json"):
        call = {"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": arguments}}]}
        bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"messages": [
            {"role": "user", "content": "x"}, call]}) + "\n")
        with pytest.raises(DataError, match=r"^[^\n]*bad.jsonl:2: messages\[1\]: tool call "
                                            r"arguments (must be a JSON object|are not valid)"):
            for _ in range(3):
                next(build_dataloader(_cfg(bad, tokenize_batch_docs=1), tok, 1024, 1))
    no_name = {**RECORDS[0], "tools": [{"type": "function", "function": {"parameters": {}}}]}
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(no_name) + "\n")
    with pytest.raises(DataError, match=r"^[^\n]*bad.jsonl:2: tools\[0\]: a tool needs function.name"):
        for _ in range(3):
            next(build_dataloader(_cfg(bad, tokenize_batch_docs=1), tok, 1024, 1))
    path = _write(tmp_path, RECORDS)
    with pytest.raises(DataError, match="data.loss_on"):
        build_dataloader(_cfg(path, loss_on="assistant"), tok, 1024, 1)
    with pytest.raises(DataError, match="data.chat_overflow"):
        build_dataloader(_cfg(path, chat_overflow="wrap"), tok, 1024, 1)
    text_only = tmp_path / "tok.json"
    shutil.copy(EMBEDDED_TOKENIZER, text_only)
    raw = json.loads(text_only.read_text())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "<|start|>"]
    raw["model"]["vocab"].pop("<|start|>")
    text_only.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="harmony"):
        build_dataloader(_cfg(path), Tokenizer.load(str(text_only)), 1024, 1)


def test_hf_arrow_dataset_saved_to_disk(tmp_path, tok, monkeypatch):
    """A real `datasets` DatasetDict (save_to_disk) of conversations whose tools have
    different schemas: Arrow gives every row the union of keys, null where absent; read as
    absent, the rows render exactly as the JSONL records do. A saved Dataset is the train
    split only, and a bad row names its example."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    records = [CONVERSATIONS[k] for k in ("tool_call", "typed_tool_schemas", "single_turn",
                                          "two_turns_with_tools", "ends_with_tool_call")]
    # Arrow needs one type per column: tool contents as text, arguments as objects.
    records = [{"tools": r.get("tools"), "messages": [
        {**m, "content": json.dumps(m["content"])} if not isinstance(m.get("content", ""), str)
        else m for m in r["messages"]]} for r in records]
    for r in records:
        for m in r["messages"]:
            for call in m.get("tool_calls", []):
                if isinstance(call["function"]["arguments"], str):
                    call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    ds = datasets.Dataset.from_list(records)
    row = ds[0]  # the negative control: the raw rows really hold Arrow's nulls
    assert row["messages"][0]["thinking"] is None
    assert None in row["tools"][0]["function"]["parameters"]["properties"].values()
    assert None in row["messages"][1]["tool_calls"][0]["function"]["arguments"].values()
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": ds, "validation": ds.select([1])}).save_to_disk(str(saved))
    jsonl = _write(tmp_path, records)
    cfg = DataConfig(dataset="chat", hf_dataset=str(saved), chat_date=DATE)
    from_arrow = build_dataloader(replace(cfg, hf_split="train"), tok, 1024, len(records))
    from_json = build_dataloader(_cfg(jsonl), tok, 1024, len(records))
    assert from_arrow.source.saved == "dict"
    a, b = next(from_arrow), next(from_json)
    assert all(torch.equal(a[k], b[k]) for k in a)
    val = build_dataloader(replace(cfg, hf_split="validation"), tok, 1024, 1)
    one = build_dataloader(_cfg(_write(tmp_path, records[1:2], "one.jsonl")), tok, 1024, 1)
    assert torch.equal(next(val)["tokens"], next(one)["tokens"])
    with pytest.raises(DataError, match="has no split 'test' \\(it has train, validation\\)"):
        next(build_dataloader(replace(cfg, hf_split="test"), tok, 1024, 1))
    single = tmp_path / "single"
    ds.save_to_disk(str(single))
    cfg.hf_dataset = str(single)
    whole = next(build_dataloader(replace(cfg, hf_split="train"), tok, 1024, 5))
    assert torch.equal(whole["tokens"], b["tokens"])
    with pytest.raises(DataError, match="one saved Dataset \\(no splits\\)"):
        next(build_dataloader(replace(cfg, hf_split="validation"), tok, 1024, 1))
    bad = datasets.Dataset.from_list([records[0], {**records[0], "tools": [
        {"type": "function", "function": {"name": None, "description": "nameless"}}]}])
    bad.save_to_disk(str(tmp_path / "bad"))
    cfg.hf_dataset = str(tmp_path / "bad")
    with pytest.raises(DataError, match=r"example 1: tools\[0\]: a tool needs function.name"):
        for _ in range(3):
            next(build_dataloader(replace(cfg, tokenize_batch_docs=1), tok, 1024, 1))


def test_embedded_chat_sample(tok):
    for split, count in (("train", 4000), ("validation", 200)):
        with gzip.open(CHAT_SAMPLE[split], "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        assert len(records) == count
        assert {r["task"] for r in records} == {"reverse", "sort", "add", "followup", "tool"}
        for r in records[:50]:
            assert r["messages"][-1]["content"] == r["answer"]
    loader = build_dataloader(DataConfig(dataset="chat", chat_date=DATE), tok, 512, 2,
                              split="validation")
    assert loader.source.name == "embedded chat sample (validation)"
    batch = next(loader)
    assert (batch["labels"] != IGNORE_INDEX).sum() > 0


def test_chat_sample_is_reproducible():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[3] / "scripts" / "build_chat_sample.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_held_out_split_is_disjoint_and_stable(tmp_path, tok):
    from runtime.data.loader import validation_data_config
    from runtime.data.schema import ValidationConfig
    from runtime.data.split import held_out

    records = [{"messages": [{"role": "user", "content": f"q{i}"},
                             {"role": "assistant", "content": f"a{i}"}]} for i in range(60)]
    path = _write(tmp_path, records)
    cfg = _cfg(path, shuffle=True)
    sides = {}
    for side in ("train", "validation"):
        loader = build_dataloader(cfg, tok, 4096, 1, split=side, holdout=0.25)
        seen = set()
        for _ in range(2):  # a whole epoch fits in one window: two windows = two epochs
            text = tok.decode(next(loader)["tokens"][0].tolist())
            seen |= {int(x) for x in __import__("re").findall(r"user<\|message\|>q(\d+)", text)}
        sides[side] = seen
    assert sides["train"] and sides["validation"] and not sides["train"] & sides["validation"]
    assert sides["train"] | sides["validation"] == set(range(60))
    assert 5 <= len(sides["validation"]) <= 25  # about a quarter
    assert held_out("x", 0.5) == held_out("x", 0.5)

    merged, fraction = validation_data_config(ValidationConfig(split_fraction=0.1), cfg)
    assert fraction == 0.1 and merged.shuffle is False and cfg.shuffle is True
    merged, fraction = validation_data_config(ValidationConfig(dataset_path="v.jsonl"), cfg)
    assert (merged.dataset, merged.dataset_path, fraction) == ("chat", "v.jsonl", 0.0)
    merged, _ = validation_data_config(ValidationConfig(), DataConfig(dataset="chat"))
    assert merged.dataset == "chat" and not merged.dataset_path
    with pytest.raises(DataError, match="validation.split_fraction"):
        validation_data_config(ValidationConfig(), DataConfig())
    with pytest.raises(DataError, match="not both"):
        validation_data_config(ValidationConfig(split_fraction=0.1, dataset_path="v"), cfg)


@pytest.mark.parametrize("overrides, match", [
    (["--data.loss_on=assistant"], "--data.loss_on must be one of"),
    (["--data.chat_overflow=wrap"], "--data.chat_overflow must be one of"),
    (["--data.chat_date=15/01/2026"], "--data.chat_date must be YYYY-MM-DD"),
    (["--data.dataset=chat", "--data.dataset_path=a", "--data.hf_dataset=b"], "choose one"),
    (["--validation.enable"], "--validation.enable needs validation.dataset_path"),
    (["--validation.enable", "--validation.split_fraction=0.1", "--validation.dataset_path=v"],
     "exclusive"),
    (["--validation.enable", "--validation.split_fraction=1"], "must be < 1"),
    (["--checkpoint.last_save_hf_dtype=int8"], "last_save_hf_dtype must be one of"),
])
def test_chat_config_errors_name_the_key(overrides, match):
    from runtime.errors import ConfigError
    from runtime.train.config.loader import load_config

    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_chat_configs_load_and_pass_the_plan_at_their_world_sizes(capsys):
    from runtime.plan import main as plan_main
    from runtime.train.config.loader import load_config

    root = Path(__file__).resolve().parents[3] / "configs"
    for name, world in (("debugmodel_sft", 1), ("gptoss_20b_sft", 8), ("gptoss_120b_sft", 64)):
        args = ["--config", str(root / f"{name}.toml"), "--world-size", str(world), "--check-only"]
        assert plan_main(args) == 0, capsys.readouterr()
    cfg = load_config(str(root / "debugmodel_sft.toml"))
    assert cfg.data.dataset == "chat" and cfg.validation.enable
    assert cfg.checkpoint.last_save_in_hf
    for size in ("20b", "120b"):
        cfg = load_config(str(root / f"gptoss_{size}_sft.toml"))
        assert cfg.checkpoint.initial_load_hf == cfg.model.tokenizer_path
        assert cfg.validation.split_fraction > 0 and cfg.checkpoint.last_save_in_hf
        assert cfg.model.load_balance_coeff == 0.0


def test_show_marks_the_trained_tokens(capsys):
    from runtime.data.__main__ import main

    root = Path(__file__).resolve().parents[3]
    assert main(["--config", str(root / "configs" / "debugmodel_sft.toml"), "--show", "2",
                 "--data.chat_date=2026-01-15"]) == 0
    text = capsys.readouterr().out
    assert text.count("=== sample") == 2
    assert "assistant[[<|channel|>analysis<|message|>" in text and "<|return|>]]" in text
    assert main(["--config", str(root / "configs" / "debugmodel_sft.toml"), "--show", "1",
                 "--json"]) == 0
    sample = json.loads(capsys.readouterr().out)
    assert set(sample) == {"input_ids", "labels", "document_ids", "positions"}
    assert IGNORE_INDEX in sample["labels"] and len(sample["input_ids"]) == 512
