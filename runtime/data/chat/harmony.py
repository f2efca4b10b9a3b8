"""The built-in renderer of OpenAI's harmony chat format (gpt-oss), written from the spec.

Used when the tokenizer directory has no chat template (the embedded debug tokenizer).
It renders the same text as the chat template shipped with gpt-oss checkpoints for the
conversations the chat data path accepts (tests/data/chat/test_chat_render.py compares the two):

    <|start|>system<|message|>{identity, knowledge cutoff, date, reasoning, channels}<|end|>
    <|start|>developer<|message|># Instructions\\n\\n{system prompt}\\n\\n# Tools ...<|end|>
    <|start|>user<|message|>{text}<|end|>
    <|start|>assistant<|channel|>analysis<|message|>{thinking}<|end|>      (last turn only)
    <|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>{args}<|call|>
    <|start|>functions.NAME to=assistant<|channel|>commentary<|message|>{"result"}<|end|>
    <|start|>assistant<|channel|>final<|message|>{answer}<|return|>        (<|end|> if not last)

The reference is the template of the current gpt-oss release (the one vLLM serves with).
The first release's template differed and is not followed: it ended tool calls with <|end|>
instead of <|call|>, always kept a tool call's analysis, always wrote the `functions` note in
the system message, and wrote tools as `type f = (_: {...,\\n}) => any;\\n` / `(\\n}) => any;`.

Messages are in the normalised form of `runtime.data.chat.records` (HF chat format: role,
content, optional thinking / tool_calls with dict arguments).
"""

from __future__ import annotations

import json

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
RETURN, CALL, CONSTRAIN = "<|return|>", "<|call|>", "<|constrain|>"
HARMONY_TOKENS = (START, END, MESSAGE, CHANNEL, RETURN, CALL, CONSTRAIN)

DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
CHANNELS_LINE = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
FUNCTIONS_NOTE = "\nCalls to these tools must go to the commentary channel: 'functions'."


class HarmonyError(ValueError):
    """A conversation harmony cannot express (the template raises the same cases)."""


def _message(header: str, content: str, stop: str = END) -> str:
    return f"{START}{header}{MESSAGE}{content}{stop}"


def _tojson(value) -> str:
    # The `tojson` of HF chat templates: json.dumps, non-ASCII kept, default separators.
    return json.dumps(value, ensure_ascii=False)


# ------------------------------------------------------------------ tool definitions
_SCALAR_ITEMS = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean"}
# The released template writes a nested object's property types and a oneOf's later variants
# after a newline and the template's own indentation (jinja whitespace of its `{{ }}` lines);
# vLLM serves that text, so it is reproduced here character for character.
_NESTED_INDENT = "\n" + " " * 16
_DEFAULT_INDENT = " " * 20


def _ts_array(spec: dict) -> str:
    items = spec.get("items")
    if not items:
        inner = "any[]"
    elif isinstance(items.get("type"), str) and items["type"] in _SCALAR_ITEMS:
        inner = _SCALAR_ITEMS[items["type"]] + "[]"
    else:
        item = _ts_type(items)
        inner = "any[]" if item == "object | object" or len(item) > 50 else item + "[]"
    return inner + (" | null" if spec.get("nullable") else "")


def _ts_one_of(variants: list[dict]) -> str:
    # The template means to write `any` for unions with an object variant, but its flag is set
    # inside a jinja for-loop scope and never seen outside it: every union is written out.
    parts = []
    for variant in variants:
        text = _ts_type(variant)
        if variant.get("description"):
            text += "// " + variant["description"]
        if "default" in variant:
            text += _DEFAULT_INDENT + "// default: " + _tojson(variant["default"])
        parts.append(text)
    return " | \n".join(parts)


def _ts_object(spec: dict) -> str:
    required = spec.get("required") or []
    fields = [f"{name}{'' if name in required else '?'}: {_NESTED_INDENT}{_ts_type(sub)}"
              for name, sub in spec["properties"].items()]
    return "{\n" + ", ".join(fields) + "}"


def _ts_type(spec: dict) -> str:
    """A JSON-schema parameter as the TypeScript-like type harmony's developer message uses,
    in the released template's order of cases."""
    kind = spec.get("type")
    if kind == "array":
        return _ts_array(spec)
    if isinstance(kind, list) and kind:
        return " | ".join(kind)
    if spec.get("oneOf"):
        return _ts_one_of(spec["oneOf"])
    if kind == "string":
        if spec.get("enum"):
            return '"' + '" | "'.join(spec["enum"]) + '"'
        return "string" + (" | null" if spec.get("nullable") else "")
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "object":
        return _ts_object(spec) if spec.get("properties") else "object"
    return "any"


def _default_note(spec: dict) -> str:
    # The template writes an enum's or a union's default as is, any other default as JSON.
    if spec.get("enum"):
        return f", // default: {spec['default']}"
    if spec.get("oneOf"):
        return f"// default: {spec['default']}"
    return f", // default: {_tojson(spec['default'])}"


