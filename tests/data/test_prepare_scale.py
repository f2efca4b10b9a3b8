"""`prepare` at scale (issue #23): worker pools, resuming, shards; every way of splitting the
work writes the same bytes as one process, and the same token stream as the streamed source."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.data import FileSource, TextEncoder, Tokenizer
from runtime.data.prepared import PreparedDataset
from runtime.data.preparing import PrepareStopped, prepare, work_dir

PART = 2048  # input bytes per part: the inputs below make ~20 parts


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["data", "token", "shard", "node", "prepare", "résumé", "naïve", "日本語", "<|endoftext|>"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def _lines(texts: list[str]) -> str:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, list[Path]]:
    """A multi-file corpus (several small files share a part; .gz, .zst, a JSON array and
    text files are read whole) and one large JSON-lines file cut into byte ranges (blank
    lines, blank texts, an unterminated last line)."""
    d = tmp_path_factory.mktemp("inputs")
    many = []
    for i in range(6):
        many.append(d / f"m{i}.jsonl")
        many[-1].write_text(_lines(_texts(8 + i, seed=i)))
    with gzip.open(d / "m6.jsonl.gz", "wt") as f:
        f.write(_lines(_texts(20, seed=6)))
    (d / "m7.json").write_text(json.dumps([{"text": t} for t in _texts(5, seed=7)]))
    (d / "m8.txt").write_text("one whole text file\n")
    zstandard = pytest.importorskip("zstandard")
    (d / "m9.jsonl.zst").write_bytes(zstandard.compress(_lines(_texts(12, seed=10)).encode()))
    with gzip.open(d / "m10.txt.gz", "wt") as f:
        f.write("a compressed text file\n")
    many += [d / "m6.jsonl.gz", d / "m7.json", d / "m8.txt", d / "m9.jsonl.zst", d / "m10.txt.gz"]
    big = _lines(_texts(300, seed=9)).splitlines(keepends=True)
    big[17] = "\n"  # a blank line keeps its index
    big[40] = json.dumps({"text": "  "}) + "\n"  # a blank text: a record, no document
    (d / "big.jsonl").write_text("".join(big).rstrip("\n"))  # no newline at the end
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = _texts(300, seed=11)
    texts[5], texts[60] = None, "  "  # a null and a blank text: records, no documents
    pq.write_table(pa.table({"text": texts, "n": list(range(300))}), d / "big.parquet",
                   row_group_size=16)  # 19 row groups: cut into parts between them
    return {"many": many, "big": [d / "big.jsonl"], "parquet": [d / "big.parquet"]}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


def _prepare(files, out: Path, tok, **kw) -> dict:
    return prepare(FileSource(files), TextEncoder(tok), out, tok, part_bytes=PART,
                   batch_docs=7, **kw)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def one_process(inputs, tok, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("one")
    for name, files in inputs.items():
        _prepare(files, d / name, tok, workers=1)
    return {name: d / name for name in inputs}


@pytest.mark.parametrize("case", ["many", "big", "parquet"])
def test_workers_write_the_bytes_of_one_process(inputs, tok, one_process, tmp_path, case):
    meta = _prepare(inputs[case], tmp_path / "w2", tok, workers=2)
    assert len(meta["token_files"]) >= 4  # several parts: the work really was split
    assert _contents(tmp_path / "w2") == _contents(one_process[case])  # meta.json included
    assert not work_dir(tmp_path / "w2").exists()  # the parts are gone once published
    # The parts change the file layout only: one part per file gives the same token stream
    # and document index (a range's record ordinals and line indices continue the file's).
    whole = prepare(FileSource(inputs[case]), TextEncoder(tok), tmp_path / "whole", tok,
                    part_bytes=1 << 30)
    a, b = PreparedDataset(tmp_path / "w2"), PreparedDataset(tmp_path / "whole")
    assert len(whole["token_files"]) == 1
    assert np.array_equal(a.tokens_at(np.arange(a.num_tokens)),
                          b.tokens_at(np.arange(b.num_tokens)))
    for name in ("doc_offsets", "doc_record", "doc_index", "shard_records", "shard_docs"):
        assert np.array_equal(np.load(tmp_path / "w2" / f"{name}.npy"),
                              np.load(tmp_path / "whole" / f"{name}.npy")), name
    # and the stream is the streamed source's: [BOS] text [EOS] of every kept record in order
    texts = [t for s in range(len(inputs[case])) for _, t in FileSource(inputs[case]).shard_items(s)
             if t.strip()]
    expected = np.concatenate([[tok.bos_id, *ids, tok.eos_id] for ids in tok.encode_batch(texts)])
    assert np.array_equal(a.tokens_at(np.arange(a.num_tokens)), expected)


def test_a_parquet_range_names_the_files_row(inputs):
    """A parquet part is whole row groups; its rows count from 0, an error names the file's
    row (here the first row of the second part: the text column is not a string)."""
    from runtime.errors import DataError

    src = FileSource(inputs["parquet"], text_key="n")
    cuts = src.cut_points(0, PART)
    assert len(cuts) > 4 and cuts[-1] < inputs["parquet"][0].stat().st_size
    first = src.range_length(0, (cuts[0], cuts[1]))
    assert first % 16 == 0 and sum(src.range_length(0, r) for r in zip(cuts, cuts[1:])) == 300
    with pytest.raises(DataError, match=rf"big\.parquet: row {first}: 'n' is not a string"):
        next(iter(src.range_items(0, (cuts[1], cuts[2]))))


def test_a_killed_worker_resumes_from_its_finished_parts(inputs, tok, one_process, tmp_path,
                                                         monkeypatch):
    """A worker killed inside part 3 (deterministic: the fault hook) stops the run with one
    message; nothing is published, its half part is a temporary folder. The rerun verifies
    the finished parts, writes a damaged one again, keeps the others and publishes the same
    bytes as one uninterrupted process."""
    out, logs = tmp_path / "out", []
    monkeypatch.setenv("GPTOSS_PREPARE_FAULT", "kill:3")
    with pytest.raises(PrepareStopped, match="a prepare worker died .* run the same command "
                                             "again to resume"):
        _prepare(inputs["big"], out, tok, workers=2)
    monkeypatch.delenv("GPTOSS_PREPARE_FAULT")
    work = work_dir(out)
    assert not out.exists()
    assert [p.name for p in work.glob(".part-00003.tmp-*")]  # the half-written part ...
    finished = sorted(p.name for p in work.glob("part-*"))
    assert "part-00003" not in finished and len(finished) >= 1  # ... never counts as done
    # 2 workers: part 3 started after one of parts 0-2 finished
    damaged = work / finished[0] / "tokens-00.bin"
    data = bytearray(damaged.read_bytes())
    data[10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    kept = {(work / p / "tokens-00.bin").stat().st_ino for p in finished[1:]}
    _prepare(inputs["big"], out, tok, workers=2, log=logs.append)
    assert f"part {int(finished[0][5:])} tokens-00.bin fails its checksum: writing it again" \
        in logs, logs
    assert any(line.startswith(f"resuming: {len(finished) - 1} of ") for line in logs), logs
    assert _contents(out) == _contents(one_process["big"])
    assert not work.exists()
    # the kept parts were not written again: the published token files are theirs (linked)
    assert kept <= {p.stat().st_ino for p in out.glob("tokens-*.bin")}


def test_a_plan_of_other_inputs_is_refused(inputs, tok, tmp_path, monkeypatch):
    from runtime.errors import DataError

    files = [tmp_path / "a.jsonl"]
    shutil.copy(inputs["big"][0], files[0])
    monkeypatch.setenv("GPTOSS_PREPARE_FAULT", "kill:1")
    with pytest.raises(PrepareStopped):
        _prepare(files, tmp_path / "out", tok, workers=2)
    monkeypatch.delenv("GPTOSS_PREPARE_FAULT")
    with files[0].open("a") as f:
        f.write("\n" + json.dumps({"text": "appended later"}) + "\n")
    with pytest.raises(DataError, match=r"holds the parts of another prepare \(its inputs differ"):
        _prepare(files, tmp_path / "out", tok, workers=2)


def test_shards_then_finalize_equal_one_process(inputs, tok, one_process, tmp_path):
    """--shard i/n writes parts i, i + n, ...; finalize refuses while a shard is missing (one
    line naming the parts), then publishes the bytes one process writes."""
    from runtime.errors import DataError
    from runtime.data.preparing import finalize, plan_of

    out = tmp_path / "out"
    plan = plan_of(FileSource(inputs["big"]), tok, part_bytes=PART)
    assert _prepare(inputs["big"], out, tok, shard=(0, 3)) is None
    assert _prepare(inputs["big"], out, tok, shard=(2, 3)) is None
    missing = [k for k in range(len(plan["parts"])) if k % 3 == 1]
    with pytest.raises(DataError, match=rf"{len(missing)} of {len(plan['parts'])} parts not "
                                        rf"finished: part {missing[0]} \(missing\)"):
        finalize(out, plan)
    assert not out.exists()
    _prepare(inputs["big"], out, tok, shard=(1, 3))
    finalize(out, plan, workers=2)
    assert _contents(out) == _contents(one_process["big"])
    with pytest.raises(DataError, match="already exists"):
        _prepare(inputs["big"], out, tok, shard=(1, 3))


def test_progress_lines():
    import io

    from runtime.data.progress import Progress

    now = [0.0]
    log = io.StringIO()
    p = Progress(1000, 4, done_bytes=250, done_parts=1, out=log, every=30, clock=lambda: now[0])
    now[0] = 10
    p.update(250, 2_000_000)  # 10 s after the start: within `every`, no line yet
    assert log.getvalue() == ""
    now[0] = 40
    p.update(250, 1_000_000)
    # this run: 500 bytes in 40 s -> the last 250 bytes take 20 s
    assert log.getvalue() == ("prepare: 75% done, 3/4 parts, 3.0M tokens, 75.0k tokens/s, "
                              "ETA 0:00:20\n")
    now[0] = 41
    p.update(250, 0)  # the last part: always a line
    assert log.getvalue().splitlines()[-1].startswith("prepare: 100% done, 4/4 parts")
    tty = io.StringIO()
    bar = Progress(100, 2, out=tty, tty=True, clock=lambda: now[0])
    bar.update(50, 10)
    now[0] = 41.2
    bar.partial(1, 5, 50)  # within `redraw` (0.5 s) of the last drawing: not redrawn
    assert tty.getvalue().count("\r") == 1
    now[0] = 41.6
    bar.partial(1, 5, 50)  # 5 tokens x 5 bytes per token (this run's) = 25 of 50 bytes
    assert tty.getvalue().split("\r")[-1].startswith("prepare [##################      ]  75% 1/2")
    bar.close()
    assert tty.getvalue().startswith("\rprepare [############            ]  50% 1/2 parts")
    assert tty.getvalue().endswith("\n")


def test_progress_moves_within_a_part():
    """A part under way counts its tokens so far as input bytes: BYTES_PER_TOKEN (4) until
    a part finished, then this run's bytes per token; at most 99% of the part."""
    import io

    from runtime.data.progress import Progress

    now = [0.0]
    log = io.StringIO()
    p = Progress(1_000_000, 2, out=log, every=30, clock=lambda: now[0])
    now[0] = 10
    p.partial(0, 20_000, 500_000)  # within `every`: no line
    assert log.getvalue() == ""
    now[0] = 30
    p.partial(0, 50_000, 500_000)  # 200 kB of 1 MB in 30 s: 800 kB take 120 s
    assert log.getvalue() == ("prepare: 20% done, 0/2 parts, 50.0k tokens, 1.7k tokens/s, "
                              "ETA 0:02:00\n")
    now[0] = 40
    p.update(500_000, 100_000, 0)  # 10 s after the last line: none
    now[0] = 60
    p.partial(1, 10_000, 500_000)  # 5 bytes per token now: 50 kB
    assert log.getvalue().splitlines()[-1] == ("prepare: 55% done, 1/2 parts, 110.0k tokens, "
                                               "1.8k tokens/s, ETA 0:00:49")
    p.partial(1, 10**9, 500_000)  # never past 99% of the part
    assert p.fraction() == pytest.approx(0.995)
    now[0] = 61
    p.update(500_000, 100_000, 1)
    assert log.getvalue().splitlines()[-1].startswith("prepare: 100% done, 2/2 parts, 200.0k "
                                                      "tokens,")


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_report_tokens_within_a_part(tok, tmp_path, monkeypatch, workers):
    """The progress hears of every part before it finishes: in-process after every batch
    (the tokens so far, in order), from worker processes through shared memory that the
    parent reads every POLL_S (here parts of 8 batches of 0.3 s, read every 0.05 s)."""
    import runtime.data.preparing as preparing

    seen: list[tuple] = []

    class Recording(preparing.Progress):
        def partial(self, part, tokens, nbytes):
            seen.append((part, tokens))
            super().partial(part, tokens, nbytes)

        def update(self, nbytes, tokens, part=None):
            seen.append((part, "done", tokens))
            super().update(nbytes, tokens, part)

    monkeypatch.setattr(preparing, "Progress", Recording)
    monkeypatch.setattr(preparing, "POLL_S", 0.05)
    files = [tmp_path / "a.jsonl"]
    files[0].write_text(_lines([f"document {j} of the file" for j in range(70)]))
    encode = _SlowEncoder(tok, 0.3 if workers > 1 else 0.0)
    prepare(FileSource(files), encode, tmp_path / "out", tok, part_bytes=PART, batch_docs=7,
            workers=workers)
    done = {e[0]: e[2] for e in seen if len(e) == 3}
    assert sorted(done) == [0, 1]
    under_way = {k: [e[1] for e in seen if len(e) == 2 and e[0] == k] for k in done}
    if workers == 1:  # after every batch of 7 documents, growing, the last one the part's
        for k in (0, 1):
            assert under_way[k] == sorted(set(under_way[k])) and under_way[k][-1] == done[k]
        assert len(under_way[0]) >= 5
    else:
        assert any(0 < t < done[k] for k in done for t in under_way[k]), seen


