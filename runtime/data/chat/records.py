"""Chat records: validate one JSONL record and bring it to the form both renderers take.

A record is `{"messages": [...], "tools": [...]?, "reasoning_effort": "low|medium|high"?}`
in the OpenAI / HF chat format:

    {"role": "system" | "developer", "content": str}          (first message only)
    {"role": "user", "content": str}
    {"role": "assistant", "content": str?, "thinking": str?, "tool_calls": [...]?,
     "train": bool?}
    {"role": "tool", "content": str | object, "name"?: str, "tool_call_id"?: str}

`reasoning_content` is accepted as another name for `thinking`. Tool-call arguments may be
a JSON string (OpenAI) or an object (HF); they are parsed to an object, since that is what
the gpt-oss template serialises. `tools` may be a list or a JSON string of one.

Null is absent: a `null` optional field, a `null` key anywhere in a tool definition and, in
HF (Arrow) datasets, a `null` tool-call argument are removed. Arrow stores a list of structs
with one schema for the whole column, so every key that any row has appears in every row,
`null` where that row lacks it (tools with different parameters, messages with and without
`thinking`). Empty optional fields are removed too, so the template and the built-in
renderer see identical messages.

`train` (assistant messages; Axolotl's `training` is accepted too) overrides data.loss_on
for that message: true trains it, false masks it (runtime.data.chat.masks.apply_overrides).

Parallel tool calls (one assistant message with several `tool_calls`) are split into
consecutive assistant messages, each followed by its result: harmony (and the gpt-oss
template) renders one call per message, and the model makes one call at a time. The results
are paired by `tool_call_id` when every call has an `id`, else in order; a parallel call
without exactly one result per call is refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

ROLES = ("system", "developer", "user", "assistant", "tool")
EFFORTS = ("low", "medium", "high")


class ChatRecordError(ValueError):
    """One record that is not a conversation; the message names the field."""


@dataclass
class Conversation:
    messages: list[dict]
    tools: list[dict] | None = None
    reasoning_effort: str | None = None
    where: str = ""  # file:line (or dataset row) of the record, for later errors

    def turn_starts(self) -> list[int]:
        """Where later turns start: the index of every user message but the first one of
        the conversation's body (after a leading system/developer message)."""
        body = 1 if self.messages and self.messages[0]["role"] in ("system", "developer") else 0
        return [i for i, m in enumerate(self.messages)
                if m["role"] == "user" and i > body]

    def from_turn(self, start: int) -> "Conversation":
        """The conversation without messages[body:start] (whole earlier turns cut from the
        left): the system/developer message, tools and effort stay."""
        head = self.messages[:1] if self.messages[0]["role"] in ("system", "developer") else []
        return dataclasses.replace(self, messages=head + self.messages[start:])


