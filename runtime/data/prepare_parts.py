"""The parts of a `prepare`: the plan that cuts a source into parts, and one part written.

A part is a run of records in source order: several small shards (files) together, one
byte range of a large plain `.jsonl` file (cut at line starts near every `part_bytes`), a
run of row groups of a large `.parquet` file (by their compressed sizes), or one row range
of an HF dataset read by index (a save_to_disk folder, hf_streaming = false). The
plan depends on the input and the settings only, never on the worker or node count, so any
split of the work (`--workers`, `--shard i/n`, a resumed run) writes the same parts, and the
finished folder is the same bytes.

The work folder `.<out name>.parts/` beside the output holds:

  plan.json        the plan and what it was made from (input sizes and mtimes, tokenizer,
                   settings): a resume or another shard with other inputs is refused
  part-NNNNN/      one finished part (written as `.part-NNNNN.tmp-*`, then renamed: a kill
                   leaves only a temporary folder, never read): tokens-NN.bin (documents never
                   span two; at most `file_tokens` each), trained.bin (when masked),
                   doc_offsets/doc_record/doc_index/piece_docs.npy (+ doc_rendered.npy
                   for chat), and part.json with each
                   piece's counts and every file's size and CRC32

`write_part` runs in a worker process (or in the caller for one worker). Test hook:
GPTOSS_PREPARE_FAULT=kill:K kills the process writing part K after its first batch
(a deterministic stand-in for a node or worker lost mid-part).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.atomic_dir import make_temp_dir
from runtime.checksums import check_checksums, check_sizes, describe_files, valid_records
from runtime.errors import DataError
from runtime.data.packing import Document

PLAN_FORMAT = "gptoss-runtime-prepare-plan"
PLAN_VERSION = 1
DEFAULT_PART_BYTES = 128 << 20  # of input: ~30M tokens of English text per part
PART_ARRAYS = ("doc_offsets", "doc_record", "doc_index", "piece_docs")

Piece = tuple  # (shard, lo, hi): hi == -1 is the whole shard, else a range (runtime.data.sources)


# ============================================================================ the plan
def plan_parts(source, part_bytes: int) -> tuple[list[list[Piece]], list[int]]:
    """(parts, their input bytes): consecutive small shards share a part up to `part_bytes`;
    a larger splittable file is cut at the line (row group) starts after every `part_bytes`;
    a shard of unknown size (a dataset library's) is one part."""
    parts: list[list[Piece]] = []
    sizes: list[int] = []
    group: list[Piece] = []
    group_bytes = 0

    def close():
        nonlocal group, group_bytes
        if group:
            parts.append(group)
            sizes.append(group_bytes)
        group, group_bytes = [], 0

    for shard in range(source.num_shards()):
        known = source.shard_size(shard)
        if known is None:
            close()
            parts.append([(shard, 0, -1)])
            sizes.append(0)
            continue
        size, split = known
        if split and size > part_bytes:
            close()
            cuts = source.cut_points(shard, part_bytes)
            for lo, hi in zip(cuts, cuts[1:]):
                parts.append([(shard, lo, hi)])
                sizes.append(hi - lo)
            continue
        if group and group_bytes + size > part_bytes:
            close()
        group.append((shard, 0, -1))
        group_bytes += size
    close()
    return parts, sizes


def inputs_of(source) -> list:
    """What the plan was made from: each shard's file, size and mtime (else its name)."""
    files = getattr(source, "files", None)
    if getattr(source, "saved", ""):  # a save_to_disk folder: its files
        root = Path(source.dataset).expanduser()
        files = sorted(p for p in root.rglob("*") if p.is_file())
    if files is None:
        return [source.name]
    out = []
    for f in files:
        st = Path(f).stat()
        out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def make_plan(source, tokenizer_info: dict, dtype: str, file_tokens: int, part_bytes: int,
              settings: dict | None) -> dict:
    parts, sizes = plan_parts(source, part_bytes)
    return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "source": source.name,
            "shards": source.num_shards(), "inputs": inputs_of(source),
            "settings": {"dtype": dtype, "file_tokens": file_tokens, "part_bytes": part_bytes,
                         "tokenizer": tokenizer_info, **(settings or {})},
            "parts": [[list(p) for p in part] for part in parts], "part_bytes": sizes}


