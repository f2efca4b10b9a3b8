"""`prepare`: a source tokenized once into a prepared folder (runtime.data.prepared reads it),
by a pool of worker processes, by Slurm array tasks, and resumably.

    prepare(source, encode, out, tokenizer, workers=8)          # everything, then publish
    prepare(..., shard=(i, n))                                  # the parts i, i + n, ... only
    finalize(out, plan)                                         # check all parts, publish

The work is cut into parts (runtime.data.prepare_parts: the plan depends on the input only),
written into `.<out name>.parts/` beside the output; each part is published there by a rename
with its files' sizes and CRC32s. A run that finds finished parts (a killed run, a rerun array
task) checks their sizes and checksums and writes only the others; a part that fails is
written again, a half-written one is a temporary folder nobody reads. Publishing builds the
folder under a temporary sibling from hard links to the parts' token files (no copy of the
tokens; the index arrays are rebuilt, trained.bin concatenated), writes meta.json and renames
it into place: `out` is absent or complete, never partial. The parts are then removed.

Locks: a plain run and `finalize` hold an exclusive flock on `.<out name>.lock` beside the
output (a second prepare into the same folder fails at once, naming the holder; the kernel
drops an flock when its process dies); a shard run holds `.shard-<i>-of-<n>.lock` in the work
folder. Two runs that write the same part anyway keep whichever finished first (same bytes).

Workers are spawned processes (safe with threads and CUDA in the parent), each given one
tokenizer thread (TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1): N workers use N cores.
One worker runs in the calling process, the tokenizer's own threads left as they are.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.atomic_dir import make_temp_dir
from runtime.checksums import describe_files
from runtime.errors import DataError
from runtime.data.prepare_parts import (DEFAULT_PART_BYTES, check_part, ensure_plan, make_plan,
                                        part_name, read_part, write_part)
from runtime.data.prepared import (CHAT_VERSION, DEFAULT_FILE_TOKENS, FORMAT, VERSION,
                                   chat_counts, tokenizer_info)
from runtime.data.progress import Progress
from runtime.data.sources import DocumentSource


POLL_S = 1.0  # how often the parent reads the workers' progress within their parts


class PrepareStopped(Exception):
    """A worker died (killed, out of memory): the finished parts are kept for a rerun."""


def default_workers() -> int:
    """Every core this process may run on (a Slurm allocation's, not the node's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


def token_dtype(tokenizer) -> str:
    return "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"


def plan_of(source: DocumentSource, tokenizer, *, file_tokens: int = DEFAULT_FILE_TOKENS,
            part_bytes: int = DEFAULT_PART_BYTES, settings: dict | None = None) -> dict:
    """The plan a prepare of `source` writes by (see runtime.data.prepare_parts)."""
    return make_plan(source, tokenizer_info(tokenizer), token_dtype(tokenizer), file_tokens,
                     part_bytes, settings)


# ============================================================================ entry points
def prepare(
    source: DocumentSource,
    encode: Callable[[list], list],
    out_dir: str | os.PathLike,
    tokenizer,
    *,
    batch_docs: int = 256,
    file_tokens: int = DEFAULT_FILE_TOKENS,
    part_bytes: int = DEFAULT_PART_BYTES,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    settings: dict | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    wait: bool = False,
) -> dict | None:
    """Tokenize `source` into `out_dir` and publish it (returns its meta dict); with `shard`
    = (i, n) only write parts i, i + n, ... and return None (`finalize` publishes). One
    writer per output folder: another `prepare` writing it is a DataError at once (`wait`:
    wait for it instead; the caller then gets "already exists" and may use its folder).
    `settings`: what else decides the tokens (the data config), recorded in the plan so a
    resume with other settings is refused. More than one worker pickles `source` and
    `encode` into spawned processes."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = plan_of(source, tokenizer, file_tokens=file_tokens, part_bytes=part_bytes,
                   settings=settings)
    work = work_dir(out)
    job = _Job(work, plan, source, encode, workers, batch_docs, log, progress)
    if shard is not None:
        i, n = shard
        if not 0 <= i < n:
            raise DataError(f"--shard {i}/{n}: i must be in [0, n)")
        if out.exists():
            raise DataError(f"{out}: already exists (finalized); nothing to do for shard {i}/{n}")
        work.mkdir(exist_ok=True)
        with _exclusive(work / f".shard-{i}-of-{n}.lock", f"{out} shard {i}/{n}", wait):
            ensure_plan(work, plan)
            job.run([k for k in range(len(plan["parts"])) if k % n == i], f"shard {i}/{n}")
        return None
    with _exclusive(_lock_of(out), str(out), wait):
        if out.exists():
            raise DataError(f"{out}: already exists; remove it or choose another output folder")
        if log:
            log(f"preparing {source.name} into {out}")
        ensure_plan(work, plan)
        job.run(range(len(plan["parts"])), "all")
        return _publish(out, work, plan, log)


def finalize(out_dir: str | os.PathLike, plan: dict, *, workers: int = 1,
             log: Callable[[str], None] | None = None) -> dict:
    """Publish the parts the shard runs wrote: every part present and sound (sizes and
    checksums, `workers` at a time), the plan the same as theirs. Returns the meta dict."""
    out = Path(out_dir)
    work = work_dir(out)
    with _exclusive(_lock_of(out), str(out), False):
        if out.exists():
            raise DataError(f"{out}: already exists (finalized before?)")
        if not (work / "plan.json").is_file():
            raise DataError(f"{work}: no parts to finalize; run `prepare --shard i/n` for "
                            f"every i first")
        ensure_plan(work, plan)
        job = _Job(work, plan, None, None, workers, 0, log, False)
        bad = job.check(range(len(plan["parts"])))
        if bad:
            listed = ", ".join(f"{k} ({why})" for k, why in sorted(bad.items())[:5])
            raise DataError(f"{work}: {len(bad)} of {len(plan['parts'])} parts not finished: "
                            f"part {listed}{' ...' if len(bad) > 5 else ''}; part k is written "
                            f"by `--shard i/n` with i = k mod n: rerun those shards")
        return _publish(out, work, plan, log)


# ============================================================================ the parts
class _Job:
    """Writes parts of one plan: verifies finished ones, writes the others (a pool)."""

    def __init__(self, work, plan, source, encode, workers, batch_docs, log, progress):
        self.work, self.plan, self.source, self.encode = work, plan, source, encode
        self.workers, self.batch_docs, self.log, self.progress = workers, batch_docs, log, progress
        self._pool: cf.ProcessPoolExecutor | None = None
        # tokens so far of each part under way, written by the workers after every batch
        # (shared memory, no lock: one writer per part) and read by the parent every POLL_S
        self._tokens = (multiprocessing.get_context("spawn").RawArray("q", len(plan["parts"]))
                        if workers > 1 and source is not None else None)

    def _say(self, msg: str) -> None:
        if self.log:
            self.log(msg)

    def _executor(self, tasks: int):
        if self.workers <= 1 or tasks <= 1:
            return None
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(
                max_workers=min(self.workers, tasks),
                mp_context=multiprocessing.get_context("spawn"),  # safe beside threads
                initializer=_init_worker, initargs=(self.source, self.encode, self._tokens))
        return self._pool

    def _map(self, fn, tasks: list, *args, report: Callable[[int, int], None] | None = None,
             poll: Callable[[], None] | None = None):
        """(task, result) as each finishes: in worker processes, or here for one worker.
        `report(task, tokens so far)` is passed to `fn` here; `poll()` is called every POLL_S
        while workers run."""
        pool = self._executor(len(tasks))
        if pool is None:
            for k in tasks:
                extra = {"report": functools.partial(report, k)} if report else {}
                yield k, fn(k, *args, source=self.source, encode=self.encode, **extra)
            return
        futures: dict[cf.Future, int] = {}
        finished = False
        try:
            for k in tasks:
                futures[pool.submit(fn, k, *args)] = k
            running = set(futures)
            while running:
                done, running = cf.wait(running, timeout=POLL_S if poll else None,
                                        return_when=cf.FIRST_COMPLETED)
                for future in done:
                    yield futures[future], future.result()
                if poll:
                    poll()
            finished = True
        except cf.process.BrokenProcessPool:
            raise PrepareStopped(
                f"a prepare worker died (killed, or out of memory?); the finished parts are "
                f"kept in {self.work}: run the same command again to resume") from None
        finally:
            for f in futures:
                f.cancel()
            if not finished:  # an error (bad input, a dead worker, Ctrl-C): stop the others now
                _terminate(pool)

    def check(self, parts) -> dict[int, str]:
        """{part: why it cannot be used} among `parts` (sizes and checksums)."""
        pieces = self.plan["parts"]
        try:
            return {k: why for k, why in self._map(_check, list(parts), self.work, pieces)
                    if why is not None}
        finally:
            self._close()

    def run(self, parts, what: str) -> None:
        parts = list(parts)
        try:
            self._run(parts, what)
        finally:
            self._close()

    def _run(self, parts: list[int], what: str) -> None:
        plan, work = self.plan, self.work
        started = [k for k in parts if (work / part_name(k)).is_dir()]
        bad = {k: why for k, why in self._map(_check, started, work, plan["parts"])
               if why is not None}
        for k, why in sorted(bad.items()):
            self._say(f"part {k} {why}: writing it again")
            _remove(work / part_name(k))
        done = [k for k in started if k not in bad]
        todo = [k for k in parts if k not in set(done)]
        sizes = plan["part_bytes"]
        if done:
            self._say(f"resuming: {len(done)} of {len(parts)} parts ({what}) already prepared "
                      f"(sizes and checksums verified), {len(todo)} to write")
        else:
            workers = min(self.workers, max(len(todo), 1))
            self._say(f"{len(todo)} parts to write ({what}), {workers} worker(s)")
        bar = Progress(sum(sizes[k] for k in parts), len(parts),
                       done_bytes=sum(sizes[k] for k in done), done_parts=len(done),
                       out=sys.stderr if self.progress else None)
        settings = plan["settings"]
        finished: set[int] = set()

        def poll():  # the workers' tokens so far of the parts under way
            counts = np.frombuffer(self._tokens, dtype=np.int64)
            for k in np.flatnonzero(counts).tolist():
                if k not in finished:
                    bar.partial(k, int(counts[k]), sizes[k])

        try:
            for k, info in self._map(_write, todo, work, plan["parts"], settings["dtype"],
                                     settings["file_tokens"], self.batch_docs,
                                     report=lambda k, n: bar.partial(k, n, sizes[k]),
                                     poll=poll if self._tokens is not None else None):
                finished.add(k)
                bar.update(sizes[k], info["num_tokens"], k)
        finally:
            bar.close()

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _terminate(pool: cf.ProcessPoolExecutor) -> None:
    """End a pool's workers now: their running parts are abandoned (temporary folders, never
    read). The executor offers no such call before Python 3.14 (terminate_workers), and its
    shutdown waits for the running parts (minutes each) or, on 3.11 after a worker died,
    joins the survivors, which wait for work forever."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()


