"""Document sources, packing, dp-invariant global batches and resumable loader state."""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.data import (
    DataConfig,
    Document,
    EmbeddedSource,
    FileSource,
    ParallelAwareDataLoader,
    build_dataloader,
    build_source,
    read_parquet_docs,
    resolve_files,
    split_microbatches,
)

BOS, EOS = 1, 2


class CharTokenizer:
    """One id per character (its code point): token streams are readable in asserts."""

    bos_id, eos_id, pad_id, vocab_size = BOS, EOS, 0, 0x110000

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


def _files(path, **kw) -> DataConfig:
    """A [data] config reading local files."""
    return DataConfig(dataset="path", dataset_path=str(path), **kw)


def ids(s: str) -> list[int]:
    """'^' is BOS, '$' is EOS, anything else its code point."""
    return [BOS if c == "^" else EOS if c == "$" else ord(c) for c in s]


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts))
    return path


def loader(source, seq_len=4, batch=1, dp_rank=0, dp=1, **kw) -> ParallelAwareDataLoader:
    return ParallelAwareDataLoader(source, CharTokenizer(), seq_len, batch, dp_rank, dp, **kw)


def first_texts(source, n: int) -> list[str]:
    stream = source.stream()
    return [next(stream)[1] for _ in range(n)]


def random_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 40))) for _ in range(n)]


# ----------------------------------------------------------------------------- packing
def test_packing_exact_windows(tmp_path):
    src = FileSource([write_jsonl(tmp_path / "c.jsonl", ["abc", "defgh", "ij"])])
    it = loader(src, seq_len=4, batch=1)
    # stream: ^abc$ ^defgh$ ^ij$ | ^abc$ ... (epoch 2); windows of 5 tokens, stride 4.
    expected = [
        ("^abc", "abc$", [0, 1, 2, 3], [0, 0, 0, 0]),
        ("$^de", "^def", [0, 0, 1, 2], [0, 1, 1, 1]),  # EOS fragment, then a new document
        ("fgh$", "gh$^", [0, 1, 2, 3], [0, 0, 0, 0]),  # continuation restarts at 0
        ("^ij$", "ij$^", [0, 1, 2, 3], [0, 0, 0, 0]),  # last label: next epoch's BOS
        ("^abc", "abc$", [0, 1, 2, 3], [0, 0, 0, 0]),
    ]
    for tokens, labels, positions, document_ids in expected:
        b = next(it)
        assert b["tokens"].tolist() == [ids(tokens)]
        assert b["labels"].tolist() == [ids(labels)]
        assert b["positions"].tolist() == [positions]
        assert b["document_ids"].tolist() == [document_ids]
    assert it.epoch == 1


def test_packing_invariants_random_corpus(tmp_path):
    docs = random_docs(30)
    src = FileSource([write_jsonl(tmp_path / "c.jsonl", docs)])
    S, B, steps = 16, 4, 20
    it = loader(src, seq_len=S, batch=B)
    stream = [t for d in docs * 3 for t in [BOS, *map(ord, d), EOS]]
    got = []
    for step in range(steps):
        b = next(it)
        assert all(v.shape == (B, S) and v.dtype == torch.int64 for v in b.values())
        for r in range(B):
            tok, lab = b["tokens"][r].tolist(), b["labels"][r].tolist()
            pos, doc = b["positions"][r].tolist(), b["document_ids"][r].tolist()
            start = (step * B + r) * S
            assert tok == stream[start : start + S] and lab == stream[start + 1 : start + S + 1]
            assert lab[:-1] == tok[1:]
            for i in range(S):
                new_doc = i > 0 and tok[i] == BOS
                assert pos[i] == (0 if i == 0 or new_doc else pos[i - 1] + 1)
                assert doc[i] == (0 if i == 0 else doc[i - 1] + new_doc)
            got.extend(tok)
    assert got == stream[: steps * B * S]  # nothing skipped, nothing repeated


def test_document_masking_off(tmp_path):
    src = FileSource([write_jsonl(tmp_path / "c.jsonl", ["abc", "defgh", "ij"])])
    b = next(loader(src, seq_len=8, batch=2, document_masking=False))
    assert b["positions"].tolist() == [list(range(8))] * 2
    assert "document_ids" not in b  # masking off: no document ids anywhere (one cached mask)
    assert b["tokens"][0].tolist() == ids("^abc$^de")


def test_long_document_spans_many_windows(tmp_path):
    src = FileSource([write_jsonl(tmp_path / "c.jsonl", ["x" * 50])])
    it = loader(src, seq_len=8, batch=3)
    b = next(it)
    assert b["positions"].tolist() == [list(range(8))] * 3
    assert b["document_ids"].sum() == 0