def ensure_plan(work: Path, plan: dict) -> bool:
    """Record `plan` in the work folder, or check it equals the recorded one (a resume,
    another shard). True when it was already there. Safe against concurrent shards: the
    file appears whole (a hard link of a complete temporary file) or not at all."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "plan.json"
    if not path.is_file():
        tmp = work / f".plan.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(plan) + "\n")
        try:
            os.link(tmp, path)  # fails if another shard wrote it first: compare with theirs
            return False
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({' '.join(str(e).split())}); remove {work} to "
                        f"start over") from None
    if have != plan:
        key = next((k for k in ("source", "inputs", "settings", "parts")
                    if have.get(k) != plan.get(k)), "format")
        raise DataError(f"{work}: holds the parts of another prepare (its {key} differ: input "
                        f"files changed, or another tokenizer or settings); remove {work} to "
                        f"start over, or prepare exactly what it holds")
    return True


def part_name(k: int) -> str:
    return f"part-{k:05d}"


# ============================================================================ one part
class _PartWriter:
    """Appends documents to token files of at most `file_tokens` tokens; records the index."""

    def __init__(self, out: Path, dtype: np.dtype, file_tokens: int):
        self.out, self.dtype, self.file_tokens = out, dtype, file_tokens
        self.files: list[dict] = []
        self._fh = None
        self._trained = open(out / "trained.bin", "wb")
        self.masked = False
        self.offsets, self.record, self.index = [0], [], []
        self.rendered: list[int] = []  # chat: each conversation's length before overflow
        self.max_id = -1

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"tokens-{len(self.files):02d}.bin"
        self.files.append({"name": name, "tokens": 0})
        self._fh = open(self.out / name, "wb")

    def add(self, doc: Document, record: int, index: int, where: str) -> None:
        tokens = np.asarray(doc.tokens)
        n = len(tokens)
        if self._fh is None or (self.files[-1]["tokens"] and
                                self.files[-1]["tokens"] + n > self.file_tokens):
            self._open_next()
        if n and int(tokens.min()) < 0:
            raise DataError(f"data: negative token id in {where}")
        self.max_id = max(self.max_id, int(tokens.max()) if n else -1)
        self._fh.write(tokens.astype(self.dtype).tobytes())
        trained = np.ones(n, np.uint8) if doc.trained is None else np.asarray(doc.trained, np.uint8)
        self.masked |= doc.trained is not None and not trained.all()
        self._trained.write(trained.tobytes())
        self.files[-1]["tokens"] += n
        self.offsets.append(self.offsets[-1] + n)
        if doc.length is not None:
            self.rendered.append(int(doc.length))
        self.record.append(record)
        self.index.append(index)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._trained.close()
        if not self.masked:
            (self.out / "trained.bin").unlink()


def _fault(k: int) -> bool:
    return os.environ.get("GPTOSS_PREPARE_FAULT", "") == f"kill:{k}"


def _fill(tmp: Path, k: int, pieces: list[Piece], source, encode: Callable, dtype: np.dtype,
          file_tokens: int, batch_docs: int, report: Callable[[int], None] | None) -> dict:
    writer = _PartWriter(tmp, dtype, file_tokens)
    out = []
    for shard, lo, hi in pieces:
        items = source.shard_items(shard) if hi < 0 else source.range_items(shard, (lo, hi))
        records, docs_before = 0, len(writer.record)
        pending: list[tuple[int, int, object]] = []

        def flush():
            for (record, index, _), doc in zip(pending, encode([it for *_, it in pending]),
                                               strict=True):
                writer.add(doc, record, index, f"shard {shard} record {index}")
            pending.clear()
            if report is not None:
                report(writer.offsets[-1])  # tokens so far: the progress bar moves in a part
            if _fault(k):
                os.kill(os.getpid(), signal.SIGKILL)

        for record, (index, item) in enumerate(items):
            records = record + 1
            if source.keep(item):
                pending.append((record, index, item))
                if len(pending) >= batch_docs:
                    flush()
        if pending:
            flush()
        lines = source.range_length(shard, (lo, hi)) if hi >= 0 else records
        out.append({"shard": shard, "lo": lo, "hi": hi, "records": records, "lines": lines,
                    "docs": len(writer.record) - docs_before})
    writer.close()
    arrays = {"doc_offsets": writer.offsets, "doc_record": writer.record,
              "doc_index": writer.index, "piece_docs": [p["docs"] for p in out]}
    if writer.rendered:  # chat (runtime.data.chat.prepared): every document has one
        if len(writer.rendered) != len(writer.record):
            raise DataError(f"data: part {k}: a chat encoder gave some documents no length")
        arrays["doc_rendered"] = writer.rendered
    for name, values in arrays.items():
        np.save(tmp / f"{name}.npy", np.asarray(values, dtype=np.int64), allow_pickle=False)
    return {"part": k, "pieces": out, "token_files": writer.files,
            "num_tokens": writer.offsets[-1], "num_docs": len(writer.record),
            "max_token_id": writer.max_id, "masked": writer.masked,
            "files": describe_files(tmp, sorted(p.name for p in tmp.iterdir()))}


def write_part(work: Path, k: int, pieces: list[Piece], source, encode: Callable, dtype: str,
               file_tokens: int, batch_docs: int,
               report: Callable[[int], None] | None = None) -> dict:
    """Tokenize part `k` into `work/part-k` (built under a temporary name, then renamed).
    Returns its part.json (tokens, documents, ...). `report(tokens so far)` after every
    batch."""
    final = work / part_name(k)
    tmp = make_temp_dir(final)
    try:
        info = _fill(tmp, k, [tuple(p) for p in pieces], source, encode, np.dtype(dtype),
                     file_tokens, batch_docs, report)
        (tmp / "part.json").write_text(json.dumps(info, indent=1) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "part.json").is_file():
                raise
            # another writer of the same plan (an overlapping run) finished it first: keep
            # theirs, it holds the same bytes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def read_part(work: Path, k: int) -> dict | None:
    """A finished part's part.json, or None when it is not there (not written, or damaged)."""
    try:
        info = json.loads((work / part_name(k) / "part.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and valid_records(info.get("files")) else None


def check_part(work: Path, k: int, pieces: list, checksums: bool = True) -> str | None:
    """Why finished part `k` cannot be used (missing, another plan's, resized, failing its
    checksum), or None when it is sound."""
    info = read_part(work, k)
    if info is None:
        return "missing"
    if [[p["shard"], p["lo"], p["hi"]] for p in info.get("pieces", [])] != pieces:
        return "from another plan"
    folder = work / part_name(k)
    files = info["files"]
    return check_sizes(folder, files, "part.json") or (
        check_checksums(folder, files, sorted(files)) if checksums else None)
