"""The HF hand-back of a chat fine-tune: the exported directory loads in transformers with
logits equal to ours (fp32), transformers' own `apply_chat_template` gives the tokens our
data path trains on, and its `generate` runs and agrees with our greedy decoding."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import torch

from chat_conversations import CONVERSATIONS
from checkpoint_helpers import seeded_model
from runtime.data.chat.records import parse_record
from runtime.data.chat.template import HarmonyRenderer
from runtime.data.tokenizer import EMBEDDED_TOKENIZER, Tokenizer
from runtime.hf import save_hf
from runtime.hf.tokenizer_files import write_tokenizer_files

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    model = seeded_model("debugmodel", 0)
    save_hf(model, out, dtype=torch.float32, progress=False)
    tok = Tokenizer.load("")
    names = write_tokenizer_files(out, tokenizer_file=str(EMBEDDED_TOKENIZER),
                                  bos="<|startoftext|>", eos="<|endoftext|>", pad="<|pad|>")
    return out, model, tok, names


def test_export_has_the_tokenizer_files(exported):
    out, _, tok, names = exported
    assert names == ["chat_template.jinja", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.token_to_id("<|return|>"), tok.token_to_id("<|call|>")]


def _prompt(tok, messages):
    """Our renderer's inference prompt (today's date, as transformers' strftime_now)."""
    conv = parse_record({"messages": messages}, "t", require_assistant=False)
    text = HarmonyRenderer(date=dt.date.today().isoformat()).render(
        conv.messages, add_generation_prompt=True)
    return tok.encode(text, allow_special=True)


def _hf_ids(hf_tok, messages, **kw) -> list[int]:
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def test_transformers_loads_the_export_and_agrees(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, model, tok, _ = exported
    hf_tok = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    for name in ("single_turn", "multi_turn", "tool_call"):
        record = CONVERSATIONS[name]
        last_user = max(i for i, m in enumerate(record["messages"]) if m["role"] == "user")
        messages = record["messages"][: last_user + 1]
        ours = _prompt(tok, messages)
        assert _hf_ids(hf_tok, messages, tools=record.get("tools")) == (
            tok.encode(HarmonyRenderer(date=dt.date.today().isoformat()).render(
                parse_record({"messages": messages}, "t", require_assistant=False).messages,
                tools=record.get("tools"), add_generation_prompt=True), allow_special=True))
        ids = torch.tensor([ours])
        with torch.no_grad():
            theirs, mine = hf(input_ids=ids).logits.double(), model(ids).double()
        assert ((theirs - mine).norm() / mine.norm()).item() < 1e-5

    # transformers' generate on its own template's prompt == our greedy decoding.
    ids = torch.tensor([_prompt(tok, CONVERSATIONS["single_turn"]["messages"][:1])])
    generated = hf.generate(ids, max_new_tokens=6, do_sample=False,
                            attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    assert len(generated) >= 1
    seq = ids
    with torch.no_grad():
        for _ in range(len(generated)):
            nxt = model(seq)[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert seq[0, ids.shape[1]:].tolist() == generated