# ------------------------------------------------------------------------ data parallel
@pytest.mark.parametrize("shuffle", [False, True])
def test_same_global_batch_for_any_dp(tmp_path, shuffle):
    files = [write_jsonl(tmp_path / f"s{i}.jsonl", random_docs(7, seed=i)) for i in range(3)]
    B, S = 8, 12

    def source():
        return FileSource(files, shuffle=shuffle, seed=3)

    ref = loader(source(), S, B)
    ranks = {dp: [loader(source(), S, B, r, dp) for r in range(dp)] for dp in (2, 4, 8)}
    for _ in range(12):  # a few epochs' worth
        want = next(ref)
        for dp, loaders in ranks.items():
            parts = [next(it) for it in loaders]
            assert all(p["tokens"].shape == (B // dp, S) for p in parts)
            for k in want:
                assert torch.equal(torch.cat([p[k] for p in parts]), want[k]), (dp, k)
            assert {json.dumps(it.state_dict()) for it in loaders} == {json.dumps(ref.state_dict())}


def test_same_global_batch_embedded_real_tokenizer():
    from runtime.data import Tokenizer

    tok = Tokenizer.load()
    ref = build_dataloader(None, tok, 64, 4)
    halves = [build_dataloader(DataConfig(), tok, 64, 4, r, 2) for r in range(2)]
    for _ in range(3):
        want = next(ref)
        parts = [next(h) for h in halves]
        for k in want:
            assert torch.equal(torch.cat([p[k] for p in parts]), want[k])


def test_batch_not_divisible_by_dp(tmp_path):
    src = FileSource([write_jsonl(tmp_path / "c.jsonl", ["abc"])])
    with pytest.raises(ValueError, match=r"global_batch_size \(6\) is not divisible .*\(4\)"):
        loader(src, batch=6, dp=4)
    with pytest.raises(ValueError, match="dp_rank 2"):
        loader(src, batch=4, dp_rank=2, dp=2)


def test_split_microbatches(tmp_path):
    src = FileSource([write_jsonl(tmp_path / "c.jsonl", random_docs(5))])
    batch = next(loader(src, seq_len=8, batch=6))
    micro = split_microbatches(batch, 3)
    assert len(micro) == 3 and all(m["tokens"].shape == (2, 8) for m in micro)
    for k in batch:
        assert torch.equal(torch.cat([m[k] for m in micro]), batch[k])
    with pytest.raises(ValueError, match="cannot be split into 4"):
        split_microbatches(batch, 4)


# ------------------------------------------------------------------------------- state
def _resume_check(make, k: int, n: int, make_resumed=None):
    """Uninterrupted loader vs a fresh one loaded with the state after k steps."""
    full = make()
    for _ in range(k):
        next(full)
    sd = json.loads(json.dumps(full.state_dict()))  # must survive JSON
    resumed = (make_resumed or make)()
    resumed.load_state_dict(sd)
    for _ in range(n):
        a, b = next(full), next(resumed)
        for key in a:
            assert torch.equal(a[key], b[key]), (k, key)
    return sd


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_every_step_across_epochs(tmp_path, shuffle):
    files = [write_jsonl(tmp_path / f"s{i}.jsonl", random_docs(4, seed=i)) for i in range(3)]

    def make():
        return loader(FileSource(files, shuffle=shuffle, seed=7), seq_len=10, batch=2)

    epochs = set()
    for k in range(0, 40, 3):  # ~200 tokens per epoch: crosses several epoch boundaries
        sd = _resume_check(make, k, 6)
        assert set(sd) >= {"epoch", "shard", "index", "offset"}
        epochs.add(sd["epoch"])
    assert len(epochs) >= 3


def test_resume_embedded_shuffled_real_tokenizer():
    from runtime.data import Tokenizer

    tok = Tokenizer.load()
    cfg = DataConfig(shuffle=True, shuffle_seed=5)
    _resume_check(lambda: build_dataloader(cfg, tok, 128, 4), 5, 3)


def test_resume_with_different_dp(tmp_path):
    src = FileSource([write_jsonl(tmp_path / "c.jsonl", random_docs(9))])
    full = loader(src, 8, 4)
    for _ in range(5):
        next(full)
    sd = full.state_dict()
    ranks = [loader(src, 8, 4, r, 2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(sd)
    for _ in range(4):
        want, parts = next(full), [next(r) for r in ranks]
        assert torch.equal(torch.cat([p["tokens"] for p in parts]), want["tokens"])


def test_state_before_first_batch_and_changed_data(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["abcdefgh", "ij"])
    it = loader(FileSource([path]), seq_len=4)
    assert it.state_dict()["epoch"] == 0 and it.state_dict()["offset"] == 0
    next(it)
    sd = it.state_dict()
    assert (sd["index"], sd["offset"]) == (0, 4)
    write_jsonl(path, ["ab", "ij"])  # the document under the cursor got shorter
    resumed = loader(FileSource([path]), seq_len=4)
    resumed.load_state_dict(sd)
    with pytest.raises(ValueError, match="resume offset 4 is past the end"):
        next(resumed)


# -------------------------------------------------------------------------- shuffling
def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path):
    docs = [f"doc{i}" for i in range(20)]
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    a = first_texts(FileSource([path], shuffle=True, seed=1), 40)
    assert a == first_texts(FileSource([path], shuffle=True, seed=1), 40)
    assert a != first_texts(FileSource([path], shuffle=True, seed=2), 40)
    assert sorted(a[:20]) == sorted(docs) and sorted(a[20:]) == sorted(docs)
    assert a[:20] != a[20:] and a[:20] != docs
    assert first_texts(FileSource([path], shuffle=True, seed=-1), 5)  # any int seed works
    assert first_texts(FileSource([path]), 40) == docs * 2


# ---------------------------------------------------------------------------- formats
def test_jsonl_json_gz_and_text_key(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n{"text": ""}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"body": "three"}, {"body": "four"}]))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write('{"text": "five"}\n')
    assert first_texts(FileSource([tmp_path / "a.jsonl"]), 3) == ["one", "two", "one"]
    assert first_texts(FileSource([tmp_path / "b.json"], text_key="body"), 2) == ["three", "four"]
    assert first_texts(FileSource([tmp_path / "c.jsonl.gz"]), 1) == ["five"]
    src = build_source(_files(tmp_path / "b.json", text_key="body"))
    assert first_texts(src, 1) == ["three"]


