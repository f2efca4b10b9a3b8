"""The embedded tokenizer and the `Tokenizer` wrapper (file / directory forms, specials)."""

from __future__ import annotations

import json
import platform
import shutil
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from runtime.data.tokenizer import EMBEDDED_TOKENIZER, Tokenizer

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "runtime" / "assets"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a socket")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_embedded_loads_offline(no_network):
    t = Tokenizer.load("")
    assert t.vocab_size == 8192
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2)
    assert t.token_to_id("<|startoftext|>") == t.bos_id
    assert t.token_to_id("<|endoftext|>") == t.eos_id
    assert t.token_to_id("<|pad|>") == t.pad_id


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading spaces and\ttabs\nnew lines\n\n",
        "def f(x):\n    return x ** 2  # squares",
        "unicode: café, naïve, 日本語, emoji 🙂",
        "",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_encode_adds_no_specials_and_compresses(tok):
    text = "The assert statement is a convenient way to insert debugging assertions."
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert len(ids) < len(text) / 3  # a trained BPE, not bytes


def test_special_strings_in_text_are_plain_text(tok):
    text = "a <|endoftext|> b <|startoftext|>"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.bos_id not in ids
    assert tok.decode(ids) == text
    special = tok.encode(text, allow_special=True)
    assert tok.eos_id in special and tok.bos_id in special
    # The default is restored afterwards.
    assert tok.encode(text) == ids


def test_encode_batch_matches_encode(tok):
    texts = ["one document", "another, longer document with more words", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_decode_accepts_tensors(tok):
    import torch

    ids = tok.encode("tensor input")
    assert tok.decode(torch.tensor(ids)) == "tensor input"


def test_file_form(tmp_path):
    p = tmp_path / "my.json"
    shutil.copy(EMBEDDED_TOKENIZER, p)
    t = Tokenizer.load(str(p))
    assert t.vocab_size == 8192 and t.source == str(p)


def _hf_dir(tmp_path: Path, **configs) -> Path:
    """A checkpoint-like directory: the embedded tokenizer (which has gpt-oss's harmony
    tokens) with two more added tokens, and configs."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(EMBEDDED_TOKENIZER))
    hf.add_special_tokens(["<|reserved_a|>", "<|reserved_b|>"])
    d = tmp_path / "ckpt"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    for name, content in configs.items():
        (d / f"{name}.json").write_text(json.dumps(content))
    return d


def test_directory_form_reads_tokenizer_config(tmp_path, no_network):
    d = _hf_dir(
        tmp_path,
        tokenizer_config={
            "bos_token": "<|startoftext|>",
            "eos_token": {"content": "<|return|>", "special": True},  # AddedToken form
            "pad_token": "<|endoftext|>",
        },
    )
    t = Tokenizer.load(str(d))
    assert t.vocab_size == 8194  # added tokens count
    assert t.bos_id == t.token_to_id("<|startoftext|>")
    assert t.eos_id == t.token_to_id("<|return|>")
    assert t.pad_id == t.token_to_id("<|endoftext|>")
    # Explicit overrides win (e.g. end-of-text as the pre-training document separator).
    assert Tokenizer.load(str(d), eos="<|endoftext|>").eos_id == 1


def test_directory_form_special_tokens_map_and_generation_config(tmp_path):
    d = _hf_dir(
        tmp_path,
        special_tokens_map={"eos_token": "<|return|>"},
        generation_config={"bos_token_id": 0, "eos_token_id": [8193, 1]},
    )
    t = Tokenizer.load(str(d))
    assert t.eos_id == t.token_to_id("<|return|>")  # special_tokens_map before generation_config
    assert t.bos_id == 0


def test_directory_form_generation_config_ids(tmp_path):
    d = _hf_dir(tmp_path, generation_config={"eos_token_id": [8192, 1], "pad_token_id": 1})
    t = Tokenizer.load(str(d))
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 8192, 1)  # first stop id is the EOS


def test_directory_form_defaults_without_configs(tmp_path):
    t = Tokenizer.load(str(_hf_dir(tmp_path)))
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2)


def test_missing_paths_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: .*nope"):
        Tokenizer.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in directory .*empty"):
        Tokenizer.load(str(tmp_path / "empty"))


def test_bad_file_and_unknown_special(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot load .*tokenizer.json"):
        Tokenizer.load(str(bad))
    d = _hf_dir(tmp_path, tokenizer_config={"eos_token": "<|missing|>"})
    with pytest.raises(ValueError, match="eos token '<\\|missing\\|>' is not in the vocabulary"):
        Tokenizer.load(str(d))


def test_assets_are_present_and_documented():
    manifest = json.loads((ASSETS / "manifest.json").read_text())
    assert manifest["vocab_size"] == 8192
    # Enough text for ~200 steps of 8 x 256 tokens without repeating an epoch.
    assert manifest["tokens"] > 200 * 8 * 256
    readme = (ASSETS / "README.md").read_text()
    assert "PSF" in readme and (ASSETS / "LICENSE-PSF.txt").is_file()


def test_build_assets_is_reproducible():
    """A rebuild matches the shipped files byte for byte (same CPython/tokenizers/zlib only)."""
    import tokenizers

    manifest = json.loads((ASSETS / "manifest.json").read_text())
    same = (manifest["python"], manifest["tokenizers"], manifest["zlib"]) == (
        platform.python_version(),
        tokenizers.__version__,
        zlib.ZLIB_RUNTIME_VERSION,
    )
    if not same:
        pytest.skip("assets were built with another CPython / tokenizers / zlib")
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_assets.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr


HARMONY = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>",
           "<|constrain|>"]


def test_harmony_tokens_are_single_special_tokens(tok):
    ids = [tok.token_to_id(name) for name in HARMONY]
    assert all(i is not None and i < 8192 for i in ids) and len(set(ids)) == len(ids)
    text = "<|start|>assistant<|channel|>final<|message|>4<|return|>"
    encoded = tok.encode(text, allow_special=True)
    assert [i for i in encoded if i in ids] == [ids[0], ids[3], ids[2], ids[4]]
    assert tok.decode(encoded) == text
    # Plain-text encoding never produces them: they took byte slots UTF-8 cannot contain.
    assert not set(tok.encode(text)) & set(ids)


def test_harmony_tokens_leave_text_tokenization_unchanged(tok):
    """Every byte valid UTF-8 can hold still has its own token, and the manifest's corpus
    token count (written when the tokenizer had no harmony tokens) still holds."""
    import gzip

    manifest = json.loads((ASSETS / "manifest.json").read_text())
    assert manifest["tokens"] == 672000
    with gzip.open(ASSETS / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    assert sum(len(ids) for ids in tok.encode_batch(docs)) == manifest["tokens"]
    every_char = "".join(chr(c) for c in (*range(32, 0x3000, 7), 0x1F600, 0x10FFFF))
    assert tok.decode(tok.encode(every_char)) == every_char