def _tool_type(function: dict) -> str:
    lines = [f"// {function.get('description', '')}\n", f"type {function['name']} = "]
    params = function.get("parameters") or {}
    properties = params.get("properties") or {}
    if not properties:
        return "".join(lines) + "() => any;\n\n"
    required = params.get("required") or []
    lines.append("(_: {\n")
    for name, spec in properties.items():
        if spec.get("description"):
            lines.append(f"// {spec['description']}\n")
        lines.append(f"{name}{'' if name in required else '?'}: {_ts_type(spec)}")
        if "default" in spec:
            lines.append(_default_note(spec))
        lines.append(",\n")
    return "".join(lines) + "}) => any;\n\n"


def render_tools(tools: list[dict]) -> str:
    """The `functions` namespace of the developer message."""
    body = "".join(_tool_type(tool.get("function", tool)) for tool in tools)
    return f"## functions\n\nnamespace functions {{\n\n{body}}} // namespace functions"


# ------------------------------------------------------------------ messages
def system_message(*, date: str, reasoning_effort: str = "medium", has_tools: bool = False,
                   model_identity: str = DEFAULT_IDENTITY) -> str:
    text = (f"{model_identity}\nKnowledge cutoff: {KNOWLEDGE_CUTOFF}\nCurrent date: {date}\n\n"
            f"Reasoning: {reasoning_effort}\n\n{CHANNELS_LINE}")
    return _message("system", text + (FUNCTIONS_NOTE if has_tools else ""))


def developer_message(instructions: str, tools: list[dict] | None) -> str:
    # "\n\n" follows the instructions even without tools, as the released template writes it.
    text = f"# Instructions\n\n{instructions}\n\n" if instructions else ""
    if tools:
        text += "# Tools\n\n" + render_tools(tools)
    return _message("developer", text)


def _check_no_channel_tags(message: dict) -> None:
    for key in ("content", "thinking"):
        text = message.get(key) or ""
        if f"{CHANNEL}analysis{MESSAGE}" in text or f"{CHANNEL}final{MESSAGE}" in text:
            raise HarmonyError(f"an assistant {key} contains <|channel|> tags: pass the analysis "
                               "in 'thinking' and the answer in 'content'")


def _tool_call_turn(message: dict, later_final: bool) -> str:
    call = message["tool_calls"][0]  # one call per message, as harmony and the template assume
    call = call.get("function", call)
    if message.get("content") and message.get("thinking"):
        raise HarmonyError("an assistant message with tool calls has both content and thinking")
    out = ""
    analysis = message.get("content") or message.get("thinking")
    if analysis and not later_final:  # kept until a final answer follows, as at inference
        out = _message("assistant" + CHANNEL + "analysis", analysis)
    header = f"assistant to=functions.{call['name']}{CHANNEL}commentary {call.get('content_type', 'json')}"
    return out + _message(header, _tojson(call["arguments"]), CALL)


def render(messages: list[dict], *, tools: list[dict] | None = None, date: str,
           reasoning_effort: str = "medium", add_generation_prompt: bool = False,
           model_identity: str = DEFAULT_IDENTITY) -> str:
    """Harmony text of a conversation. Without a generation prompt (training) the last
    assistant message ends in <|return|> and keeps its thinking; earlier thinking is dropped."""
    out = [system_message(date=date, reasoning_effort=reasoning_effort, has_tools=bool(tools),
                          model_identity=model_identity)]
    instructions = ""
    if messages and messages[0]["role"] in ("system", "developer"):
        instructions, messages = messages[0].get("content") or "", messages[1:]
    if instructions or tools:
        out.append(developer_message(instructions, tools))
    last_call = None
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "user":
            out.append(_message("user", message["content"]))
        elif role == "tool":
            if last_call is None:
                raise HarmonyError("a tool message without an earlier assistant tool call")
            header = f"functions.{last_call} to=assistant{CHANNEL}commentary"
            out.append(_message(header, _tojson(message["content"])))
        elif role == "assistant":
            _check_no_channel_tags(message)
            if message.get("tool_calls"):
                later_final = any(m["role"] == "assistant" and not m.get("tool_calls")
                                  for m in messages[i + 1:])
                out.append(_tool_call_turn(message, later_final))
                call = message["tool_calls"][0]
                last_call = call.get("function", call)["name"]
            elif i == len(messages) - 1 and not add_generation_prompt:
                if "thinking" in message:
                    out.append(_message("assistant" + CHANNEL + "analysis", message["thinking"]))
                out.append(_message("assistant" + CHANNEL + "final", message["content"], RETURN))
            else:
                out.append(_message("assistant" + CHANNEL + "final", message["content"]))
                last_call = None
        # system / developer messages after the first have no place in harmony: dropped,
        # as the template drops them.
    if add_generation_prompt:
        out.append(START + "assistant")
    return "".join(out)
