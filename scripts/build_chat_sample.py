#!/usr/bin/env python
"""Generate the embedded chat sample (runtime/assets/chat_sample/{train,validation}.jsonl.gz).

    python scripts/build_chat_sample.py          # write the files
    python scripts/build_chat_sample.py --check  # exit 1 if the files differ from a rebuild

Synthetic conversations in the OpenAI/HF chat format, generated here from a seeded RNG (no
third-party text, so the files carry this project's licence). Each has a short reasoning
trace (`thinking`, the analysis channel) and a final answer the script knows, so a
fine-tune's correctness is checkable (`answer` and `task` are extra keys the loader ignores):

  reverse   "Reverse the list: q w e r t"        -> "t r e w q"
  sort      "Sort these digits: 7 2 9 4"         -> "2 4 7 9"
  add       "What is 34 + 58?"                   -> "92" (digit-by-digit trace with carries)
  followup  a reverse turn, then "Now sort it."  -> two assistant turns
  tool      an add through a `calculator` tool call and its result (tool-call format)

Train and validation use different seeds; gzip headers carry no time, so output is
byte-identical on every machine.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import string
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "runtime" / "assets" / "chat_sample"
SPLITS = {"train": (4000, 1), "validation": (200, 2)}  # conversations, seed
SYSTEM_PROMPTS = ["Answer with the result only.", "You are a careful assistant.", None, None]
CALCULATOR = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    items = rng.sample(string.ascii_lowercase, rng.randint(3, 6))
    answer = " ".join(reversed(items))
    thinking = (f"The list has {len(items)} items: {', '.join(items)}. "
                f"Read from the end: {', '.join(reversed(items))}.")
    return f"Reverse the list: {' '.join(items)}", thinking, answer


def _sort(rng: random.Random) -> tuple[str, str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    ordered = sorted(digits)
    thinking = (f"Digits: {', '.join(map(str, digits))}. "
                f"Smallest first: {', '.join(map(str, ordered))}.")
    return f"Sort these digits: {' '.join(map(str, digits))}", thinking, " ".join(map(str, ordered))


def _add_trace(a: int, b: int) -> str:
    ones, carry = a % 10 + b % 10, (a % 10 + b % 10) // 10
    tens = a // 10 + b // 10 + carry
    carried = f", write {ones % 10} carry {carry}" if carry else ""
    plus = f" + {carry}" if carry else ""
    return (f"Ones: {a % 10} + {b % 10} = {ones}{carried}. "
            f"Tens: {a // 10} + {b // 10}{plus} = {tens}. Result {a + b}.")


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", _add_trace(a, b), str(a + b)


def _conversation(rng: random.Random, kind: str) -> dict:
    system = rng.choice(SYSTEM_PROMPTS)
    head = [{"role": "system", "content": system}] if system else []
    if kind in ("reverse", "sort", "add"):
        question, thinking, answer = {"reverse": _reverse, "sort": _sort, "add": _add}[kind](rng)
        messages = head + [{"role": "user", "content": question},
                           {"role": "assistant", "thinking": thinking, "content": answer}]
        return {"task": kind, "answer": answer, "messages": messages}
    if kind == "followup":
        question, thinking, first = _reverse(rng)
        letters = first.split()
        answer = " ".join(sorted(letters))
        messages = head + [
            {"role": "user", "content": question},
            {"role": "assistant", "thinking": thinking, "content": first},
            {"role": "user", "content": "Now sort it."},
            {"role": "assistant", "thinking": f"Alphabetical order of {', '.join(letters)}: "
                                              f"{', '.join(sorted(letters))}.", "content": answer}]
        return {"task": kind, "answer": answer, "messages": messages}
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    messages = head + [
        {"role": "user", "content": f"Use the calculator: {a} + {b}"},
        {"role": "assistant", "thinking": "I will call add.", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}]},
        {"role": "tool", "content": str(a + b)},
        {"role": "assistant", "thinking": f"The tool returned {a + b}.", "content": str(a + b)}]
    return {"task": "tool", "answer": str(a + b), "tools": [CALCULATOR],
            "reasoning_effort": rng.choice(["low", "medium", "high"]), "messages": messages}


KINDS = ["reverse"] * 3 + ["sort"] * 3 + ["add"] * 2 + ["followup", "tool"]


def build(count: int, seed: int) -> bytes:
    rng = random.Random(seed)
    lines = [json.dumps(_conversation(rng, rng.choice(KINDS)), ensure_ascii=False)
             for _ in range(count)]
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--check", action="store_true", help="fail if the files on disk differ")
    args = ap.parse_args(argv)
    out, stale = Path(args.out), []
    for split, (count, seed) in SPLITS.items():
        data, path = build(count, seed), Path(args.out) / f"{split}.jsonl.gz"
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(path.name)
            continue
        out.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"{path}: {count} conversations, {len(data)} bytes")
    if stale:
        print(f"stale: {', '.join(stale)} (rerun scripts/build_chat_sample.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
