#!/usr/bin/env python
"""Score an HF export on the embedded chat sample's validation split, through transformers.

    python scripts/eval_chat_sample.py outputs/debugmodel_sft/hf [--generate 20] [--json]

Two measures, per task and overall, both through transformers and the export's own chat
template (`apply_chat_template`):

  teacher-forced  the whole conversation in the training format; an answer is right when
                  the model's argmax predicts every token of the final answer, and the mean
                  loss of those tokens is reported (one forward per conversation: all 200)
  generated       the prompt is every message before the last assistant turn;
                  `generate` runs greedily until <|return|>, and the final channel's text
                  must equal the record's `answer` (slow on CPU: --generate N conversations)

Runs offline on CPU.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

SAMPLE = (Path(__file__).resolve().parent.parent / "runtime" / "assets" / "chat_sample"
          / "validation.jsonl.gz")
FINAL = "<|channel|>final<|message|>"


def final_answer(generated: str) -> str | None:
    """The content of the last final-channel message of the generated text, if any."""
    if FINAL not in generated:
        return None
    text = generated.rsplit(FINAL, 1)[1]
    for stop in ("<|return|>", "<|end|>", "<|call|>", "<|start|>"):
        text = text.split(stop, 1)[0]
    return text.strip()


def _summary(right: dict, total: dict, extra: dict | None = None) -> dict:
    tasks = {t: {"accuracy": right[t] / total[t], "n": total[t],
                 **({k: v[t] / total[t] for k, v in extra.items()} if extra else {})}
             for t in sorted(total)}
    n = sum(total.values())
    out = {"accuracy": sum(right.values()) / n, "n": n, "tasks": tasks}
    if extra:
        out.update({k: sum(v.values()) / n for k, v in extra.items()})
    return out


def teacher_forced(tok, model, records: list[dict]) -> dict:
    import torch

    right, total, loss = defaultdict(int), defaultdict(int), defaultdict(float)
    for record in records:
        kwargs = dict(tools=record.get("tools"),
                      reasoning_effort=record.get("reasoning_effort", "medium"))
        text = tok.apply_chat_template(record["messages"], tokenize=False, **kwargs)
        head = text[: text.rindex(FINAL) + len(FINAL)]
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        start = len(tok(head, add_special_tokens=False)["input_ids"])
        answer = slice(start, ids.shape[1] - 1)  # the final answer's tokens, not <|return|>
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, answer.start - 1: answer.stop - 1].float()
        target = ids[0, answer]
        total[record["task"]] += 1
        right[record["task"]] += bool((logits.argmax(-1) == target).all())
        loss[record["task"]] += torch.nn.functional.cross_entropy(logits, target).item()
    return _summary(right, total, {"answer_loss": loss})


def generated(tok, model, records: list[dict], max_new_tokens: int = 96) -> dict:
    import torch

    stops = [tok.convert_tokens_to_ids(t) for t in ("<|return|>", "<|call|>")]
    right, total = defaultdict(int), defaultdict(int)
    for record in records:
        prompt = record["messages"][:-1]  # everything before the answer turn
        ids = tok.apply_chat_template(prompt, tools=record.get("tools"), add_generation_prompt=True,
                                      reasoning_effort=record.get("reasoning_effort", "medium"),
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id)
        answer = final_answer(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False))
        total[record["task"]] += 1
        right[record["task"]] += answer == record["answer"]
    return _summary(right, total)


def evaluate(model_dir: str, limit: int = 200, generate: int = 0) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:limit]
    result = {"teacher_forced": teacher_forced(tok, model, records)}
    if generate:
        result["generated"] = generated(tok, model, records[:generate])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model_dir", help="an HF export (checkpoint.last_save_in_hf)")
    ap.add_argument("--limit", type=int, default=200, help="conversations to score")
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="also generate answers for the first N conversations")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = ap.parse_args(argv)
    if not (Path(args.model_dir) / "config.json").is_file():
        print(f"error: {args.model_dir}: no config.json (not an HF export)", file=sys.stderr)
        return 2
    result = evaluate(args.model_dir, args.limit, args.generate)
    if args.json:
        print(json.dumps(result))
        return 0
    for mode, r in result.items():
        print(f"{mode}:")
        for task, t in {**r["tasks"], "overall": r}.items():
            loss = f"  answer loss {t['answer_loss']:.3f}" if "answer_loss" in t else ""
            print(f"  {task:10s} {100 * t['accuracy']:5.1f}% exact  ({t['n']} conversations){loss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
