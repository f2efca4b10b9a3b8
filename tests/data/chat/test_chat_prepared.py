"""Prepared chat data (issue #23 item 4): conversations rendered, masked and cut by `prepare`
give the batches of the streamed chat path (same windows, labels, document ids, loader
state; any dp rank; resumable across the two), whatever split the prepare used (workers,
shards + finalize, a resumed shard), with the masks the released template's text gives; other
read settings are refused in one line."""

from __future__ import annotations

import copy
import dataclasses
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chat_conversations import CONVERSATIONS
from chat_spans import mask_from_text
from runtime.data import DataConfig, DataError, Tokenizer, build_dataloader
from runtime.data.chat.records import parse_record
from runtime.data.chat.template import TemplateRenderer
from runtime.data.loader import validation_data_config
from runtime.data.prepared import PreparedDataset, PreparedStream
from runtime.data.schema import ValidationConfig
from runtime.data.chat.prepared import PreparedChat
from runtime.data.preparing import finalize, plan_of, prepare, work_dir
from runtime.data_cli import main, prepare_inputs

ROOT = Path(__file__).resolve().parents[3]
TEMPLATE = ROOT / "runtime" / "assets" / "harmony_chat_template.jinja"  # the released one's copy
DATE = "2026-01-15"
S = 240  # the tool conversations (286-389 tokens) and 4-5 turn chats are longer
PART = 3000  # input bytes per part: ~8 parts, c.jsonl cut into byte ranges
OVERFLOW = ("cut_turns", "truncate", "drop")


def _chat(i: int) -> dict:
    """1-5 turns of growing length (113-321 tokens), every other one with a system message."""
    messages = [{"role": "system", "content": "Be brief."}] if i % 2 else []
    for t in range(1 + i % 5):
        messages += [{"role": "user", "content": f"Question {t} of record {i}: "
                      + "why " * (3 * t + i % 4)},
                     {"role": "assistant", "content": f"Answer {t}: " + "because " * (2 + i % 3)}]
    return {"messages": messages}


