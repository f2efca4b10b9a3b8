"""The hand-back: a trained model as a directory transformers and vLLM serve directly.

`checkpoint.last_save_in_hf = true` makes the trainer call `save_hf` (weights + config.json)
and then `write_tokenizer_files` into `<dump_folder>/hf/`:

  * a tokenizer loaded from an HF checkpoint directory: its tokenizer files are copied
    as they are (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    chat_template.jinja / .json, generation_config.json), so the export formats prompts
    exactly like the model it was fine-tuned from;
  * any other tokenizer (the embedded debug one, a bare tokenizer.json): its
    tokenizer.json, a tokenizer_config.json naming the special tokens, the project's
    harmony chat template (runtime/assets/harmony_chat_template.jinja, which renders what
    the built-in renderer trained on) and a generation_config.json that stops at
    <|return|> / <|call|>, as gpt-oss's does.

Works on paths and token names only (no data-package import: runtime.hf sits beside
runtime.data, above runtime.model).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
HARMONY_TEMPLATE = ASSETS_DIR / "harmony_chat_template.jinja"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
STOP_TOKENS = ("<|return|>", "<|call|>")  # gpt-oss's generation stops


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(out_dir: str | Path, *, tokenizer_file: str, tokenizer_dir: str = "",
                          bos: str, eos: str, pad: str,
                          chat_template: str = "") -> list[str]:
    """Copy or write what AutoTokenizer needs next to an exported model; returns the names.

    tokenizer_dir: the HF checkpoint directory the tokenizer came from ("" if none);
    bos/eos/pad: token strings; chat_template: a template file that overrides the
    directory's (data.chat_template)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
                written.append(name)
    else:
        shutil.copyfile(tokenizer_file, out / "tokenizer.json")
        _write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
            "pad_token": pad, "model_max_length": 131072, "clean_up_tokenization_spaces": False})
        written += ["tokenizer.json", "tokenizer_config.json"]
        written += _write_harmony_extras(out, tokenizer_file, bos, pad)
    if chat_template:
        shutil.copyfile(chat_template, out / "chat_template.jinja")
        written.append("chat_template.jinja")
    return sorted(set(written))


def _write_harmony_extras(out: Path, tokenizer_file: str, bos: str, pad: str) -> list[str]:
    """The chat template and stop tokens, when the tokenizer has the harmony tokens."""
    vocab = _token_ids(tokenizer_file)
    if not all(t in vocab for t in STOP_TOKENS):
        return []  # a text-only tokenizer: nothing chat-specific to hand back
    shutil.copyfile(HARMONY_TEMPLATE, out / "chat_template.jinja")
    _write_json(out / "generation_config.json", {
        "bos_token_id": vocab.get(bos), "pad_token_id": vocab.get(pad),
        "eos_token_id": [vocab[t] for t in STOP_TOKENS], "do_sample": False})
    return ["chat_template.jinja", "generation_config.json"]


def _token_ids(tokenizer_file: str) -> dict[str, int]:
    data = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
    ids = dict(data.get("model", {}).get("vocab", {}))
    ids.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return ids
