"""Conversations the chat tests render: single and multi-turn, thinking, tool calls."""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                "days": {"type": "integer", "default": 1},
                "tags": {"type": "array", "items": {"type": "string"}},
                "exact": {"type": "boolean"},
            },
            "required": ["city"],
        },
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "now", "description": "The time."}}
# Schemas whose rendering carries the released template's quirks: nested objects and unions
# written with its indentation, unions never collapsed to `any`, list types, array nesting.
TYPED_TOOL = {"type": "function", "function": {
    "name": "search", "description": "Search records.",
    "parameters": {"type": "object", "required": ["query"], "properties": {
        "query": {"type": "string"},
        "filter": {"type": "object", "required": ["field"], "properties": {
            "field": {"type": "string"}, "range": {"type": "object", "properties": {
                "low": {"type": ["number", "null"]}}}}},
        "id": {"oneOf": [{"type": "string", "description": "a key", "default": "k"},
                         {"type": "object"}], "default": "k", "description": "Record id"},
        "limit": {"type": "number", "default": 0.5},
        "sort": {"type": "string", "nullable": True},
        "grid": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
        "rows": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}},
        "pairs": {"type": "array", "items": {"type": ["object", "object"]}},
        "ids": {"type": "array", "items": {"type": "integer"}, "nullable": True},
        "anything": {"description": "Untyped."},
    }}}}

CONVERSATIONS = {
    "single_turn": {"messages": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]},
    "system_and_thinking": {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Reverse 'abc'."},
        {"role": "assistant", "thinking": "Reverse a, b, c: c, b, a.", "content": "cba"},
    ]},
    "multi_turn": {"reasoning_effort": "high", "messages": [
        {"role": "developer", "content": "You are a calculator.\nBe exact."},
        {"role": "user", "content": "3 * 7?"},
        {"role": "assistant", "thinking": "3 * 7 = 21.", "content": "21"},
        {"role": "user", "content": "And 21 + 1? Ünïcødé ✓ 日本"},
        {"role": "assistant", "thinking": "21 + 1 = 22.", "content": "22"},
    ]},
    "tool_call": {"tools": [WEATHER_TOOL, CLOCK_TOOL], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "thinking": "I need the weather tool.",
         "tool_calls": [{"type": "function", "function": {
             "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "content": "{\"temperature\": 21}"},
        {"role": "assistant", "thinking": "It is 21 C.", "content": "21 °C and sunny."},
    ]},
    "ends_with_tool_call": {"tools": [WEATHER_TOOL], "reasoning_effort": "low", "messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Oslo, 3 days?"},
        {"role": "assistant", "thinking": "Call the tool.",
         "tool_calls": [{"function": {"name": "get_weather",
                                      "arguments": "{\"city\": \"Oslo\", \"days\": 3}"}}]},
    ]},
    "typed_tool_schemas": {"tools": [TYPED_TOOL, CLOCK_TOOL], "messages": [
        {"role": "developer", "content": "Search when asked."},
        {"role": "user", "content": "Find alice."},
        {"role": "assistant", "tool_calls": [{"function": {
            "name": "search", "arguments": {"query": "alice", "filter": {"field": "name"}}}}]},
        {"role": "tool", "content": {"hits": ["alice"]}},
        {"role": "assistant", "content": "Found alice."},
    ]},
    # Two calls in one message: split into call, result, call, result (chat_records), results
    # paired by id (given here in the other order).
    "parallel_tool_calls": {"tools": [WEATHER_TOOL, CLOCK_TOOL], "messages": [
        {"role": "user", "content": "Weather in Rome, and the time?"},
        {"role": "assistant", "thinking": "Both tools.", "tool_calls": [
            {"id": "c1", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
            {"id": "c2", "function": {"name": "now", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "09:30"},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temperature\": 18}"},
        {"role": "assistant", "content": "18 C at 09:30."},
    ]},
    "two_turns_with_tools": {"tools": [CLOCK_TOOL], "messages": [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "Checking the clock.",
         "tool_calls": [{"function": {"name": "now", "arguments": {}}}]},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "It is noon."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "thinking": "Say you're welcome.", "content": "You're welcome."},
    ]},
}