def test_a_saved_dataset_is_cut_into_row_ranges(tok, tmp_path):
    """A save_to_disk folder is read by index: its rows are cut into parts (workers split
    it), the same bytes as one worker and the same stream and index as one part."""
    datasets = pytest.importorskip("datasets")
    from runtime.data.sources import HFSource

    texts = _texts(200, seed=4)
    texts[7] = " "  # a blank text: a record, no document
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))

    def run(out, part_bytes, workers):
        src = HFSource(str(tmp_path / "saved"))
        return prepare(src, TextEncoder(tok), tmp_path / out, tok, part_bytes=part_bytes,
                       workers=workers)

    meta = run("w2", PART, 2)
    run("w1", PART, 1)
    run("whole", 1 << 30, 1)
    assert len(meta["token_files"]) >= 4
    assert _contents(tmp_path / "w2") == _contents(tmp_path / "w1")
    a, b = PreparedDataset(tmp_path / "w2"), PreparedDataset(tmp_path / "whole")
    assert np.array_equal(a.tokens_at(np.arange(a.num_tokens)),
                          b.tokens_at(np.arange(b.num_tokens)))
    for name in ("doc_offsets", "doc_record", "doc_index", "shard_records", "shard_docs"):
        assert np.array_equal(np.load(tmp_path / "w2" / f"{name}.npy"),
                              np.load(tmp_path / "whole" / f"{name}.npy")), name
    assert int(np.load(tmp_path / "w2" / "shard_records.npy")[0]) == 200