def _records() -> list[dict]:
    names = sorted(CONVERSATIONS)
    records = [CONVERSATIONS[names[i // 3 % len(names)]] if i % 3 == 0 else _chat(i)
               for i in range(40)]
    untrained = copy.deepcopy(_chat(2))  # trains no token: dropped whatever its length
    for m in untrained["messages"]:
        if m["role"] == "assistant":
            m["train"] = False
    return records[:20] + [untrained] + records[20:]


def _lines(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load("")


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    """A folder of three files: a.jsonl (a blank line), b.jsonl.gz (one part), c.jsonl (cut
    into byte ranges)."""
    d = tmp_path_factory.mktemp("chats")
    records = _records()
    a = _lines(records[:12]).splitlines(keepends=True)
    (d / "a.jsonl").write_text("".join(a[:5] + ["\n"] + a[5:]))
    with gzip.open(d / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(_lines(records[12:20]))
    (d / "c.jsonl").write_text(_lines(records[20:]))
    return d


def _cfg(chats: Path, **kw) -> DataConfig:
    return DataConfig(**{"dataset": "chat", "dataset_path": str(chats), "chat_date": DATE,
                         "chat_template": str(TEMPLATE), "max_dropped_fraction": 1.0, **kw})


def _prepare(cfg: DataConfig, out: Path, tok, **kw) -> dict | None:
    source, encode, settings = prepare_inputs(cfg, S, tok)
    return prepare(source, encode, out, tok, part_bytes=PART, batch_docs=5, settings=settings,
                   **kw)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def prepared(chats, tok, tmp_path_factory) -> dict[str, Path]:
    """One folder per data.chat_overflow, each written by one process."""
    d = tmp_path_factory.mktemp("prepared")
    for overflow in OVERFLOW:
        _prepare(_cfg(chats, chat_overflow=overflow), d / overflow, tok, workers=1)
    return {o: d / o for o in OVERFLOW}


def _draw(loader, steps: int) -> list[tuple[dict, dict]]:
    return [({k: v.numpy() for k, v in next(loader).items()}, loader.state_dict())
            for _ in range(steps)]


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for step, ((batch_a, state_a), (batch_b, state_b)) in enumerate(zip(a, b)):
        assert batch_a.keys() == batch_b.keys()
        for k in batch_a:
            assert np.array_equal(batch_a[k], batch_b[k]), (step, k)
        assert state_a == state_b, step


@pytest.mark.parametrize("overflow", OVERFLOW)
def test_prepared_chat_batches_equal_the_streamed_path(chats, tok, prepared, overflow):
    meta = json.loads((prepared[overflow] / "meta.json").read_text())
    chat = meta["chat"]
    assert meta["version"] == 4 and meta["masked"] and chat["conversations"] == 41
    assert chat["dropped"] >= 1 and (chat["cut"] >= 2 or overflow == "drop"), chat
    steps = 12  # ~2 epochs of windows: the epoch wrap and the second epoch's shuffle
    for shuffle, pack in ((False, "sequential"), (True, "best_fit")):
        read = dict(shuffle=shuffle, shuffle_seed=7 * shuffle, pack=pack, pack_buffer=4,
                    chat_overflow=overflow, tokenize_batch_docs=3)
        live_cfg = _cfg(chats, **read)
        prep_cfg = dataclasses.replace(live_cfg, dataset="prepared",
                                       dataset_path=str(prepared[overflow]))
        for rank, dp in ((0, 1), (0, 2), (1, 2)):
            live = _draw(build_dataloader(live_cfg, tok, S, 4, rank, dp), steps)
            prep_loader = build_dataloader(prep_cfg, tok, S, 4, rank, dp)
            assert isinstance(prep_loader.source, PreparedChat)
            _same(live, _draw(prep_loader, steps))
            labels = np.concatenate([b["labels"] for b, _ in live])
            assert (labels == -100).any() and (labels != -100).any()  # masked, not empty
        # a streamed run's checkpoint resumes on the prepared folder, and back: the same
        # batches as the run not stopped, the same states as a streamed resume (the
        # counts of dropped conversations encoded ahead depend on where encoding resumed)
        for first in (live_cfg, prep_cfg):
            loader = build_dataloader(first, tok, S, 4)
            _draw(loader, 5)
            state, after = loader.state_dict(), _draw(loader, 4)
            resumed = {}
            for cfg in (live_cfg, prep_cfg):
                resumed[cfg.dataset] = build_dataloader(cfg, tok, S, 4)
                resumed[cfg.dataset].load_state_dict(state)
                resumed[cfg.dataset] = _draw(resumed[cfg.dataset], 4)
                _same([(b, None) for b, _ in after], [(b, None) for b, _ in resumed[cfg.dataset]])
            _same(resumed["chat"], resumed["prepared"])
    stats = build_dataloader(prep_cfg, tok, S, 4)
    next(stats)
    assert stats.stats()["chat_dropped"] + stats.stats()["chat_truncated"] >= 1


def test_workers_shards_and_resume_write_the_bytes_of_one_process(chats, tok, prepared,
                                                                  tmp_path, capsys):
    cfg = _cfg(chats)
    one = _contents(prepared["cut_turns"])
    meta = json.loads(one["meta.json"])
    assert {"trained.bin", "doc_rendered.npy"} <= set(meta["files"])  # checksummed
    assert len(meta["token_files"]) >= 4  # several parts
    _prepare(cfg, tmp_path / "two", tok, workers=2)  # spawned workers: templates pickled
    assert _contents(tmp_path / "two") == one

    out = tmp_path / "sharded"
    for i in (0, 1):
        assert _prepare(cfg, out, tok, shard=(i, 2)) is None
    # a damaged mask file of a finished part is found and written again by a rerun
    part = work_dir(out) / "part-00001"
    mask = bytearray((part / "trained.bin").read_bytes())
    mask[len(mask) // 2] ^= 1
    (part / "trained.bin").write_bytes(bytes(mask))
    log = []
    _prepare(cfg, out, tok, shard=(1, 2), log=log.append)
    assert "part 1 trained.bin fails its checksum: writing it again" in log, log
    source, _, settings = prepare_inputs(cfg, S, tok)
    finalize(out, plan_of(source, tok, part_bytes=PART, settings=settings))
    assert _contents(out) == one

    # the published folder verifies its mask and index files too
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name, data in one.items():
        (damaged / name).write_bytes(data)
    rendered = bytearray(one["doc_rendered.npy"])
    rendered[-1] ^= 1
    (damaged / "doc_rendered.npy").write_bytes(bytes(rendered))
    with pytest.raises(DataError, match="doc_rendered.npy"):
        PreparedDataset(damaged).verify()


def test_stored_masks_are_the_released_templates(chats, tok, prepared):
    """Every stored conversation holds the tokens of the released template's text (a cut one:
    of its text from a later turn), and exactly the tokens of its last assistant turn found
    in that text are trained."""
    ds = PreparedChat(prepared["cut_turns"], _cfg(chats))
    renderer = TemplateRenderer(TEMPLATE.read_text(), str(TEMPLATE), date=DATE)
    records = _records()  # the files hold them in this order: document d is record d
    whole = cut = 0
    for d, record in enumerate(records):
        lo, hi = int(ds.offsets[d]), int(ds.offsets[d + 1])
        if hi == lo:
            continue  # dropped
        conv = parse_record(record, "t")
        stored = ds.tokens_at(np.arange(lo, hi)).tolist()
        trained = ds.trained_at(np.arange(lo, hi))
        # kept whole: the record's text; cut (cut_turns): the text from one of its turns
        starts = [0] if hi - lo == int(ds.rendered[d]) else conv.turn_starts()
        for start in starts:
            c = conv.from_turn(start) if start else conv
            text = renderer.render(c.messages, tools=c.tools, reasoning_effort=c.reasoning_effort)
            ids, mask = mask_from_text(tok, text, "last_assistant")
            if ids == stored:
                break
        assert ids == stored, d
        assert np.array_equal(trained, mask) and 0 < mask.sum() < len(mask), d
        whole += start == 0
        cut += start != 0
    assert whole >= 20 and cut >= 2, (whole, cut)


def test_other_read_settings_and_bad_records_are_one_line(chats, tok, prepared, tmp_path,
                                                          capsys):
    folder = prepared["cut_turns"]
    prep = DataConfig(dataset="prepared", dataset_path=str(folder), chat_date=DATE,
                      chat_template=str(TEMPLATE))
    next(build_dataloader(prep, tok, S, 2))
    next(build_dataloader(dataclasses.replace(prep, chat_date=""), tok, S, 2))  # the folder's
    for kw, seq_len, key in ((dict(), 256, "training.seq_len = 256"),
                             (dict(chat_overflow="drop"), S, "data.chat_overflow"),
                             (dict(loss_on="all"), S, "data.loss_on"),
                             (dict(chat_date="2030-01-01"), S, "data.chat_date"),
                             (dict(chat_template=""), S, "data.chat_template")):
        with pytest.raises(DataError, match=key) as e:
            build_dataloader(dataclasses.replace(prep, **kw), tok, seq_len, 2)
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="not as a text stream"):
        PreparedStream(PreparedDataset(folder), S)
    # held-out conversations for a run on prepared chat data are chat, rendered as it was
    held_out = ValidationConfig(enable=True, dataset_path=str(chats / "a.jsonl"))
    merged, _ = validation_data_config(held_out, dataclasses.replace(prep, chat_date=""))
    assert (merged.dataset, merged.chat_date) == ("chat", DATE)
    val = next(build_dataloader(merged, tok, S, 2, split="validation"))
    assert (val["labels"] == -100).any()
    loader = build_dataloader(prep, tok, S, 2)
    with pytest.raises(DataError, match="prepare it again with --data.chat_date=2030-01-01"):
        loader.load_state_dict({**loader.state_dict(), "chat_date": "2030-01-01"})

    bad = tmp_path / "bad"
    bad.mkdir()
    lines = _lines(_records()[:8]).splitlines(keepends=True)
    lines[5] = json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n"
    (bad / "bad.jsonl").write_text("".join(lines))
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"bad\.jsonl:6: .*'bot'"):
            _prepare(_cfg(bad), tmp_path / f"out{workers}", tok, workers=workers)
    rc = main(["prepare", "--config", str(ROOT / "configs" / "debugmodel_sft.toml"),
               f"--data.dataset_path={bad}", "--validation.enable=false", "--out",
               str(tmp_path / "cli"), "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "bad.jsonl:6" in err[-1], err


def test_prepare_workers_never_import_torch(chats):
    """A worker unpickles the chat encoder and renders with the template: no torch."""
    code = (
        "import pickle, sys\n"
        "from runtime.data import DataConfig, Tokenizer\n"
        "from runtime.data.chat.source import build_chat_source\n"
        "from runtime.data.chat.prepared import ChatPrepareEncoder\n"
        f"cfg = DataConfig(dataset='chat', dataset_path={str(chats)!r}, chat_date='{DATE}', "
        f"chat_template={str(TEMPLATE)!r})\n"
        "enc = pickle.loads(pickle.dumps(ChatPrepareEncoder(Tokenizer.load(''), cfg, 240)))\n"
        "items = [item for _, item in build_chat_source(cfg).shard_items(0)]\n"
        "docs = enc(items)\n"
        "assert len(docs) == len(items) and all(d.length for d in docs)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