_WORKER: dict = {}


def _init_worker(source, encode, tokens) -> None:
    # one tokenizer thread per worker: N workers on N cores, no oversubscription
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    _WORKER["source"], _WORKER["encode"], _WORKER["tokens"] = source, encode, tokens


def _write(k: int, work: Path, pieces: list, dtype: str, file_tokens: int, batch_docs: int,
           source=None, encode=None, report=None) -> dict:
    if source is None:  # in a worker process: tokens so far into the parent's shared array
        source, encode, tokens = _WORKER["source"], _WORKER["encode"], _WORKER["tokens"]
        if tokens is not None:
            report = functools.partial(tokens.__setitem__, k)
    return write_part(work, k, pieces[k], source, encode, dtype, file_tokens, batch_docs,
                      report)


def _check(k: int, work: Path, pieces: list, source=None, encode=None) -> str | None:
    return check_part(work, k, pieces[k])


def _remove(folder: Path) -> None:
    """Delete a folder of the work area: renamed aside first, so it is never half there."""
    aside = folder.parent / f".{folder.name}.bad-{os.getpid()}"
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


# ============================================================================ publishing
def _link(src: Path, dst: Path) -> None:
    """`dst` the same file as `src` (a hard link: no copy), a copy where links fail."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _assemble(work: Path, plan: dict, tmp: Path) -> dict:
    """The prepared folder of a plan's finished parts, written into `tmp`; its meta dict."""
    infos = [read_part(work, k) for k in range(len(plan["parts"]))]
    token_files, records, masked = [], {}, any(i["masked"] for i in infos)
    for k, info in enumerate(infos):
        for f in info["token_files"]:
            name = f"tokens-{len(token_files):05d}.bin"
            _link(work / part_name(k) / f["name"], tmp / name)
            token_files.append({"name": name, "tokens": f["tokens"]})
            records[name] = info["files"][f["name"]]
    if masked:
        with open(tmp / "trained.bin", "wb") as out:
            for k, info in enumerate(infos):
                if info["masked"]:
                    with open(work / part_name(k) / "trained.bin", "rb") as f:
                        shutil.copyfileobj(f, out, 16 << 20)
                else:
                    n = info["num_tokens"]
                    for lo in range(0, n, 1 << 24):
                        out.write(np.ones(min(1 << 24, n - lo), np.uint8).tobytes())
    arrays = _index(work, plan, infos)
    for name, values in arrays.items():
        np.save(tmp / f"{name}.npy", values, allow_pickle=False)
    num_docs = int(sum(i["num_docs"] for i in infos))
    if not num_docs:
        raise DataError(f"data: no non-empty documents in {plan['source']}")
    written = describe_files(tmp, [n for n in os.listdir(tmp) if n not in records])
    settings = plan["settings"]
    extra = {}
    if "chat" in settings:  # runtime.data.chat.prepared reads these folders
        extra["chat"] = {**settings["chat"], **chat_counts(arrays, settings["chat"]["seq_len"])}
    return {
        "format": FORMAT, "version": CHAT_VERSION if extra else VERSION, "source": plan["source"],
        "dtype": settings["dtype"], "num_tokens": int(arrays["doc_offsets"][-1]),
        "num_docs": num_docs, "max_token_id": max(i["max_token_id"] for i in infos),
        "masked": masked, "token_files": token_files, "tokenizer": settings["tokenizer"],
        "files": dict(sorted({**records, **written}.items())), **extra,
    }