def test_txt_is_one_document_per_file(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    (tmp_path / "b.md").write_text("# title\n")
    src = build_source(_files(tmp_path))
    assert first_texts(src, 3) == [
        "first paragraph\n\nsecond paragraph\n",
        "# title\n",
        "first paragraph\n\nsecond paragraph\n",
    ]


def test_directory_glob_and_list(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "b.jsonl", ["b"])
    write_jsonl(tmp_path / "a.jsonl", ["a"])
    write_jsonl(tmp_path / "sub" / "c.jsonl", ["c"])
    (tmp_path / "notes.csv").write_text("ignored in directories\n")
    (tmp_path / ".cache").mkdir()
    write_jsonl(tmp_path / ".cache" / "hidden.jsonl", ["hidden"])
    names = lambda files: [f.relative_to(tmp_path).as_posix() for f in files]  # noqa: E731
    assert names(resolve_files(str(tmp_path))) == ["a.jsonl", "b.jsonl", "sub/c.jsonl"]
    assert names(resolve_files(str(tmp_path / "*.jsonl"))) == ["a.jsonl", "b.jsonl"]
    assert names(resolve_files(str(tmp_path / "**" / "*.jsonl"))) == [
        "a.jsonl",
        "b.jsonl",
        "sub/c.jsonl",
    ]
    assert names(resolve_files([str(tmp_path / "sub"), str(tmp_path / "b.jsonl")])) == [
        "sub/c.jsonl",
        "b.jsonl",
    ]
    assert first_texts(build_source(_files(tmp_path)), 4) == ["a", "b", "c", "a"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"row {i}" for i in range(7)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": list(range(7)), "text": texts}), path, row_group_size=2)
    assert first_texts(build_source(_files(path)), 8) == texts + texts[:1]
    # Resuming inside the third row group decodes only from there.
    assert [t for _, t in read_parquet_docs(path, "text", start=5)] == texts[5:]
    with pytest.raises(ValueError, match=r"d\.parquet: no column 'body'"):
        first_texts(FileSource([path], text_key="body"), 1)
    it = build_dataloader(_files(path), CharTokenizer(), 6, 2)
    assert next(it)["tokens"][0].tolist() == ids("^row 0")


def test_embedded_corpus_with_real_tokenizer():
    from runtime.data import Tokenizer

    tok = Tokenizer.load()
    it = build_dataloader(DataConfig(), tok, 256, 8)
    b = next(it)
    assert b["tokens"].shape == (8, 256)
    assert int(b["tokens"][0, 0]) == tok.bos_id
    assert int(b["tokens"].max()) < tok.vocab_size and int(b["positions"].max()) < 256
    assert tok.decode(b["tokens"][0, 1:6]).startswith("The ")
    assert isinstance(EmbeddedSource().name, str)


# ----------------------------------------------------------------------------- errors
def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        build_source(_files(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"no files match .*\*\.parquet"):
        build_source(_files(tmp_path / "*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .* files under .*empty"):
        build_source(_files(tmp_path / "empty"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="x.csv: unsupported data file type"):
        build_source(_files(tmp_path / "x.csv"))


def test_empty_corpus(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text('\n{"text": ""}\n{"text": "  \\n"}\n')
    it = loader(FileSource([path]))
    with pytest.raises(ValueError, match="no non-empty documents in .*blank.jsonl"):
        next(it)


def test_missing_text_key_names_the_file(tmp_path):
    write_jsonl(tmp_path / "ok.jsonl", ["fine"])
    write_jsonl(tmp_path / "wrong.jsonl", ["x"], key="content")
    it = loader(build_source(_files(tmp_path)), seq_len=64)
    with pytest.raises(ValueError, match=r"wrong\.jsonl:1: no 'text' key \(keys: content\)"):
        next(it)
    (tmp_path / "ok.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"ok\.jsonl:1: 'text' is int"):
        first_texts(FileSource([tmp_path / "ok.jsonl"]), 1)
    (tmp_path / "ok.jsonl").write_text("{broken\n")
    with pytest.raises(ValueError, match=r"ok\.jsonl:1: invalid JSON"):
        first_texts(FileSource([tmp_path / "ok.jsonl"]), 1)


def test_hf_dataset_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="hf_dataset='some/corpus' needs the `datasets` package"):
        build_source(DataConfig(dataset="hf", hf_dataset="some/corpus"))
    with pytest.raises(ValueError, match="both dataset_path and hf_dataset are set"):
        build_source(DataConfig(dataset="", hf_dataset="some/corpus", dataset_path="/x"))
    with pytest.raises(ValueError, match="data.dataset is 'hf' but data.hf_dataset is empty"):
        build_source(DataConfig(dataset="hf"))
    with pytest.raises(ValueError, match="data.dataset is 'path' but data.dataset_path is empty"):
        build_source(DataConfig(dataset="path"))
    with pytest.raises(ValueError, match="data.dataset must be"):
        build_source(DataConfig(dataset="s3"))


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_dataset_local(tmp_path, monkeypatch, streaming):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [f"doc {i}" for i in range(6)])
    cfg = DataConfig(dataset="hf", hf_dataset=str(data), hf_split="train",
                     hf_streaming=streaming)
    assert first_texts(build_source(cfg), 7) == [f"doc {i}" for i in range(6)] + ["doc 0"]
    cfg.shuffle = True
    _resume_check(lambda: build_dataloader(cfg, CharTokenizer(), 5, 2), 4, 4)


def test_config_section_of_the_trainer_is_accepted():
    config = pytest.importorskip("runtime.train.config.schema")
    section = config.DataSection()
    assert build_source(section).name == "embedded corpus"
    for name in ("dataset", "dataset_path", "text_key", "hf_dataset", "hf_split", "document_mask"):
        assert hasattr(section, name) and hasattr(DataConfig, name), name


# ---------------------------------------------------------------- documents with loss masks
class MaskedSource(FileSource):
    """Items are texts; leading '*' characters are dropped and make that many tokens after BOS
    untrained (a chat prompt), BOS is never trained: documents carry a per-token mask."""

    def encoder(self, tokenizer):
        def encode(texts):
            docs = []
            for t in texts:
                prompt = len(t) - len(t.lstrip("*"))
                toks = np.array([BOS, *map(ord, t[prompt:]), EOS], dtype=np.int64)
                trained = np.arange(len(toks)) > prompt
                docs.append(Document(toks, trained))
            return docs

        return encode


def test_documents_with_per_token_loss_mask(tmp_path):
    # The mask is per token: a label is IGNORE_INDEX iff its token is untrained.
    src = MaskedSource([write_jsonl(tmp_path / "c.jsonl", ["*ab", "cd"])])
    it = loader(src, seq_len=4, batch=2)
    b = next(it)
    # stream: ^ a b $ ^ c d $ | ^ a ... with trained: F F T T F T T T | F F ...
    assert b["tokens"].tolist() == [ids("^ab$"), ids("^cd$")]
    assert b["labels"].tolist() == [[-100, *ids("b$"), -100], [*ids("cd$"), -100]]
    assert b["positions"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    # resumption carries the mask along
    _resume_check(lambda: loader(MaskedSource(src.files), seq_len=3, batch=2), 3, 5)


def test_show_command_prints_what_the_trainer_gets(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[2]
    path = write_jsonl(tmp_path / "c.jsonl", ["hello world", "second document"])
    cmd = [sys.executable, "-m", "runtime.data", "--config", str(root / "configs/debugmodel.toml"),
           "--data.dataset=path", f"--data.dataset_path={path}", "--training.seq_len=8",
           "--show", "3"]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"input_ids", "labels", "document_ids", "positions"}

    from runtime.data import Tokenizer
    from runtime.train.config.loader import load_config

    cfg = load_config(str(root / "configs/debugmodel.toml"),
                      ["--data.dataset=path", f"--data.dataset_path={path}", "--training.seq_len=8"])
    want = next(build_dataloader(cfg.data, Tokenizer.load(), 8, 3))
    assert [r["input_ids"] for r in rows] == want["tokens"].tolist()
    assert [r["labels"] for r in rows] == want["labels"].tolist()
    assert [r["positions"] for r in rows] == want["positions"].tolist()
    assert [r["document_ids"] for r in rows] == want["document_ids"].tolist()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("=== sample 0") and "hello world" in r.stdout
    r = subprocess.run(cmd[:5] + ["--data.dataset=path", f"--data.dataset_path={tmp_path}/no.jsonl",
                                  "--show", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no.jsonl does not exist" in r.stderr


# ------------------------------------------------------------------------- prepared data
def _mixed_files(tmp_path) -> list[Path]:
    """Several shards with blank lines, blank texts, a JSON array and a text file."""
    files = [write_jsonl(tmp_path / f"s{i}.jsonl", random_docs(5 + i, seed=i)) for i in range(3)]
    (tmp_path / "s1.jsonl").write_text((tmp_path / "s1.jsonl").read_text() + '\n{"text": " "}\n')
    (tmp_path / "t.json").write_text(json.dumps([{"text": "array one"}, {"text": ""},
                                                 {"text": "array three"}]))
    (tmp_path / "u.txt").write_text("a whole text file\n")
    return files + [tmp_path / "t.json", tmp_path / "u.txt"]


def _assert_same_batches(a, b, steps: int) -> None:
    for step in range(steps):
        x, y = next(a), next(b)
        for k in x:
            assert torch.equal(x[k], y[k]), (step, k)
        assert a.state_dict() == b.state_dict(), step


@pytest.mark.parametrize("shuffle", [False, True])
def test_prepared_data_equals_the_streamed_stream(tmp_path, shuffle):
    from runtime.data.prepared import PreparedDataset
    from runtime.data.preparing import prepare

    files = _mixed_files(tmp_path)
    source = FileSource(files, shuffle=shuffle, seed=11)
    meta = prepare(FileSource(files), TextEncoderOf(CharTokenizer()), tmp_path / "prep",
                   CharTokenizer(), batch_docs=3, file_tokens=50)  # several token files
    assert len(meta["token_files"]) > 2 and meta["dtype"] == "uint32" and not meta["masked"]
    prepared = PreparedDataset(tmp_path / "prep", shuffle=shuffle, seed=11)
    for dp in (1, 4):
        streamed = [loader(source, 6, 8, r, dp) for r in range(dp)]
        read = [loader(prepared, 6, 8, r, dp) for r in range(dp)]
        for s, p in zip(streamed, read):
            _assert_same_batches(s, p, 25)  # ~1000 tokens per epoch: several epochs
    # the state is the same cursor: either path resumes the other's checkpoint exactly
    for k in (0, 7, 19):
        _resume_check(lambda: loader(source, 6, 8), k, 5, lambda: loader(prepared, 6, 8))
        _resume_check(lambda: loader(prepared, 6, 8), k, 5, lambda: loader(source, 6, 8))


def TextEncoderOf(tokenizer):
    from runtime.data import TextEncoder

    return TextEncoder(tokenizer)


def test_prepared_data_keeps_loss_masks(tmp_path):
    from runtime.data.prepared import PreparedDataset
    from runtime.data.preparing import prepare

    path = write_jsonl(tmp_path / "c.jsonl", ["*ab", "cd", "**efg"])
    src = MaskedSource([path])
    meta = prepare(src, src.encoder(None), tmp_path / "prep", CharTokenizer())
    assert meta["masked"]
    _assert_same_batches(loader(MaskedSource([path]), 5, 3),
                         loader(PreparedDataset(tmp_path / "prep"), 5, 3), 12)


@pytest.mark.parametrize("shuffle", [False, True])
def test_embedded_default_is_prepared_and_unchanged(tmp_path, monkeypatch, shuffle):
    from runtime.data import Tokenizer
    from runtime.data.prepared import PreparedDataset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tok = Tokenizer.load()
    cfg = DataConfig(shuffle=shuffle, shuffle_seed=3 if shuffle else 0)
    fast = build_dataloader(cfg, tok, 1024, 128, 1, 2, prefetch=0)
    assert isinstance(fast.source, PreparedDataset)
    assert list((tmp_path / "gptoss-runtime" / "data").iterdir())  # prepared into the cache
    slow = ParallelAwareDataLoader(EmbeddedSource(shuffle, 3), tok, 1024, 128, 1, 2)
    _assert_same_batches(slow, fast, 7)  # 917k tokens: crosses into the second epoch
    assert fast.epoch == 1


def test_prefetch_thread_gives_the_same_batches_and_state(tmp_path):
    files = _mixed_files(tmp_path)
    ahead = loader(FileSource(files, shuffle=True), 6, 4, prefetch=3)
    plain = loader(FileSource(files, shuffle=True), 6, 4)
    _assert_same_batches(plain, ahead, 10)
    sd = ahead.state_dict()  # the state of the batches handed out, not of those produced
    ahead.load_state_dict(sd)
    _assert_same_batches(plain, ahead, 5)
    ahead.close()
    _assert_same_batches(plain, ahead, 3)  # closing rewinds to the handed-out position
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{oops\n')
    failing = loader(FileSource([broken]), 64, 2, prefetch=2)
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: invalid JSON"):
        next(failing)


# ------------------------------------------------------------------ one [data] schema
def test_data_section_is_the_data_schema_and_shuffle_seed_works(tmp_path):
    from runtime.train.config.loader import load_config
    from runtime.train.config.schema import JobConfig

    assert JobConfig().data.__class__ is DataConfig  # one schema for the [data] keys
    files = [write_jsonl(tmp_path / f"s{i}.jsonl", [f"f{i} d{j}" for j in range(6)])
             for i in range(3)]
    glob = str(tmp_path / "*.jsonl")

    def run(*overrides, steps=8, resume_at=None):
        cfg = load_config(None, [f"--data.dataset=path", f"--data.dataset_path={glob}",
                                 *overrides])
        it = build_dataloader(cfg.data, CharTokenizer(), 8, 2, prefetch=cfg.data.prefetch)
        out = []
        for step in range(steps):
            if step == resume_at:  # a fresh loader from the saved state: exact resume
                sd = json.loads(json.dumps(it.state_dict()))
                it.close()
                it = build_dataloader(cfg.data, CharTokenizer(), 8, 2)
                it.load_state_dict(sd)
            out.append(next(it)["tokens"].tolist())
        return out

    plain = run()
    assert run("--data.shuffle=true", "--data.shuffle_seed=1") == run(
        "--data.shuffle=true", "--data.shuffle_seed=1")
    assert run("--data.shuffle=true", "--data.shuffle_seed=1") != run(
        "--data.shuffle=true", "--data.shuffle_seed=2")
    assert run("--data.shuffle=true", "--data.shuffle_seed=1") != plain
    for at in (1, 5):
        assert run("--data.shuffle=true", "--data.shuffle_seed=3", resume_at=at) == run(
            "--data.shuffle=true", "--data.shuffle_seed=3")
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="--data.shuffle_seed has no effect unless data.shuffle"):
        load_config(None, ["--data.shuffle_seed=4"])
    with pytest.raises(ConfigError, match="--data.dataset_path is set but data.dataset = 'embedded' never reads"):
        load_config(None, [f"--data.dataset_path={glob}"])


# ------------------------------------------- bad data / tokenizer: one line, exit 2, nothing built
BAD_INPUTS = ["missing dataset_path", "invalid JSONL line", "wrong text key", "empty file",
              "binary data", "bad UTF-8 deep in a file", "missing tokenizer", "invalid tokenizer", "not prepared data"]


def _bad_inputs(tmp: Path) -> dict:
    (tmp / "bad_line.jsonl").write_text('{"text": "ok"}\n{"text": "fine"}\n{oops\n')
    (tmp / "wrong_key.jsonl").write_text('{"body": "x"}\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfa" * 50)
    (tmp / "deep.jsonl").write_bytes(b'{"text": "fine"}\n' * 39 + b'{"text": "caf\xe9"}\n'
                                     + b'{"text": "fine"}\n' * 3000)
    (tmp / "tokenizer.json").write_text("{not json")
    path = ["--data.dataset=path", "--data.dataset_path"]
    return {
        "missing dataset_path": ([f"{path[0]}", f"{path[1]}={tmp}/nope.jsonl"],
                                 f"{tmp}/nope.jsonl does not exist"),
        "invalid JSONL line": ([path[0], f"{path[1]}={tmp}/bad_line.jsonl"],
                               f"{tmp}/bad_line.jsonl:3: invalid JSON"),
        "wrong text key": ([path[0], f"{path[1]}={tmp}/wrong_key.jsonl"],
                           f"{tmp}/wrong_key.jsonl:1: no 'text' key (keys: body)"),
        "empty file": ([path[0], f"{path[1]}={tmp}/empty.jsonl"], f"{tmp}/empty.jsonl: empty file"),
        "binary data": ([path[0], f"{path[1]}={tmp}/binary.jsonl"],
                        f"{tmp}/binary.jsonl:1: not UTF-8 text (binary data?)"),
        "bad UTF-8 deep in a file": ([path[0], f"{path[1]}={tmp}/deep.jsonl"],
                                     f"{tmp}/deep.jsonl:40: not UTF-8 text (binary data?): "
                                     "invalid continuation byte at byte 13 of the line"),
        "missing tokenizer": ([f"--model.tokenizer_path={tmp}/none"],
                              f"tokenizer: path does not exist: {tmp}/none"),
        "invalid tokenizer": ([f"--model.tokenizer_path={tmp}/tokenizer.json"],
                              f"tokenizer: cannot load {tmp}/tokenizer.json"),
        "not prepared data": (["--data.dataset=prepared", f"--data.dataset_path={tmp}"],
                              f"{tmp}/meta.json: missing; {tmp} is not prepared data"),
    }


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_data_or_tokenizer_is_one_line_exit_2_before_the_model(tmp_path, case):
    import subprocess

    root = Path(__file__).resolve().parents[2]
    overrides, message = _bad_inputs(tmp_path)[case]
    r = subprocess.run(
        [sys.executable, "-m", "runtime.train", "--config", str(root / "configs/debugmodel.toml"),
         f"--job.dump_folder={tmp_path}/out", "--checkpoint.enable=false", *overrides],
        capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
             "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert message in r.stderr, r.stderr
    assert "parameters" not in r.stdout and "Traceback" not in r.stderr  # no model was built


def test_bad_record_met_mid_run_is_one_line_exit_2(tmp_path):
    """The pre-flight check reads the head of each file; a bad record further on is met while
    training (by the prefetch thread): still one line naming file:line, exit 2."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    lines = [json.dumps({"text": f"document {i} with a few words"}) for i in range(150)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines + ["{not json"]) + "\n")
    r = subprocess.run(
        [sys.executable, "-m", "runtime.train", "--config", str(root / "configs/debugmodel.toml"),
         f"--job.dump_folder={tmp_path}/out", "--checkpoint.enable=false", "--data.dataset=path",
         f"--data.dataset_path={tmp_path}/d.jsonl", "--training.steps=40",
         "--training.seq_len=64", "--training.local_batch_size=2"],
        capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
             "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr == f"error: {tmp_path}/d.jsonl:151: invalid JSON: " + r.stderr.split(
        "invalid JSON: ", 1)[1], r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "step      1" in r.stdout  # it was met mid-run, after training started


def test_prepare_and_bench_commands(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[2]
    write_jsonl(tmp_path / "a.jsonl", random_docs(40, seed=1))
    write_jsonl(tmp_path / "b.jsonl", random_docs(30, seed=2))
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    base = [sys.executable, "-m", "runtime.data"]
    cfg = ["--config", str(root / "configs/debugmodel.toml"), "--training.seq_len=16",
           "--data.shuffle=true", "--data.shuffle_seed=9"]
    files = ["--data.dataset=path", f"--data.dataset_path={tmp_path}/*.jsonl"]
    prep = ["--data.dataset=prepared", f"--data.dataset_path={tmp_path}/prep"]

    def run(*args):
        r = subprocess.run([*base, *args], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert "prepared 70 documents" in run("prepare", *cfg, *files, "--out", f"{tmp_path}/prep")
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert meta["source"] == "2 files" and meta["dtype"] == "uint16"
    assert not any(p.suffix == ".pkl" for p in (tmp_path / "prep").iterdir())
    # the prepared copy gives the trainer exactly the streamed samples (shuffled too)
    assert run(*cfg, *prep, "--show", "12", "--json") == run(*cfg, *files, "--show", "12", "--json")
    out = run(*cfg, *prep, "--bench", "5", "--dp-degree", "4", "--dp-rank", "3")
    assert "rank 3 of 4" in out and float(out.strip().splitlines()[-1].split()[1]) > 0
    assert out.strip().splitlines()[-1].startswith("ms/step ")
    r = subprocess.run([*base, "prepare", *cfg, *files, "--out", f"{tmp_path}/prep"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "prep: already exists" in r.stderr


def test_prepared_data_refuses_another_tokenizer(tmp_path):
    from runtime.data import Tokenizer
    from runtime.errors import DataError
    from runtime.data.prepared import PreparedDataset
    from runtime.data.preparing import prepare

    tok = Tokenizer.load()
    path = write_jsonl(tmp_path / "c.jsonl", ["some text", "more text"])
    prepare(FileSource([path]), TextEncoderOf(tok), tmp_path / "prep", tok)
    PreparedDataset(tmp_path / "prep").check_tokenizer(tok)
    other = Tokenizer.load(eos="<|pad|>")  # other ids for the same text
    with pytest.raises(DataError, match=r"prep: prepared with tokenizer .* this run's is"):
        PreparedDataset(tmp_path / "prep").check_tokenizer(other)
    (tmp_path / "prep" / "doc_offsets.npy").write_bytes(b"\x80\x04garbage")  # a planted pickle
    with pytest.raises(DataError, match=r"doc_offsets\.npy: unreadable"):
        PreparedDataset(tmp_path / "prep")


def test_embedded_cache_unwritable(tmp_path, monkeypatch):
    from runtime.data import Tokenizer
    from runtime.errors import DataError

    blocked = tmp_path / "a_file"
    blocked.write_text("folders cannot be made under a file, even by root")
    tok = Tokenizer.load()
    with pytest.raises(DataError, match=r"data.cache_dir .*a_file/c: cannot write"):
        build_dataloader(DataConfig(cache_dir=str(blocked / "c")), tok, 16, 1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # default cache unwritable: tmp instead
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert next(build_dataloader(None, tok, 16, 1))["tokens"].shape == (1, 16)
    assert list((tmp_path / "tmp" / "gptoss-runtime-data").iterdir())


# ------------------------------------------------- prepared data is verified, never trusted
ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict:
    return {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
            "XDG_CACHE_HOME": str(tmp_path / "cache")}


def _prepared_copy(src: Path, dst: Path, damage: bytes, at: int, version: int = 3) -> Path:
    """A copy of the prepared folder `src` with `damage` written into its token file at byte
    `at`; version 2: the older format without checksums (the damage cannot be seen)."""
    import shutil

    shutil.copytree(src, dst)
    with open(dst / "tokens-00000.bin", "r+b") as f:
        f.seek(at)
        f.write(damage)
    if version == 2:
        meta = json.loads((dst / "meta.json").read_text())
        meta["version"] = 2
        del meta["files"]
        (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def test_damaged_prepared_data_is_one_line_exit_2(tmp_path):
    """40 KB zeroed in a token file (same size): the checksum names it before the model is
    built; 0xFF ids in a folder without checksums (format 2): one line naming the file and
    the byte offset at the first read, never an IndexError in the embedding."""
    import subprocess

    from runtime.data import Tokenizer
    from runtime.errors import DataError
    from runtime.data.prepared import PreparedDataset
    from runtime.data.preparing import prepare

    tok = Tokenizer.load()
    docs = write_jsonl(tmp_path / "d.jsonl", [" ".join(random_docs(30, seed=i)) for i in range(120)])
    prepare(FileSource([docs]), TextEncoderOf(tok), tmp_path / "prep", tok)
    size = (tmp_path / "prep" / "tokens-00000.bin").stat().st_size
    assert size > 80_000, size
    PreparedDataset(tmp_path / "prep").verify()  # negative control: intact
    zeroed = _prepared_copy(tmp_path / "prep", tmp_path / "zeroed", bytes(40960), size // 4)
    ff = _prepared_copy(tmp_path / "prep", tmp_path / "ff", b"\xff" * 64, 64, version=2)
    # the checksums are split over the ranks: exactly one rank of three reads the token file
    failed = 0
    for rank in range(3):
        try:
            PreparedDataset(zeroed).verify(rank, 3)
        except DataError as e:
            assert "tokens-00000.bin fails its checksum" in str(e)
            failed += 1
    assert failed == 1

    def train(path: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "runtime.train", "--config",
             str(ROOT / "configs/debugmodel.toml"), f"--job.dump_folder={path}-out",
             "--checkpoint.enable=false", "--data.dataset=prepared",
             f"--data.dataset_path={path}", "--training.steps=2", "--training.seq_len=64",
             "--training.local_batch_size=2", "--data.prefetch=0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))

    runs = {p: train(p) for p in (zeroed, ff)}  # in parallel: two interpreters start at once
    out = {p: r.communicate(timeout=300) for p, r in runs.items()}
    for p, r in runs.items():
        assert r.returncode == 2, out[p]
        assert out[p][1].count("\n") == 1 and out[p][1].startswith("error: "), out[p]
        assert "Traceback" not in out[p][1] and not (p.parent / f"{p.name}-out" / ".lock").exists()
    assert out[zeroed][1] == (f"error: {zeroed}: tokens-00000.bin fails its checksum (damaged "
                              f"prepared data; prepare it again)\n")
    assert "parameters" not in out[zeroed][0]  # refused before the model was built
    assert f"data: verifying the checksums of the prepared train data ({zeroed}) ..." in out[zeroed][0]
    assert f"warning: {ff}: prepared by an older version without checksums" in out[ff][0]
    assert out[ff][1] == (f"error: {ff}/tokens-00000.bin: token id 65535 at byte offset 64 "
                          f"(token 32) is outside the vocabulary (8192): damaged prepared "
                          f"data; prepare it again\n"), out[ff]


def test_two_prepares_into_one_folder(tmp_path):
    """The second `prepare` into a folder another one is writing prints one line (exit 2) at
    once; the first one's folder is complete and intact. Deterministic: the writer is held
    inside its write (on a FIFO) until the loser has finished."""
    import os
    import subprocess
    import textwrap

    from runtime.data.prepared import PreparedDataset

    write_jsonl(tmp_path / "d.jsonl", random_docs(50, seed=3))
    out, fifo = tmp_path / "prep", tmp_path / "go"
    os.mkfifo(fifo)
    args = ["prepare", "--config", str(ROOT / "configs/debugmodel.toml"), "--data.dataset=path",
            f"--data.dataset_path={tmp_path}/d.jsonl", "--out", str(out)]
    winner_code = textwrap.dedent(f"""
        import sys
        import runtime.data.preparing as preparing
        from runtime.data_cli import main
        publish = preparing._publish
        def held(*args):
            print("WRITING", flush=True)  # the lock is held now
            open({str(fifo)!r}).read()  # until the test writes the FIFO
            return publish(*args)
        preparing._publish = held
        sys.exit(main(sys.argv[1:]))""")
    loser_code = ("import sys\nfrom runtime.data_cli import main\nsys.stdin.readline()\n"
                  "sys.exit(main(sys.argv[1:]))")  # started early: waits for its cue
    popen = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    winner = subprocess.Popen([sys.executable, "-c", winner_code, *args], **popen)
    loser = subprocess.Popen([sys.executable, "-c", loser_code, *args], stdin=subprocess.PIPE,
                             **popen)
    try:
        assert winner.stdout.readline() == "WRITING\n", winner.communicate(timeout=60)
        lost = loser.communicate("go\n", timeout=300)
        assert loser.returncode == 2, lost
        assert lost[1].startswith(f"error: {out}: another prepare (pid {winner.pid} on "), lost
        assert lost[1].endswith(" is writing it; wait for it to finish or choose another "
                                "output folder\n") and lost[1].count("\n") == 1, lost
        with open(fifo, "w") as f:
            f.write("go")
        won = winner.communicate(timeout=300)
        assert winner.returncode == 0, won
    finally:
        winner.kill(), loser.kill()
    PreparedDataset(out).verify()  # complete: every file matches its checksum
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "go", "prep"]