def without_nulls(value):
    """`value` with every null-valued key of its objects removed (recursively)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def _optional(msg: dict, *keys: str):
    """The first of `keys` that is present and not null (null = absent)."""
    return next((msg[k] for k in keys if msg.get(k) is not None), None)


def _tool_call(call, where: str, arrow: bool = False) -> dict:
    if not isinstance(call, dict):
        raise ChatRecordError(f"{where}: a tool call must be an object")
    function = call.get("function") if call.get("function") is not None else call
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
            or not function["name"]:
        raise ChatRecordError(f"{where}: a tool call needs function.name")
    arguments = function.get("arguments")
    if arguments is None:  # absent, or null as Arrow writes a missing field
        arguments = {}
    if arrow and isinstance(arguments, dict):  # the column's other calls' argument names
        arguments = without_nulls(arguments)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise ChatRecordError(f"{where}: tool call arguments are not valid JSON") from None
    # Harmony renders the arguments as one JSON object (the tool's parameters); a list or a
    # scalar would render a call the model can never have been asked for.
    if not isinstance(arguments, dict):
        raise ChatRecordError(f"{where}: tool call arguments must be a JSON object, got "
                              f"{type(arguments).__name__} ({json.dumps(arguments)[:40]})")
    out = {"name": function["name"], "arguments": arguments}
    if function.get("content_type") is not None:
        out["content_type"] = function["content_type"]
    if call.get("id") is not None:
        return {"id": call["id"], "type": "function", "function": out}
    return {"type": "function", "function": out}


def _schema(spec, where: str) -> None:
    """A JSON-schema node of a tool's parameters (nulls already removed): the shapes the
    template reads must have their types, or it fails deep inside a render."""
    if not isinstance(spec, dict):
        raise ChatRecordError(f"{where}: must be an object, got {type(spec).__name__}")
    properties = spec.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            raise ChatRecordError(f"{where}.properties: must be an object")
        for name, sub in properties.items():
            _schema(sub, f"{where}.properties.{name}")
    if spec.get("items") is not None and spec["items"] != {}:
        _schema(spec["items"], f"{where}.items")
    for j, variant in enumerate(spec.get("oneOf") or []):
        _schema(variant, f"{where}.oneOf[{j}]")
    for key in ("required", "enum"):
        if key in spec and not isinstance(spec[key], list):
            raise ChatRecordError(f"{where}.{key}: must be a list")
    if isinstance(spec.get("description"), (dict, list)):
        raise ChatRecordError(f"{where}.description: must be a string")


def _tool(tool, where: str) -> dict:
    """A tool definition, nulls removed: {"type": "function", "function": {...}} or the
    bare function object, as given (the template accepts both)."""
    if not isinstance(tool, dict):
        raise ChatRecordError(f"{where}: a tool must be an object")
    tool = without_nulls(tool)
    function = tool.get("function", tool)
    inner = ".function" if "function" in tool else ""
    if not isinstance(function, dict):
        raise ChatRecordError(f"{where}.function: must be an object")
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise ChatRecordError(f"{where}: a tool needs {'function.' if inner else ''}name "
                              f"(its keys: {', '.join(sorted(function)) or 'none'})")
    if "description" in function and not isinstance(function["description"], str):
        raise ChatRecordError(f"{where}{inner}.description: must be a string")
    if "parameters" in function:
        _schema(function["parameters"], f"{where}{inner}.parameters")
    return tool


def _tools(tools, where: str) -> list[dict] | None:
    if isinstance(tools, str):  # a column of JSON text (keeps each schema's own key order)
        try:
            tools = json.loads(tools) if tools.strip() else None
        except ValueError:
            raise ChatRecordError(f"{where}: 'tools' is a string but not valid JSON") from None
    if not tools:
        return None
    if not isinstance(tools, list):
        raise ChatRecordError(f"{where}: 'tools' must be a list")
    return [_tool(t, f"{where}: tools[{j}]") for j, t in enumerate(tools)]


def _train_flag(msg: dict, role: str, where: str) -> bool | None:
    train = _optional(msg, "train", "training")
    if train is None:
        return None
    if not isinstance(train, bool):
        raise ChatRecordError(f"{where}: train must be true or false, got {train!r}")
    if train and role != "assistant":
        raise ChatRecordError(f"{where}: train = true on a {role} message: only assistant "
                              "messages are trained (data.loss_on = 'all' trains every token)")
    return train if role == "assistant" else None


def _message(msg, i: int, where: str, arrow: bool = False) -> dict:
    where = f"{where}: messages[{i}]"
    if not isinstance(msg, dict):
        raise ChatRecordError(f"{where}: expected an object")
    role = msg.get("role")
    if role not in ROLES:
        raise ChatRecordError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    if role in ("system", "developer") and i:
        raise ChatRecordError(f"{where}: a {role} message may only come first")
    out: dict = {"role": role}
    content = msg.get("content")
    thinking = _optional(msg, "thinking", "reasoning_content")
    train = _train_flag(msg, role, where)
    if role == "tool":
        if content is None:
            raise ChatRecordError(f"{where}: a tool message needs content")
        out["content"] = content
        if msg.get("tool_call_id") is not None:
            out["tool_call_id"] = msg["tool_call_id"]
        return out
    if content is not None and not isinstance(content, str):
        raise ChatRecordError(f"{where}: content must be a string")
    if role != "assistant":
        if content is None:
            raise ChatRecordError(f"{where}: a {role} message needs content")
        out["content"] = content
        return out
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ChatRecordError(f"{where}: tool_calls must be a list")
    if content:
        out["content"] = content
    if thinking:
        if not isinstance(thinking, str):
            raise ChatRecordError(f"{where}: thinking must be a string")
        out["thinking"] = thinking
    if calls:
        out["tool_calls"] = [_tool_call(c, where, arrow) for c in calls]
    elif "content" not in out:
        raise ChatRecordError(f"{where}: an assistant message needs content or tool_calls")
    if train is not None:
        out["train"] = train
    return out


def _split_parallel_calls(messages: list[dict], where: str) -> list[dict]:
    """Every assistant message with n > 1 tool calls and the n tool results after it become
    n (assistant with one call, its result) pairs; the first keeps the content/thinking."""
    out: list[dict] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        calls = m.get("tool_calls") or []
        if len(calls) < 2:
            out.append(m)
            i += 1
            continue
        results = []
        while i + 1 + len(results) < len(messages) and \
                messages[i + 1 + len(results)]["role"] == "tool":
            results.append(messages[i + 1 + len(results)])
        if len(results) != len(calls):
            raise ChatRecordError(
                f"{where}: messages[{i}]: {len(calls)} parallel tool calls followed by "
                f"{len(results)} tool result(s): they are split into one call per message, "
                "each followed by its result, so each call needs exactly one")
        ids = [c.get("id") for c in calls]
        if all(ids) and all(r.get("tool_call_id") for r in results):
            by_id = {r["tool_call_id"]: r for r in results}
            if sorted(by_id) != sorted(ids) or len(set(ids)) != len(ids):
                raise ChatRecordError(
                    f"{where}: messages[{i}]: the tool results' tool_call_id "
                    f"({', '.join(map(str, by_id))}) do not match the calls' ids "
                    f"({', '.join(map(str, ids))})")
            results = [by_id[c] for c in ids]
        first = {key: value for key, value in m.items() if key != "tool_calls"}
        later = {key: value for key, value in m.items() if key in ("role", "train")}
        for k, (call, result) in enumerate(zip(calls, results, strict=True)):
            out += [{**(later if k else first), "tool_calls": [call]}, result]
        i += 1 + len(results)
    return out


def parse_record(record, where: str, *, require_assistant: bool = True,
                 arrow: bool = False) -> Conversation:
    """The Conversation of one record; `where` (file:line) starts every error message.
    Training data needs an assistant message; an inference prompt does not. `arrow`: the
    record is a row of an HF (Arrow) dataset, whose null tool-call arguments are absent."""
    if not isinstance(record, dict):
        raise ChatRecordError(f"{where}: expected a JSON object with 'messages'")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatRecordError(f"{where}: 'messages' must be a non-empty list")
    parsed = [_message(m, i, where, arrow) for i, m in enumerate(messages)]
    seen_call = False
    for i, m in enumerate(parsed):
        seen_call = seen_call or bool(m.get("tool_calls"))
        if m["role"] == "tool" and not seen_call:
            raise ChatRecordError(f"{where}: messages[{i}]: a tool message before any tool call")
    if require_assistant and not any(m["role"] == "assistant" for m in parsed):
        raise ChatRecordError(f"{where}: no assistant message to train on")
    tools = _tools(record.get("tools"), where)
    effort = record.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        raise ChatRecordError(f"{where}: reasoning_effort {effort!r} is not one of {EFFORTS}")
    return Conversation(_split_parallel_calls(parsed, where), tools, effort, where)
