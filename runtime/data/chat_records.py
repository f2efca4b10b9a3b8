"""Chat records: validate one JSONL record and bring it to the form both renderers take.

A record is `{"messages": [...], "tools": [...]?, "reasoning_effort": "low|medium|high"?}`
in the OpenAI / HF chat format:

    {"role": "system" | "developer", "content": str}          (first message only)
    {"role": "user", "content": str}
    {"role": "assistant", "content": str?, "thinking": str?, "tool_calls": [...]?}
    {"role": "tool", "content": str | object, "name"?: str, "tool_call_id"?: str}

`reasoning_content` is accepted as another name for `thinking`. Tool-call arguments may be
a JSON string (OpenAI) or an object (HF); they are parsed to an object, since that is what
the gpt-oss template serialises. Empty/None optional fields are removed, so the template
and the built-in renderer see identical messages.
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


def _tool_call(call, where: str) -> dict:
    if not isinstance(call, dict):
        raise ChatRecordError(f"{where}: a tool call must be an object")
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ChatRecordError(f"{where}: a tool call needs function.name")
    arguments = function.get("arguments")
    if arguments is None:  # absent, or null as Arrow writes a missing field
        arguments = {}
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
    if "content_type" in function:
        out["content_type"] = function["content_type"]
    return {"type": "function", "function": out}


def _message(msg, i: int, where: str) -> dict:
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
    thinking = msg.get("thinking", msg.get("reasoning_content"))
    if role == "tool":
        if content is None:
            raise ChatRecordError(f"{where}: a tool message needs content")
        out["content"] = content
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
        out["tool_calls"] = [_tool_call(c, where) for c in calls]
    elif "content" not in out:
        raise ChatRecordError(f"{where}: an assistant message needs content or tool_calls")
    return out


def parse_record(record, where: str, *, require_assistant: bool = True) -> Conversation:
    """The Conversation of one record; `where` (file:line) starts every error message.
    Training data needs an assistant message; an inference prompt does not."""
    if not isinstance(record, dict):
        raise ChatRecordError(f"{where}: expected a JSON object with 'messages'")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatRecordError(f"{where}: 'messages' must be a non-empty list")
    parsed = [_message(m, i, where) for i, m in enumerate(messages)]
    seen_call = False
    for i, m in enumerate(parsed):
        seen_call = seen_call or bool(m.get("tool_calls"))
        if m["role"] == "tool" and not seen_call:
            raise ChatRecordError(f"{where}: messages[{i}]: a tool message before any tool call")
    if require_assistant and not any(m["role"] == "assistant" for m in parsed):
        raise ChatRecordError(f"{where}: no assistant message to train on")
    tools = record.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise ChatRecordError(f"{where}: 'tools' must be a list")
    effort = record.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        raise ChatRecordError(f"{where}: reasoning_effort {effort!r} is not one of {EFFORTS}")
    return Conversation(parsed, tools, effort)