class _SlowEncoder(TextEncoder):
    """TextEncoder taking `delay` seconds per batch: parts that run long whatever the CPU."""

    def __init__(self, tokenizer, delay: float):
        super().__init__(tokenizer)
        self.delay = delay

    def __call__(self, items):
        import time

        time.sleep(self.delay)
        return super().__call__(items)


def test_bad_input_stops_the_other_workers_at_once(tok, tmp_path):
    """A bad record in the first part ends the run with its one error while the other worker
    is inside a long part (8 batches of 1 s): that part is abandoned, not finished first,
    and the parts queued behind it never start (before: every running and queued part was
    written before the error came out)."""
    from runtime.errors import DataError

    files = [tmp_path / "a0.jsonl"]
    files[0].write_text('{"text": "fine"}\n{"text": broken\n')
    for i in range(1, 5):
        files.append(tmp_path / f"a{i}.jsonl")
        files[-1].write_text(_lines([f"document {j} of file {i}" for j in range(70)]))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"a0\.jsonl:2: invalid JSON"):
        prepare(FileSource(files), _SlowEncoder(tok, 1.0), out, tok, part_bytes=PART,
                batch_docs=7, workers=2)
    assert not out.exists()
    assert not list(work_dir(out).glob("part-*"))  # no part finished after the error


