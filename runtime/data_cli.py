"""The data command: inspect, prepare and time a job's data path.

  python -m runtime.data --config C [--section.key=value ...] --show N [--json]
      the first N packed samples exactly as the trainer receives them: as text, or with
      --json one line per sample {"input_ids", "labels", "document_ids", "positions"}
      (labels -100 on untrained tokens)
  python -m runtime.data prepare --config C [overrides] --out DIR
      tokenize the config's [data] source once into memory-mapped token files + a document
      index (runtime/data/prepared.py; chat: rendered, masked and cut for training.seq_len,
      runtime/data/chat/prepared.py); train on it with
      --data.dataset=prepared --data.dataset_path=DIR
  python -m runtime.data --config C [overrides] --bench N [--dp-degree D] [--dp-rank R]
      ms per step of data-parallel rank R of D for the config's local batch (the global
      batch grows with D); the last line is `ms/step <number>`

Bad input: `error: <one line naming the file or key>`, exit 2.
This module sits in the top layer with runtime/plan.py: it reads the job's TOML through the
trainer's config loader (runtime/train/config), which the data package itself never imports.
runtime/data/__main__.py only forwards `python -m runtime.data` here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

from runtime.data.loader import build_dataloader
from runtime.data.prepare_parts import DEFAULT_PART_BYTES
from runtime.data.chat.source import build_chat_source
from runtime.data.prepared import PreparedDataset
from runtime.data.chat.prepared import ChatPrepareEncoder, chat_prepare_settings
from runtime.data.preparing import (PrepareStopped, default_workers, finalize, plan_of,
                                    prepare, work_dir)
from runtime.data.sources import build_source, source_kind
from runtime.data.tokenizer import Tokenizer
from runtime.errors import ConfigError, DataError, report_config_error
from runtime.model.loss import IGNORE_INDEX
from runtime.train.config.loader import build_parser, parse_args


def _parser(prepare_command: bool) -> argparse.ArgumentParser:
    parser = build_parser("python -m runtime.data" + (" prepare" if prepare_command else ""))
    if prepare_command:
        parser.add_argument("--out", required=True, metavar="DIR",
                            help="folder to write (must not exist)")
        parser.add_argument("--workers", type=int, default=None, metavar="N",
                            help="worker processes (default: every core this process may use)")
        parser.add_argument("--shard", default=None, metavar="I/N",
                            help="write only part I of N (a Slurm array task); then --finalize")
        parser.add_argument("--finalize", action="store_true",
                            help="check the parts every --shard wrote and publish the folder")
        parser.add_argument("--part-mb", type=float, default=DEFAULT_PART_BYTES / (1 << 20),
                            metavar="MB", help="input megabytes per part (the unit of work, "
                            "resume and token file; the same for every shard and the finalize)")
        return parser
    parser.add_argument("--show", type=int, metavar="N", default=None,
                        help="print the first N packed samples as the trainer receives them")
    parser.add_argument("--json", action="store_true",
                        help="--show: one JSON line per sample (input_ids, labels, ...)")
    parser.add_argument("--bench", type=int, metavar="N", default=None,
                        help="time N steps of one data-parallel rank's loader")
    parser.add_argument("--dp-degree", type=int, default=1, metavar="D")
    parser.add_argument("--dp-rank", type=int, default=0, metavar="R")
    return parser


# ------------------------------------------------------------------------------- --show
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
    trained = [False] + [label != IGNORE_INDEX for label in labels[:-1]]
    out, start = [], 0
    for j in range(1, len(tokens) + 1):  # cut where trained flips
        if j == len(tokens) or trained[j] != trained[start]:
            text = tokenizer.decode(tokens[start:j])
            out.append(f"{on}{text}{off}" if trained[start] else text)
            start = j
    pad = re.escape(tokenizer.decode([tokenizer.pad_id]))
    return re.sub(f"(?:{pad}){{4,}}", lambda m: f"{tokenizer.decode([tokenizer.pad_id])} x "
                  f"{len(m.group(0)) // len(tokenizer.decode([tokenizer.pad_id]))}", "".join(out))


def show(batch: dict, tokenizer: Tokenizer, as_json: bool, out=None,
         color: bool | None = None) -> None:
    # sys.stdout at call time (a default argument would be the stream of import time, which
    # pytest's capture may have closed since: test_docs failed after another test's capture)
    out = sys.stdout if out is None else out
    if color is None:
        color = out.isatty()
    for i in range(batch["tokens"].shape[0]):
        sample = {
            "input_ids": batch["tokens"][i].tolist(),
            "labels": batch["labels"][i].tolist(),
            # null with data.document_mask = false: the trainer gets no document ids then
            "document_ids": (batch["document_ids"][i].tolist() if "document_ids" in batch
                             else None),
            "positions": batch["positions"][i].tolist(),
        }
        if as_json:
            print(json.dumps(sample), file=out)
            continue
        trained = sum(label != IGNORE_INDEX for label in sample["labels"])
        docs = max(sample["document_ids"]) + 1 if sample["document_ids"] else 1
        print(f"=== sample {i}: {len(sample['input_ids'])} tokens, {docs} document(s), "
              f"{trained} trained labels", file=out)
        if trained < len(sample["labels"]):  # a loss mask: mark what is trained
            print(f"(trained tokens {'in bold green' if color else 'between [[ ]]'})", file=out)
            print(highlighted(sample["input_ids"], sample["labels"], tokenizer, color), file=out)
        else:
            print(tokenizer.decode(sample["input_ids"]), file=out)


# ------------------------------------------------------------------------------- prepare
# [data] keys that only change how prepared data is read, not its tokens
READ_TIME_KEYS = ("shuffle", "shuffle_seed", "shuffle_buffer", "prefetch", "cache_dir",
                  "document_mask", "chat_overflow", "max_dropped_fraction", "pack",
                  "pack_buffer", "tokenize_batch_docs")


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise DataError(f"--shard {text!r}: expected I/N with 0 <= I < N (e.g. "
                        f"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(m.group(1)), int(m.group(2))


def prepare_inputs(data_cfg, seq_len: int, tokenizer) -> tuple:
    """(source, encoder, plan settings) of a `prepare` of a [data] config. Chat is rendered,
    masked and cut for `seq_len` (training.seq_len) now (runtime.data.chat.prepared); text
    does not depend on seq_len."""
    if source_kind(data_cfg) == "chat":
        data_cfg, settings = chat_prepare_settings(data_cfg, seq_len, tokenizer)
        source = build_chat_source(data_cfg)
        encode = ChatPrepareEncoder(tokenizer, data_cfg, seq_len)
    else:
        source = build_source(data_cfg)
        encode = source.encoder(tokenizer)
        settings = {"data": {k: v for k, v in dataclasses.asdict(data_cfg).items()
                             if k not in READ_TIME_KEYS}}
    if getattr(source, "shuffle", False):
        source.shuffle = False  # stored in natural order; data.shuffle applies when reading
    return source, encode, settings


def _rendered_date(out: Path) -> str:
    """The render date of the chat parts already in `out`'s work folder (a resume, another
    shard, the finalize may run on another day than the first part), else ''."""
    try:
        plan = json.loads((work_dir(out) / "plan.json").read_text())
        return str(plan["settings"]["chat"]["chat_date"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def run_prepare(cfg, ns) -> int:
    out, shard = ns.out, _shard(ns.shard)
    workers = default_workers() if ns.workers is None else ns.workers
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if ns.part_mb <= 0:
        raise DataError(f"--part-mb must be > 0, got {ns.part_mb}")
    if shard and ns.finalize:
        raise DataError("--shard and --finalize are two steps: give one of them")
    kind = source_kind(cfg.data)
    if kind == "prepared":
        raise DataError("prepare: data.dataset = 'prepared' is prepared already; name the "
                        "source ('path', 'hf', 'embedded' or 'chat')")
    tokenizer = Tokenizer.load(cfg.model.tokenizer_path)
    data_cfg = cfg.data
    if kind == "chat" and not data_cfg.chat_date:  # "" = today, unless parts exist already
        data_cfg = dataclasses.replace(data_cfg, chat_date=_rendered_date(Path(out)))
    source, encode, settings = prepare_inputs(data_cfg, cfg.training.seq_len, tokenizer)
    opts = dict(part_bytes=max(1, int(ns.part_mb * (1 << 20))), settings=settings)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    try:
        if ns.finalize:
            meta = finalize(out, plan_of(source, tokenizer, **opts), workers=workers, log=log)
        else:
            meta = prepare(source, encode, out, tokenizer, workers=workers, shard=shard,
                           log=log, progress=True, **opts)
    except OSError as e:  # an unwritable parent, a full disk: nothing was published
        raise DataError(f"--out {out}: cannot write: {' '.join(str(e).split())}") from None
    except KeyboardInterrupt:  # Ctrl-C: one line, the finished parts stay for a resume
        print(f"error: interrupted; finished parts are kept in {work_dir(Path(out))}: run the "
              f"same command again to resume", file=sys.stderr)
        return 130
    if meta is None:
        print(f"prepared shard {shard[0]}/{shard[1]} of {source.name} in "
              f"{time.perf_counter() - start:.1f}s; when every shard is done: prepare "
              f"--finalize --out {out}")
        return 0
    chat = meta.get("chat")
    what = (f"{chat['conversations']} conversations ({chat['cut']} cut, {chat['dropped']} "
            f"dropped for seq_len {chat['seq_len']}, data.chat_overflow = "
            f"{chat['chat_overflow']!r})" if chat else f"{meta['num_docs']} documents")
    print(f"prepared {what}, {meta['num_tokens']} tokens "
          f"({meta['dtype']}) of {meta['source']} into {out} in "
          f"{time.perf_counter() - start:.1f}s; train with --data.dataset=prepared "
          f"--data.dataset_path={out}")
    return 0


# ------------------------------------------------------------------------------- --bench
def bench_global_batch(cfg, dp_degree: int) -> int:
    """The global batch of the config at this dp degree (the local batch stays fixed)."""
    t = cfg.training
    if t.global_batch_size == -1:
        return t.local_batch_size * dp_degree
    if t.global_batch_size % (t.local_batch_size * dp_degree):
        raise DataError(f"training.global_batch_size ({t.global_batch_size}) is not a multiple "
                        f"of local_batch_size x --dp-degree ({t.local_batch_size * dp_degree})")
    return t.global_batch_size


def run_bench(cfg, steps: int, dp_degree: int, dp_rank: int) -> int:
    if steps < 1:
        raise DataError(f"--bench must be >= 1, got {steps}")
    tokenizer = Tokenizer.load(cfg.model.tokenizer_path)
    global_batch = bench_global_batch(cfg, dp_degree)
    start = time.perf_counter()
    loader = build_dataloader(cfg.data, tokenizer, cfg.training.seq_len, global_batch,
                              dp_rank, dp_degree, prefetch=cfg.data.prefetch)
    next(loader)  # startup: preparing the embedded corpus on first use, the prefetch thread
    startup = time.perf_counter() - start
    kind = "prepared, read by offset" if isinstance(loader.source, PreparedDataset) else \
        "streamed, every rank encodes the global batch"
    print(f"data: {loader.source.name} ({kind}), prefetch {cfg.data.prefetch}")
    print(f"rank {dp_rank} of {dp_degree}: {loader.local_batch_size} x {cfg.training.seq_len} "
          f"tokens per step of a global {global_batch}; first batch {startup * 1e3:.0f} ms")
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(loader)
    per_step = (time.perf_counter() - start) / steps
    cpu_per_step = (time.process_time() - cpu_start) / steps  # every thread of the process
    loader.close()
    print(f"cpu ms/step {cpu_per_step * 1e3:.3f} (all threads; robust on a busy machine)")
    print(f"ms/step {per_step * 1e3:.3f}")  # the training thread's wait for a batch
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prepare_command = bool(argv) and argv[0] == "prepare"
    parser = _parser(prepare_command)
    try:
        cfg, ns = parse_args(argv[1:] if prepare_command else argv, parser)
        if prepare_command:
            return run_prepare(cfg, ns)
        if ns.bench is not None:
            if not 0 <= ns.dp_rank < ns.dp_degree:
                raise DataError(f"--dp-rank {ns.dp_rank} is not in [0, --dp-degree {ns.dp_degree})")
            return run_bench(cfg, ns.bench, ns.dp_degree, ns.dp_rank)
        if ns.show is None:
            parser.error("nothing to do: give --show N, --bench N, or the prepare command")
        if ns.show < 1:
            raise DataError(f"--show must be >= 1, got {ns.show}")
        batch, tokenizer = first_samples(cfg, ns.show)
    except ConfigError as e:  # DataError included
        return report_config_error(e)
    except PrepareStopped as e:  # a worker died: not bad input, the parts are kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    show(batch, tokenizer, ns.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
