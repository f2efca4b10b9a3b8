"""`Tokenizer`: a thin wrapper around HF `tokenizers.Tokenizer` that knows its BOS/EOS/pad.

    Tokenizer.load("")                 # the embedded 8192-entry BPE (runtime/assets/tokenizer.json)
    Tokenizer.load("tok.json")         # any tokenizer.json file
    Tokenizer.load("/ckpt/gpt-oss-20b") # a directory holding tokenizer.json (an HF checkpoint)

Only local files are read: nothing here touches the network.

Special tokens of a directory come from, in order: `tokenizer_config.json`,
`special_tokens_map.json`, `generation_config.json` (ids), then the default names
`<|startoftext|>` / `<|endoftext|>` / `<|pad|>`. For gpt-oss that gives BOS
`<|startoftext|>`, EOS `<|return|>` (tokenizer_config) and pad `<|endoftext|>`.
The data pipeline separates packed documents with `eos_id`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from runtime.errors import DataError, DataFileNotFoundError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_TOKENIZER = ASSETS_DIR / "tokenizer.json"

DEFAULT_BOS = "<|startoftext|>"
DEFAULT_EOS = "<|endoftext|>"
DEFAULT_PAD = "<|pad|>"


def _token_name(value) -> str | None:
    # tokenizer_config.json stores either "<|x|>" or a serialized AddedToken {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot parse {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _first_id(value) -> int | None:
    # generation_config.json may list several stop ids; the first is the primary one.
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Tokenizer:
    """Byte-level BPE with explicit special-token ids.

    `encode` never adds specials and, by default, treats special-token strings that occur
    in raw text (e.g. a document quoting "<|endoftext|>") as plain text, so data cannot
    inject a document boundary.
    """

    def __init__(self, tok, *, bos: str | int, eos: str | int, pad: str | int | None, source: str,
                 file_sha256: str = ""):
        self._tok = tok
        self.source = source
        self._file_sha256 = file_sha256
        self.directory = ""  # the checkpoint directory it came from (chat template, configs)
        self.bos_id = self._resolve(bos, "bos")
        self.eos_id = self._resolve(eos, "eos")
        # Packing never pads; pad_id only matters for callers that do (falls back to EOS).
        self.pad_id = self._resolve(pad, "pad") if pad is not None else self.eos_id
        self._set_split_specials(True)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        path: str = "",
        *,
        bos: str | None = None,
        eos: str | None = None,
        pad: str | None = None,
    ) -> "Tokenizer":
        """ "" = embedded; a tokenizer.json file; or a directory containing tokenizer.json.

        bos/eos/pad (token strings) override what the directory's configs say, e.g.
        eos="<|endoftext|>" to separate pre-training documents of gpt-oss with its
        end-of-text token rather than the chat `<|return|>`."""
        if not path:
            file, meta_dir = EMBEDDED_TOKENIZER, None
            if not file.is_file():
                raise DataFileNotFoundError(
                    f"embedded tokenizer missing: {file} (run scripts/build_assets.py)"
                )
        else:
            p = Path(path).expanduser()
            if p.is_dir():
                file, meta_dir = p / "tokenizer.json", p
                if not file.is_file():
                    raise DataFileNotFoundError(f"tokenizer: no tokenizer.json in directory {p}")
            elif p.is_file():
                file, meta_dir = p, None
            else:
                raise DataFileNotFoundError(f"tokenizer: path does not exist: {p}")
        try:
            raw = file.read_bytes()
            tok = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the Rust error type is not importable by name
            reason = " ".join(str(e).split()) or type(e).__name__
            raise DataError(f"tokenizer: cannot load {file}: {reason}") from None
        found = cls._special_names(meta_dir, tok)
        bos, eos, pad = (
            o if o is not None else f for o, f in zip((bos, eos, pad), found, strict=True)
        )
        loaded = cls(tok, bos=bos, eos=eos, pad=pad, source=str(file),
                     file_sha256=hashlib.sha256(raw).hexdigest())
        loaded.directory = str(meta_dir) if meta_dir is not None else ""
        return loaded

    @staticmethod
    def _special_names(meta_dir: Path | None, tok) -> tuple:
        bos = eos = pad = None
        if meta_dir is not None:
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                cfg = _read_json(meta_dir / name)
                bos = bos or _token_name(cfg.get("bos_token"))
                eos = eos or _token_name(cfg.get("eos_token"))
                pad = pad or _token_name(cfg.get("pad_token"))
            gen = _read_json(meta_dir / "generation_config.json")
            bos = bos if bos is not None else _first_id(gen.get("bos_token_id"))
            eos = eos if eos is not None else _first_id(gen.get("eos_token_id"))
            pad = pad if pad is not None else _first_id(gen.get("pad_token_id"))
        bos = bos if bos is not None else DEFAULT_BOS
        eos = eos if eos is not None else DEFAULT_EOS
        if pad is None and tok.token_to_id(DEFAULT_PAD) is not None:
            pad = DEFAULT_PAD
        return bos, eos, pad

    def _resolve(self, token: str | int, role: str) -> int:
        if isinstance(token, int):
            if not 0 <= token < self.vocab_size:
                raise DataError(
                    f"tokenizer {self.source}: {role} id {token} outside vocab {self.vocab_size}"
                )
            return token
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise DataError(
                f"tokenizer {self.source}: {role} token {token!r} is not in the vocabulary"
            )
        return tid

    def __setstate__(self, state: dict) -> None:
        # A pickled `tokenizers.Tokenizer` (a prepare worker's copy) forgets
        # encode_special_tokens: without this it would match "<|endoftext|>" in raw text.
        self.__dict__.update(state)
        self._set_split_specials(True)

    def _set_split_specials(self, split: bool) -> None:
        # `encode_special_tokens=True` makes the Rust side tokenize "<|endoftext|>" in text
        # as ordinary characters instead of matching the added token.
        self._tok.encode_special_tokens = split

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included; the model's vocab must be >= this."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """Identifies the token ids this tokenizer produces (file hash + BOS/EOS ids): prepared
        data records it and refuses a run whose tokenizer differs."""
        sha = self._file_sha256 or hashlib.sha256(self._tok.to_str().encode()).hexdigest()
        return f"{sha[:16]}-bos{self.bos_id}-eos{self.eos_id}"

    @property
    def backend(self):
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text` without BOS/EOS. allow_special=True matches special-token
        strings in the text (chat templates); the default treats them as plain text."""
        if allow_special:
            return self._encode_allowing_special([text])[0]
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        """`encode` over a list; the Rust side parallelizes it."""
        if allow_special:
            return self._encode_allowing_special(list(texts))
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _encode_allowing_special(self, texts: list[str]) -> list[list[int]]:
        self._set_split_specials(False)
        try:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        finally:
            self._set_split_specials(True)

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):  # torch / numpy
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"
        )
