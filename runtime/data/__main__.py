"""`python -m runtime.data --config C [--section.key=value ...] --show N [--json]`

Prints the first N packed samples of a job's data exactly as the trainer receives them
(one process, the job's seq_len, tokenizer and [data] keys): as text, or with --json one
line per sample {"input_ids", "labels", "document_ids", "positions"} with labels
IGNORE_INDEX (-100) on untrained tokens. Bad input: one line, exit 2.

This file is an entry point (the layer of the launchers): it reads the job's TOML through
the trainer's config loader; the data package itself never does.
"""

from __future__ import annotations

import argparse
import json
import sys

from runtime.data.errors import DataError
from runtime.data.loader import build_dataloader
from runtime.data.tokenizer import Tokenizer
from runtime.train.config import ConfigError, build_parser, parse_args

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = build_parser("python -m runtime.data")
    parser.add_argument("--show", type=int, metavar="N", default=None,
                        help="print the first N packed samples as the trainer receives them")
    parser.add_argument("--json", action="store_true",
                        help="--show: one JSON line per sample (input_ids, labels, ...)")
    return parser


def first_samples(cfg, n: int) -> tuple[dict, Tokenizer]:
    """The first n packed windows of the job's data stream: dict of int64 tensors [n, S]."""
    tokenizer = Tokenizer.load(cfg.model.tokenizer_path)
    v = cfg.validation  # a held-out fraction never reaches the trainer: show what it sees
    holdout = v.split_fraction if v.enable else 0.0
    loader = build_dataloader(cfg.data, tokenizer, cfg.training.seq_len, n, holdout=holdout)
    return next(loader), tokenizer


TRAINED_ON, TRAINED_OFF = "\033[1;32m", "\033[0m"  # bold green on a terminal
PLAIN_ON, PLAIN_OFF = "[[", "]]"  # in a file or pipe


def highlighted(tokens: list[int], labels: list[int], tokenizer: Tokenizer, color: bool) -> str:
    """The decoded sample with every trained token (a label != IGNORE_INDEX predicts it)
    between markers: token j is trained when labels[j - 1] holds it."""
    on, off = (TRAINED_ON, TRAINED_OFF) if color else (PLAIN_ON, PLAIN_OFF)
    trained = [False] + [label != -100 for label in labels[:-1]]
    out, start = [], 0
    for j in range(1, len(tokens) + 1):  # cut where trained flips
        if j == len(tokens) or trained[j] != trained[start]:
            text = tokenizer.decode(tokens[start:j])
            out.append(f"{on}{text}{off}" if trained[start] else text)
            start = j
    return "".join(out)


def show(batch: dict, tokenizer: Tokenizer, as_json: bool, out=sys.stdout,
         color: bool | None = None) -> None:
    if color is None:
        color = out.isatty()
    for i in range(batch["tokens"].shape[0]):
        sample = {
            "input_ids": batch["tokens"][i].tolist(),
            "labels": batch["labels"][i].tolist(),
            "document_ids": batch["document_ids"][i].tolist(),
            "positions": batch["positions"][i].tolist(),
        }
        if as_json:
            print(json.dumps(sample), file=out)
            continue
        trained = sum(label != -100 for label in sample["labels"])
        docs = max(sample["document_ids"]) + 1
        print(f"=== sample {i}: {len(sample['input_ids'])} tokens, {docs} document(s), "
              f"{trained} trained labels", file=out)
        if trained < len(sample["labels"]):  # a loss mask: mark what is trained
            print(f"(trained tokens {'in bold green' if color else 'between [[ ]]'})", file=out)
            print(highlighted(sample["input_ids"], sample["labels"], tokenizer, color), file=out)
        else:
            print(tokenizer.decode(sample["input_ids"]), file=out)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        cfg, ns = parse_args(argv, parser)
        if ns.show is None:
            parser.error("nothing to do: give --show N")
        if ns.show < 1:
            raise DataError(f"--show must be >= 1, got {ns.show}")
        batch, tokenizer = first_samples(cfg, ns.show)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    show(batch, tokenizer, ns.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
