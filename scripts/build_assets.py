#!/usr/bin/env python
"""Regenerate the embedded corpus and tokenizer under runtime/assets/.

    python scripts/build_assets.py            # rebuild corpus.jsonl.gz + tokenizer.json
    python scripts/build_assets.py --check    # rebuild in memory, fail if the files differ

The corpus is real English technical prose taken from the running CPython's own
standard library (PSF license, no network needed):

  1. the Python language reference topics that `help()` shows (`pydoc_data/topics.py`),
     one document per topic;
  2. the docstrings of every stdlib module (read with `ast`, nothing is imported),
     one document per module: module docstring, then each class / function signature
     followed by its docstring.

Everything is sorted and the gzip header carries no timestamp or name, so the output is
byte-identical for a given CPython version (the assets README records which one).
The tokenizer is a byte-level BPE trained on that corpus with exactly 8192 entries
(the debugmodel vocab size), special tokens included. The harmony chat tokens of gpt-oss
(`<|start|>`, `<|message|>`, ...) then take the ids of byte tokens that valid UTF-8 never
contains (0xF5-0xFB), so chat data renders to single special tokens while every Python
string still tokenizes exactly as the trained BPE does (see `add_harmony_specials`).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "runtime" / "assets"
VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|pad|>"]  # ids 0, 1, 2
# gpt-oss's harmony chat tokens (o200k_harmony names), added after training.
HARMONY_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>",
                  "<|constrain|>"]
# Bytes that never occur in UTF-8 (RFC 3629: 0xC0, 0xC1, 0xF5-0xFF); the harmony tokens
# replace the first seven of 0xF5-0xFF, which the corpus therefore cannot contain either.
HARMONY_BYTES = list(range(0xF5, 0xF5 + len(HARMONY_TOKENS)))

# Test suites and vendored encodings tables are not prose; site-packages is not stdlib.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings"}


# ----------------------------------------------------------------------------- corpus
def topic_documents() -> list[str]:
    import pydoc_data.topics as topics

    return [topics.topics[name].strip() for name in sorted(topics.topics)]


def _signature(node: ast.AST, qual: str) -> str:
    name = qual + node.name
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {name}({bases})" if bases else f"class {name}"
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {name}({ast.unparse(node.args)})"


def _docstring_entries(body: list[ast.stmt], qual: str) -> list[str]:
    # Depth-first in source order so a method follows its class.
    out = []
    for node in body:
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if doc:
            out.append(f"{_signature(node, qual)}\n{doc.strip()}")
        if isinstance(node, ast.ClassDef):
            out.extend(_docstring_entries(node.body, f"{qual}{node.name}."))
    return out


def module_documents(stdlib: Path) -> list[str]:
    docs = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = Path(root) / name
            rel = path.relative_to(stdlib).with_suffix("")
            module = ".".join(p for p in rel.parts if p != "__init__") or rel.name
            if module.startswith("pydoc_data"):
                continue  # already the topic documents
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few lib2to3 fixtures are deliberately broken
            parts = []
            mod_doc = ast.get_docstring(tree)
            if mod_doc:
                parts.append(mod_doc.strip())
            parts.extend(_docstring_entries(tree.body, ""))
            if parts:
                docs.append(f"Module {module}\n\n" + "\n\n".join(parts))
    return docs


def build_corpus(stdlib: Path) -> list[str]:
    return [d for d in topic_documents() + module_documents(stdlib) if d.strip()]


def corpus_bytes(docs: list[str]) -> bytes:
    raw = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    buf = io.BytesIO()
    # mtime=0 and an empty filename keep the gzip header reproducible.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(raw.encode("utf-8"))
    return buf.getvalue()


# -------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[str]) -> bytes:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != VOCAB_SIZE:
        raise SystemExit(f"tokenizer has {size} entries, expected {VOCAB_SIZE}: corpus too small?")
    return add_harmony_specials(tok.to_str(pretty=False))


def _byte_level_char(byte: int) -> str:
    """The character the byte-level pre-tokenizer maps `byte` to (GPT-2's bytes_to_unicode:
    printable Latin-1 bytes stand for themselves, the others for 256, 257, ... in order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    if byte in printable:
        return chr(byte)
    return chr(256 + [b for b in range(256) if b not in printable].index(byte))


def add_harmony_specials(tokenizer_json: str) -> bytes:
    """Give the harmony tokens the ids of byte tokens no Python string can produce.

    A `str` always encodes to valid UTF-8, which never contains 0xF5-0xFF, and BPE never
    learnt a merge containing them (the corpus is text), so dropping those vocab entries
    changes the tokenization of no text; the vocabulary stays 8192 (the debugmodel's)."""
    data = json.loads(tokenizer_json)
    vocab = data["model"]["vocab"]
    for byte, name in zip(HARMONY_BYTES, HARMONY_TOKENS, strict=True):
        char = _byte_level_char(byte)
        if any(char in part for merge in data["model"]["merges"] for part in merge):
            raise SystemExit(f"byte 0x{byte:02X} occurs in a merge: it is not free for {name}")
        # The name takes the byte's vocab slot (as the trainer does for its specials): the
        # added-token table then finds it at that id instead of appending it past the end.
        token_id = vocab.pop(char)
        vocab[name] = token_id
        data["added_tokens"].append({"id": token_id, "content": name, "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": False,
                                     "special": True})
    data["added_tokens"].sort(key=lambda t: t["id"])
    return (json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def manifest_bytes(docs: list[str], outputs: dict[str, bytes]) -> bytes:
    """What was built from what: lets tests know when a rebuild must match byte for byte."""
    import zlib

    import tokenizers
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(outputs["tokenizer.json"].decode("utf-8"))
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(docs, add_special_tokens=False))
    manifest = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "tokenizers": tokenizers.__version__,
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "documents": len(docs),
        "characters": sum(len(d) for d in docs),
        "tokens": n_tokens,  # without BOS/EOS
        "vocab_size": VOCAB_SIZE,
        "special_tokens": SPECIAL_TOKENS,
        "harmony_tokens": {name: tok.token_to_id(name) for name in HARMONY_TOKENS},
        "sha256": {
            name: hashlib.sha256(data).hexdigest() for name, data in sorted(outputs.items())
        },
    }
    return (json.dumps(manifest, indent=2) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="CPython Lib/ dir")
    ap.add_argument("--out", default=str(ASSETS), help="output directory")
    ap.add_argument("--check", action="store_true", help="fail if the files on disk differ")
    args = ap.parse_args(argv)
    # The Rust trainer is deterministic, but pin one thread anyway: it is cheap here.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")

    stdlib = Path(args.stdlib)
    docs = build_corpus(stdlib)
    outputs = {
        "corpus.jsonl.gz": corpus_bytes(docs),
        "tokenizer.json": train_tokenizer(docs),
        "LICENSE-PSF.txt": (stdlib / "LICENSE.txt").read_bytes(),
    }
    outputs["manifest.json"] = manifest_bytes(docs, outputs)
    out = Path(args.out)
    print(f"CPython {platform.python_version()} stdlib at {stdlib}")
    print(f"{len(docs)} documents, {sum(len(d) for d in docs)} characters")
    stale = []
    for name, data in outputs.items():
        digest = hashlib.sha256(data).hexdigest()
        print(f"{name}: {len(data)} bytes sha256 {digest}")
        path = out / name
        if args.check:
            if not path.exists() or path.read_bytes() != data:
                stale.append(name)
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    if stale:
        print(f"stale assets (rebuild with this script): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