def _index(work: Path, plan: dict, infos: list[dict]) -> dict[str, np.ndarray]:
    """The folder's document index from the parts': offsets made global, a split shard's
    record ordinals and line indices continued from its earlier pieces."""
    shards = plan["shards"]
    shard_records = np.zeros(shards, np.int64)
    shard_lines = np.zeros(shards, np.int64)
    shard_docs = np.zeros(shards, np.int64)
    offsets, record, index, rendered = [np.zeros(1, np.int64)], [], [], []
    chat = "chat" in plan["settings"]
    base = 0
    for k, info in enumerate(infos):
        a = {n: np.load(work / part_name(k) / f"{n}.npy", allow_pickle=False)
             for n in ("doc_offsets", "doc_record", "doc_index") + (("doc_rendered",) * chat)}
        if chat:
            rendered.append(a["doc_rendered"])
        offsets.append(a["doc_offsets"][1:] + base)
        base += int(a["doc_offsets"][-1])
        first = 0
        for piece in info["pieces"]:
            s, docs = piece["shard"], piece["docs"]
            record.append(a["doc_record"][first:first + docs] + shard_records[s])
            index.append(a["doc_index"][first:first + docs] + shard_lines[s])
            shard_records[s] += piece["records"]
            shard_lines[s] += piece["lines"]
            shard_docs[s] += docs
            first += docs
    arrays = {"doc_offsets": np.concatenate(offsets),
              "doc_record": np.concatenate(record or [np.zeros(0, np.int64)]),
              "doc_index": np.concatenate(index or [np.zeros(0, np.int64)]),
              "shard_records": shard_records, "shard_docs": shard_docs}
    if chat:  # each conversation's length before data.chat_overflow (0 stored: dropped)
        arrays["doc_rendered"] = np.concatenate(rendered or [np.zeros(0, np.int64)])
    return arrays


