"""Chat rendering: the built-in harmony renderer equals a chat template (our fixture, and the
real gpt-oss template when GPTOSS_CHAT_TEMPLATE names a checkpoint dir or template file), the
template runs sandboxed with HF's helpers, and the loss mask covers exactly the generated
tokens (checked against spans found independently in the rendered text)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runtime.data.chat import harmony
from runtime.data.chat.masks import HarmonyIds, trained_tokens
from runtime.data.chat.records import ChatRecordError, parse_record
from runtime.data.chat.template import (ChatTemplateError, HarmonyRenderer, TemplateRenderer,
                                        build_renderer, find_template)
from runtime.data.tokenizer import Tokenizer
from chat_conversations import CONVERSATIONS
from chat_spans import mask_from_text

FIXTURE = Path(__file__).resolve().parents[3] / "runtime" / "assets" / "harmony_chat_template.jinja"
DATE = "2026-01-15"


def _render_both(renderer_a, renderer_b, record, **kw):
    conv = parse_record(record, "test", require_assistant=False)
    args = dict(tools=conv.tools, reasoning_effort=conv.reasoning_effort, **kw)
    return renderer_a.render(conv.messages, **args), renderer_b.render(conv.messages, **args)


def _prompt_only(record):
    """The inference prompt of a conversation: up to its last user message."""
    last_user = max(i for i, m in enumerate(record["messages"]) if m["role"] == "user")
    return {**record, "messages": record["messages"][: last_user + 1]}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_builtin_equals_template(name, generation_prompt):
    template = TemplateRenderer(FIXTURE.read_text(), str(FIXTURE), date=DATE)
    record = CONVERSATIONS[name]
    if generation_prompt:
        record = _prompt_only(record)
    ours, theirs = _render_both(HarmonyRenderer(date=DATE), template, record,
                                add_generation_prompt=generation_prompt)
    assert ours == theirs


def _real_template() -> TemplateRenderer | None:
    where = os.environ.get("GPTOSS_CHAT_TEMPLATE", "")
    if not where:
        return None
    p = Path(where)
    found = find_template(str(p), "") if p.is_dir() else find_template("", str(p))
    if found is None:
        pytest.fail(f"GPTOSS_CHAT_TEMPLATE={where}: no chat_template.jinja or "
                    "tokenizer_config.json chat_template there")
    return TemplateRenderer(found[0], found[1], date=DATE)


def _turn_prefixes(record):
    """The conversation cut after each assistant message (per-turn training renders)."""
    msgs = record["messages"]  # (not inside parallel calls: they need their results)
    return [{**record, "messages": msgs[: i + 1]} for i, m in enumerate(msgs)
            if m["role"] == "assistant" and len(m.get("tool_calls") or []) < 2]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("mode", ["training", "turn_prefixes", "generation_prompt"])
def test_builtin_equals_real_gptoss_template(name, mode):
    """The built-in renderer writes what the released gpt-oss template (what vLLM serves)
    writes. Opt-in, the template is not shipped here: GPTOSS_CHAT_TEMPLATE=/path/gpt-oss-20b
    (a checkpoint dir) or =/path/chat_template.jinja (or a tokenizer_config.json)."""
    real = _real_template()
    if real is None:
        pytest.skip("GPTOSS_CHAT_TEMPLATE not set (a gpt-oss checkpoint dir or its "
                    "chat_template.jinja): no real template to compare with")
    record = CONVERSATIONS[name]
    records = {"training": [record], "turn_prefixes": _turn_prefixes(record),
               "generation_prompt": [_prompt_only(record)]}[mode]
    for rec in records:
        ours, theirs = _render_both(HarmonyRenderer(date=DATE), real, rec,
                                    add_generation_prompt=mode == "generation_prompt")
        assert ours == theirs


def test_builtin_writes_nested_types_as_the_released_template():
    """The released template's whitespace inside nested object and union types (literal, so
    the check holds without the real template)."""
    tool = {"function": {"name": "f", "description": "d", "parameters": {"properties": {
        "o": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
        "u": {"oneOf": [{"type": "object"}, {"type": "integer", "default": 2}]}}}}}
    assert harmony.render_tools([tool]) == (
        "## functions\n\nnamespace functions {\n\n// d\ntype f = (_: {\n"
        "o?: {\na: \n                string},\n"
        "u?: object | \nnumber                    // default: 2,\n"
        "}) => any;\n\n} // namespace functions")


def test_builtin_renders_the_harmony_literal():
    text = harmony.render([{"role": "user", "content": "Hi"},
                           {"role": "assistant", "thinking": "Greet.", "content": "Hello"}],
                          date=DATE)
    assert text == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        f"Knowledge cutoff: 2024-06\nCurrent date: {DATE}\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every "
        "message.<|end|>"
        "<|start|>user<|message|>Hi<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Greet.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello<|return|>")


def test_earlier_thinking_dropped_and_return_only_at_the_end():
    conv = parse_record(CONVERSATIONS["multi_turn"], "t")
    text = harmony.render(conv.messages, date=DATE, reasoning_effort="high")
    assert "3 * 7 = 21." not in text and "21 + 1 = 22." in text
    assert text.count("<|return|>") == 1 and text.endswith("22<|return|>")
    assert "Reasoning: high" in text and "# Instructions\n\nYou are a calculator." in text


def test_template_helpers_and_sandbox():
    t = TemplateRenderer("{{ strftime_now('%d/%m/%Y') }}{{ {'k': 'é'} | tojson }}", "t",
                         date=DATE)
    assert t.render([]) == '15/01/2026{"k": "é"}'
    with pytest.raises(ChatTemplateError, match="boom"):
        TemplateRenderer("{{ raise_exception('boom') }}", "t", date=DATE).render([])
    with pytest.raises(ChatTemplateError):  # the sandbox refuses attribute walks
        TemplateRenderer("{{ ''.__class__.__mro__ }}", "t", date=DATE).render([])
    with pytest.raises(ChatTemplateError):  # immutable: inputs cannot be changed
        TemplateRenderer("{{ messages.append(1) }}", "t", date=DATE).render([])
    with pytest.raises(ChatTemplateError, match="channel"):
        HarmonyRenderer(date=DATE).render(
            [{"role": "user", "content": "x"},
             {"role": "assistant", "content": "<|channel|>final<|message|>y"}])


def test_find_template_order(tmp_path):
    assert find_template(str(tmp_path)) is None
    assert isinstance(build_renderer(str(tmp_path), date=DATE), HarmonyRenderer)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"},
                           {"name": "default", "template": "D"}]}))
    assert find_template(str(tmp_path))[0] == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert find_template(str(tmp_path))[0] == "J"
    explicit = tmp_path / "mine.jinja"
    explicit.write_text("M")
    assert build_renderer(str(tmp_path), str(explicit), date=DATE).render([]) == "M"
    with pytest.raises(ChatTemplateError, match="data.chat_template"):
        find_template("", str(tmp_path / "missing.jinja"))
    with pytest.raises(ChatTemplateError, match="data.chat_date"):
        build_renderer("", date="15/01/2026")


@pytest.mark.parametrize("record, match", [
    ({"messages": []}, "non-empty"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "y"}]}, "only come first"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "before any tool call"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {
        "name": "f", "arguments": "{bad"}}]}]}, "not valid JSON"),
    ({"reasoning_effort": "max", "messages": [{"role": "assistant", "content": "y"}]},
     "reasoning_effort"),
])
def test_bad_records_name_the_field(record, match):
    with pytest.raises(ChatRecordError, match=match) as e:
        parse_record(record, "chat.jsonl:7")
    assert str(e.value).startswith("chat.jsonl:7")


# ------------------------------------------------------------------------------- masks
@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load("")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("loss_on", ["last_assistant", "last_user_turn", "all_assistant"])
def test_mask_equals_spans_found_in_text(tok, name, loss_on):
    conv = parse_record(CONVERSATIONS[name], "t")
    text = harmony.render(conv.messages, tools=conv.tools, date=DATE,
                          reasoning_effort=conv.reasoning_effort or "medium")
    ids = tok.encode(text, allow_special=True)
    expected_ids, expected = mask_from_text(tok, text, loss_on)
    assert ids == expected_ids
    mask = trained_tokens(ids, tok.decode, HarmonyIds.of(tok), loss_on)
    assert mask.any() and (mask == expected).all()
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained.endswith(("<|return|>", "<|call|>"))
    assert "<|start|>user" not in trained and "<|start|>system" not in trained


def test_mask_details(tok):
    conv = parse_record(CONVERSATIONS["tool_call"], "t")
    text = harmony.render(conv.messages, tools=conv.tools, date=DATE)
    ids = tok.encode(text, allow_special=True)
    hid = HarmonyIds.of(tok)
    last = tok.decode([i for i, m in zip(ids, trained_tokens(ids, tok.decode, hid)) if m])
    assert last == ("<|channel|>analysis<|message|>It is 21 C.<|end|><|start|>assistant"
                    "<|channel|>final<|message|>21 °C and sunny.<|return|>")
    every = trained_tokens(ids, tok.decode, hid, "all_assistant")
    first_turn = tok.decode([i for i, m in zip(ids, every) if m])
    assert first_turn.startswith(' to=functions.get_weather<|channel|>commentary json<|message|>')
    assert trained_tokens(ids, tok.decode, hid, "all").sum() == len(ids) - 1
    with pytest.raises(ValueError, match="data.loss_on"):
        trained_tokens(ids, tok.decode, hid, "assistant")


def _trained_text(tok, record, loss_on, renderer=None):
    """Each run of trained tokens of the record's rendering, decoded (with the encoder the
    loader uses: masks and per-message `train` flags)."""
    from runtime.data.chat.source import ChatEncoder

    renderer = renderer or TemplateRenderer(FIXTURE.read_text(), str(FIXTURE), date=DATE)
    doc = ChatEncoder(tok, renderer, loss_on)([parse_record(record, "t")])[0]
    runs, ids = [], doc.tokens.tolist()
    for i, (token, trained) in enumerate(zip(ids, doc.trained)):
        if trained and (i == 0 or not doc.trained[i - 1]):
            runs.append([])
        if trained:
            runs[-1].append(token)
    return [tok.decode(r) for r in runs]


def test_last_user_turn_trains_the_tool_calls_and_the_answer(tok):
    record = CONVERSATIONS["tool_call"]
    call = (' to=functions.get_weather<|channel|>commentary json<|message|>'
            '{"city": "Paris", "unit": "celsius"}<|call|>')
    final = ("<|channel|>analysis<|message|>It is 21 C.<|end|><|start|>assistant"
             "<|channel|>final<|message|>21 °C and sunny.<|return|>")
    assert _trained_text(tok, record, "last_user_turn") == [call, final]
    assert _trained_text(tok, record, "last_assistant") == [final]  # negative control
    # After a later user message, earlier turns are context again.
    two = CONVERSATIONS["two_turns_with_tools"]
    assert _trained_text(tok, two, "last_user_turn") == _trained_text(tok, two, "last_assistant")
    assert len(_trained_text(tok, two, "all_assistant")) == 3


def test_per_message_train_flag_overrides_loss_on(tok):
    msgs = CONVERSATIONS["two_turns_with_tools"]["messages"]
    flagged = {**CONVERSATIONS["two_turns_with_tools"], "messages": [
        msgs[0], {**msgs[1], "train": True}, msgs[2], msgs[3], msgs[4],
        {**msgs[5], "training": False}]}  # Axolotl's name for the flag
    call = " to=functions.now<|channel|>commentary json<|message|>{}<|call|>"
    # The tool call's analysis is not rendered (a final answer follows it), so not trained;
    # the last turn (thinking and answer) is masked by its flag.
    for renderer in (None, HarmonyRenderer(date=DATE)):
        assert _trained_text(tok, flagged, "last_assistant", renderer) == [call]
        assert _trained_text(tok, flagged, "all_assistant", renderer) == [
            call, "<|channel|>final<|message|>It is noon.<|end|>"]
    # Consecutive assistant messages: a trained one after an untrained one starts at its
    # own <|start|> (the model writes it inside the turn).
    both = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "One.", "train": False},
                         {"role": "assistant", "thinking": "T.", "content": "Two.", "train": True}]}
    assert _trained_text(tok, both, "all_assistant") == [
        "<|start|>assistant<|channel|>analysis<|message|>T.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Two.<|return|>"]
    for bad, match in (({"role": "user", "content": "x", "train": True}, "train = true on a user"),
                       ({"role": "assistant", "content": "x", "train": "yes"}, "true or false")):
        with pytest.raises(ChatRecordError, match=match):
            parse_record({"messages": [bad, {"role": "assistant", "content": "y"}]}, "f:3")
    # A user message may say train = false (it is context anyway).
    assert parse_record({"messages": [{"role": "user", "content": "x", "train": False},
                                      {"role": "assistant", "content": "y"}]}, "t")


def test_parallel_tool_calls_split_into_call_result_pairs(tok):
    record = CONVERSATIONS["parallel_tool_calls"]
    m = record["messages"]
    split = {**record, "messages": [
        m[0], {"role": "assistant", "thinking": "Both tools.", "tool_calls": [m[1]["tool_calls"][0]]},
        m[3], {"role": "assistant", "tool_calls": [m[1]["tool_calls"][1]]}, m[2], m[4]]}
    template = TemplateRenderer(FIXTURE.read_text(), str(FIXTURE), date=DATE)
    assert _render_both(template, template, record) == _render_both(template, template, split)
    text = _render_both(template, template, record)[0]
    assert text.index("functions.get_weather to=assistant") < text.index("to=functions.now")
    assert _trained_text(tok, record, "last_user_turn") == [
        ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Rome"}<|call|>',
        " to=functions.now<|channel|>commentary json<|message|>{}<|call|>",
        "<|channel|>final<|message|>18 C at 09:30.<|return|>"]
    # Without ids, results pair in order; a call without its own result is refused.
    no_ids = json.loads(json.dumps(record))
    for msg in no_ids["messages"]:
        msg.pop("id", None), msg.pop("tool_call_id", None)
        for call in msg.get("tool_calls", []):
            call.pop("id")
    conv = parse_record(no_ids, "t")
    assert [x.get("content") for x in conv.messages if x["role"] == "tool"] == [
        "09:30", "{\"temperature\": 18}"]
    for messages, match in ((m[:2], "2 parallel tool calls followed by 0"),
                            (m[:3] + m[4:], "followed by 1 tool result"),
                            ([m[0], m[1], {**m[2], "tool_call_id": "c9"}, m[3], m[4]],
                             "do not match the calls' ids")):
        with pytest.raises(ChatRecordError, match=match) as e:
            parse_record({**record, "messages": messages}, "calls.jsonl:4")
        assert str(e.value).startswith("calls.jsonl:4: messages[1]: ")


def test_null_is_absent_and_bad_tools_name_the_field():
    # null optional fields: `thinking: null` does not hide `reasoning_content` (the issue's
    # silent loss), and nulls in a tool schema (Arrow's shape) render as if absent.
    record = {"tools": [{"type": "function", "function": {
        "name": "get_weather", "description": None, "parameters": {
            "type": "object", "required": None,
            "properties": {"city": {"type": "string", "default": None, "enum": None},
                           "query": None}}}}],
        "messages": [{"role": "user", "content": "Hi", "thinking": None, "tool_calls": None},
                     {"role": "assistant", "thinking": None, "reasoning_content": "Think.",
                      "content": "Hello", "train": None}]}
    clean = {"tools": [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object",
                                              "properties": {"city": {"type": "string"}}}}}],
        "messages": [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "thinking": "Think.", "content": "Hello"}]}
    template = TemplateRenderer(FIXTURE.read_text(), str(FIXTURE), date=DATE)
    assert _render_both(HarmonyRenderer(date=DATE), template, record) == \
        _render_both(HarmonyRenderer(date=DATE), template, clean)
    assert "Think." in _render_both(template, template, record)[0]
    assert "default: null" not in _render_both(template, template, record)[0]
    # tools as a JSON string (a text column keeps each schema's key order)
    as_text = {**clean, "tools": json.dumps(clean["tools"])}
    assert _render_both(template, template, as_text) == _render_both(template, template, clean)
    for tools, match in (
            ([{"type": "function", "function": {"description": "no name"}}],
             r"tools\[0\]: a tool needs function.name \(its keys: description\)"),
            ([{"description": "bare, no name"}], r"tools\[0\]: a tool needs name"),
            ([CONVERSATIONS["tool_call"]["tools"][1], {"function": {
                "name": "f", "parameters": {"properties": {"a": "string"}}}}],
             r"tools\[1\].function.parameters.properties.a: must be an object"),
            ([{"function": {"name": "f", "parameters": {"properties": ["a"]}}}],
             r"parameters.properties: must be an object"),
            ([{"function": {"name": "f", "parameters": {"required": "a"}}}],
             r"parameters.required: must be a list"),
            ("[{broken", "'tools' is a string but not valid JSON"),
            ({"name": "f"}, "'tools' must be a list")):
        with pytest.raises(ChatRecordError, match=match) as e:
            parse_record({**clean, "tools": tools}, "tools.jsonl:9")
        assert str(e.value).startswith("tools.jsonl:9: ")