def test_reading_many_token_files_needs_few_descriptors(inputs, tok, tmp_path):
    """A folder of more token files than `ulimit -n` allows open (1T tokens in 128 MB parts
    is ~30k files) reads whole in a process limited to 128 descriptors: only the last 64
    token files used stay mapped (each map holds a descriptor). On the old code (every file
    mapped at open) the open fails with 'Too many open files'."""
    import subprocess
    import sys

    out = tmp_path / "out"
    meta = _prepare(inputs["big"], out, tok, file_tokens=1)  # one document per token file
    assert len(meta["token_files"]) > 200
    expected = np.concatenate([np.fromfile(out / f["name"], dtype=meta["dtype"])
                               for f in meta["token_files"]]).astype(np.int64)
    code = (
        "import resource, sys, numpy as np\n"
        "from runtime.data.prepared import PreparedDataset\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit("
        "resource.RLIMIT_NOFILE)[1]))\n"
        "ds = PreparedDataset(sys.argv[1])\n"
        "for _ in range(2):  # forwards twice: every file mapped, unmapped, mapped again\n"
        "    tokens = np.concatenate([ds.tokens_at(np.arange(lo, min(lo + 97, ds.num_tokens)))"
        " for lo in range(0, ds.num_tokens, 97)])\n"
        "sys.stdout.buffer.write(tokens.tobytes())\n")
    run = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert np.array_equal(np.frombuffer(run.stdout, np.int64), expected)