def _publish(out: Path, work: Path, plan: dict, log) -> dict:
    tmp = make_temp_dir(out)  # mkdir's mode (mkdtemp's 0700 would hide it from a team)
    try:
        meta = _assemble(work, plan, tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.rename(tmp, out)  # atomic on one filesystem; fails if `out` appeared meanwhile
    except OSError:
        if out.exists():  # without flock support, two writers meet here: the first won
            raise DataError(f"{out}: already exists (another prepare finished first; "
                            f"its folder is kept)") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return meta


def _lock_of(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def _exclusive(lock_path: Path, what: str, wait: bool):
    """Hold an exclusive flock on `lock_path` while `what` is written. The kernel drops an
    flock when its process dies (kill -9 too): nothing stale to clean up. On a filesystem
    without flock the final rename still lets only the first writer win."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise DataError(f"{what}: another prepare ({holder}) is writing it; wait for it to "
                            f"finish or choose another output folder") from None
        except OSError:
            pass  # no flock here (some network filesystems): the rename decides
        if held:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        if held:  # a waiter may hold the unlinked file next: harmless, it finds `out`
            lock_path.unlink(missing_ok=True)
        os.close(fd)


# ============================================================================ the embedded corpus
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gptoss-runtime" / "data"


def cached_prepared(source: DocumentSource, source_file: Path, tokenizer, encode,
                    cache_dir: str | os.PathLike = "") -> Path:
    """`source` (one file, e.g. the embedded corpus) prepared for `tokenizer` in the cache,
    keyed by the file's and the tokenizer's hashes; prepared on first use. Several ranks
    may race: the first takes the folder's lock and writes, the others wait for it. An unwritable
    default cache falls back to the temporary directory; an unwritable data.cache_dir is an
    error naming it."""
    digest = hashlib.sha256(source_file.read_bytes()).hexdigest()[:16]
    name = f"{source_file.name.split('.')[0]}-{digest}-{tokenizer.fingerprint}-v{VERSION}"
    roots = [Path(cache_dir).expanduser()] if cache_dir else [
        default_cache_dir(), Path(tempfile.gettempdir()) / "gptoss-runtime-data"]
    error: OSError | None = None
    for root in roots:
        out = root / name
        try:
            if not (out / "meta.json").is_file():  # the first rank writes, the others wait
                prepare(source, encode, out, tokenizer, wait=True)
            return out
        except OSError as e:  # unwritable, or another rank renamed its copy first
            if (out / "meta.json").is_file():
                return out
            error = e
        except DataError:  # "already exists": another rank finished first
            if (out / "meta.json").is_file():
                return out
            raise
    key = "data.cache_dir" if cache_dir else "the data cache"
    raise DataError(f"{key} {roots[-1]}: cannot write: {' '.join(str(error).split())}")
