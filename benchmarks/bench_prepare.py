"""`prepare` throughput at 1..N workers (issue #23): tokens/s of wall time and of CPU time.

    python benchmarks/bench_prepare.py --mb 24 --workers 1,2 --repeats 3
      -> one JSON line per run in benchmarks/results/prepare-<date>.jsonl, a summary on stdout
    python benchmarks/bench_prepare.py --chat --mb 4 --workers 1,2
      -> the same for chat records (data.dataset = "chat"): the embedded chat sample
         (runtime/assets/chat_sample/train.jsonl.gz) repeated, rendered with the built-in
         harmony renderer, masked (last_assistant) and cut for seq_len 512 (cut_turns), as
         configs/debugmodel_sft.toml prepares it; tokens are the stored (packed) tokens

The corpus is the embedded one (runtime/assets/corpus.jsonl.gz) repeated to `--mb` megabytes
of JSON lines over 4 files, tokenized with the embedded tokenizer (or --tokenizer DIR, e.g. a
gpt-oss checkpoint). Parts of `--part-mb` (default 1 MB: enough parts to keep every worker
busy on a small corpus; prepare's default is 128 MB). Variants:
  workers=1 threads=default  one process, the tokenizers library's own thread pool as is
  workers=1 threads=1        one process, one thread (TOKENIZERS_PARALLELISM=false)
  workers=N                  N spawned workers, one tokenizer thread each
On a shared machine the wall time depends on the load (recorded): the best of --repeats
counts, and the CPU time (this process + its workers) shows the work itself.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.data import DataConfig, FileSource, TextEncoder, Tokenizer  # noqa: E402
from runtime.data.chat.prepared import ChatPrepareEncoder, chat_prepare_settings  # noqa: E402
from runtime.data.chat.source import build_chat_source  # noqa: E402
from runtime.data.preparing import prepare  # noqa: E402

CHAT_SAMPLE = ROOT / "runtime/assets/chat_sample/train.jsonl.gz"
CHAT_SEQ_LEN = 512  # configs/debugmodel_sft.toml


def corpus(folder: Path, mb: float, files: int = 4, source: Path = ROOT /
           "runtime/assets/corpus.jsonl.gz") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(source, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    target = int(mb * (1 << 20)) // files
    paths = []
    for i in range(files):
        path = folder / f"c{i}.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            written, j = 0, i
            while written < target:
                written += out.write(lines[j % len(lines)])
                j += 1
        paths.append(path)
    return paths


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers, once they have exited
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def inputs(files, tok, chat: bool) -> tuple:
    """(source, encoder, plan settings) of the benchmark's prepare."""
    if not chat:
        return FileSource(files), TextEncoder(tok), None
    cfg = DataConfig(dataset="chat", dataset_path=str(files[0].parent), chat_date="2026-01-15")
    cfg, settings = chat_prepare_settings(cfg, CHAT_SEQ_LEN, tok)
    return build_chat_source(cfg), ChatPrepareEncoder(tok, cfg, CHAT_SEQ_LEN), settings


def run(files, tok, workers: int, threads: str, part_bytes: int, out: Path,
        chat: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    if threads == "1":
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    start, cpu = time.perf_counter(), cpu_seconds()
    source, encode, settings = inputs(files, tok, chat)
    meta = prepare(source, encode, out, tok, workers=workers, part_bytes=part_bytes,
                   settings=settings)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    extra = {"conversations": meta["chat"]["conversations"], "cut": meta["chat"]["cut"],
             "dropped": meta["chat"]["dropped"]} if chat else {}
    return {**extra, "workers": workers, "tokenizer_threads": threads, "tokens": meta["num_tokens"],
            "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "tokens_per_s": round(meta["num_tokens"] / wall),
            "tokens_per_cpu_s": round(meta["num_tokens"] / cpu) if cpu else None,
            "load_avg_1m": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=24.0)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--part-mb", type=float, default=1.0)
    ap.add_argument("--tokenizer", default="")
    ap.add_argument("--chat", action="store_true",
                    help="chat records (the embedded chat sample) instead of text")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"
                                         / f"prepare-{datetime.date.today()}.jsonl"))
    args = ap.parse_args()
    tok = Tokenizer.load(args.tokenizer)
    variants = [(1, "default"), (1, "1")] + [(int(w), "1") for w in args.workers.split(",")
                                             if int(w) > 1]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        files = corpus(Path(tmp) / "in", args.mb, source=CHAT_SAMPLE) if args.chat else \
            corpus(Path(tmp) / "in", args.mb)
        for rep in range(args.repeats):
            for workers, threads in variants:
                r = run(files, tok, workers, threads, int(args.part_mb * (1 << 20)),
                        Path(tmp) / "out", args.chat)
                r.update(bench="prepare-chat" if args.chat else "prepare", repeat=rep, input_mb=args.mb, part_mb=args.part_mb,
                         cores=len(os.sched_getaffinity(0)), tokenizer=tok.source,
                         date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                             timespec="seconds"))
                results.append(r)
                print(json.dumps(r), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    best = {}
    for r in results:
        key = (r["workers"], r["tokenizer_threads"])
        if key not in best or r["wall_s"] < best[key]["wall_s"]:
            best[key] = r
    base = best[(1, "1")]["tokens_per_s"]
    print("\nbest of", args.repeats, "| workers | tokenizer threads | tokens/s | vs 1 worker, 1 thread")
    for (workers, threads), r in sorted(best.items()):
        print(f"| {workers} | {threads} | {r['tokens_per_s'] / 1e6:.2f}M | "
              f"{r['tokens_per_s'] / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
