"""Local data files -> (record index, text) in file order.

Formats (each also compressed: `.gz`, or `.zst` with the zstandard package):
`.jsonl` / `.json`: one JSON object per line with a text key (a `.json`
file may also be one JSON array of objects); `.parquet`: one row per document (needs
pyarrow); `.txt` / `.md`: the whole file is ONE document. `resolve_files` turns a path,
directory (recursive), glob or list of them into the sorted file list a source reads.

A plain `.jsonl` file can also be read in byte ranges (`byte_range=(lo, hi)`: the lines that
start in [lo, hi), lo at a line start): `prepare` splits one large file over its workers and
nodes that way (`splittable`, `cut_points`, `range_length`). Indices are then lines within the
range; an error still names the file's own line (`LineOf` counts the lines before the range
only when the message is printed). A `.parquet` file is cut between row groups: its ranges
count the row groups' compressed bytes laid end to end (the footer's sizes, nothing decoded),
a range holds the row groups that start in it, and an error names the file's own row.
"""

from __future__ import annotations

import bisect
import glob as globlib
import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

from runtime.errors import DataDependencyError, DataError, DataFileNotFoundError

COMPRESSED = (".gz", ".zst")
JSON_SUFFIXES = tuple(f"{s}{c}" for s in (".jsonl", ".json") for c in ("", *COMPRESSED))
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = tuple(f"{s}{c}" for s in (".txt", ".md") for c in ("", *COMPRESSED))
SUPPORTED_SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES


def has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _open_bytes(path: Path):
    """The file's (decompressed) bytes as a binary stream that iterates by line."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard  # optional dependency: only .zst files need it
        except ImportError:
            raise DataDependencyError(f"reading {path} needs zstandard: pip install "
                                      f"'gptoss-runtime[data]' (or zstandard)") from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _bad_compression(e: Exception) -> bool:
    return type(e).__module__.startswith("zstandard") or type(e).__name__ == "ZstdError"


def _decode(raw: bytes, path: Path, line: int) -> str:
    """UTF-8 text of one line (or of a whole file starting at `line`); a bad byte is one
    error naming the line it is on, however deep in the file."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line += raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        raise DataError(f"{path}:{line}: not UTF-8 text (binary data?): {e.reason} at byte "
                        f"{column} of the line") from None


def text_of(obj, text_key: str, where: str) -> str:
    """The text of one record; `where` names it in errors (file:line)."""
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: expected a JSON object with key {text_key!r}, got {type(obj).__name__}"
        )
    if text_key not in obj:
        keys = ", ".join(sorted(map(str, obj)))[:200]
        raise DataError(f"{where}: no {text_key!r} key (keys: {keys}); set data.text_key")
    text = obj[text_key]
    if not isinstance(text, str):
        raise DataError(f"{where}: {text_key!r} is {type(text).__name__}, expected a string")
    return text


def splittable(path: Path) -> bool:
    """Whether `path` can be read in ranges: plain JSON lines (seekable, one record per
    newline-terminated line; .json may split lines on other breaks or be one array), or
    parquet (between row groups)."""
    return path.name.lower().endswith((".jsonl", *PARQUET_SUFFIXES))


def cut_points(path: Path, every: int) -> list[int]:
    """Range bounds [0, ..., end] cutting a `splittable` file after about every `every`
    bytes: at the line starts (JSON lines) or row-group starts (parquet) after each."""
    if has_suffix(path, PARQUET_SUFFIXES):
        starts = _group_starts(_open_parquet(path).metadata)
        return sorted({0, starts[-1], *(starts[bisect.bisect_left(starts, at)]
                                        for at in range(every, starts[-1], every))})
    size = path.stat().st_size
    return sorted({0, size, *(line_start(path, at) for at in range(every, size, every))})


def range_length(path: Path, lo: int, hi: int) -> int:
    """Record indices one range of a `splittable` file covers (blank lines included): where
    the next range's indices start in the file."""
    if has_suffix(path, PARQUET_SUFFIXES):
        md = _open_parquet(path).metadata
        first, last = _groups_in(md, lo, hi)
        return sum(md.row_group(g).num_rows for g in range(first, last))
    return count_lines(path, lo, hi)


def line_start(path: Path, at: int) -> int:
    """The first line start at or after byte `at` (the file's size when none)."""
    if at <= 0:
        return 0
    with open(path, "rb") as f:
        f.seek(at - 1)
        f.readline()  # the rest of the line holding byte at - 1 (only its newline at a line start)
        return f.tell()


def count_lines(path: Path, lo: int, hi: int) -> int:
    """Lines starting in [lo, hi) of a file (lo at a line start): the next range's first
    record index in the file."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        f.seek(lo)
        left = hi - lo
        while left > 0 and (block := f.read(min(1 << 24, left))):
            n, left, last = n + block.count(b"\n"), left - len(block), block[-1:]
    return n + (last != b"\n")  # an unterminated last line


class LineOf:
    """`file:line` of line `i` of the range starting at byte `lo`: the lines before the range
    are counted only when the text is needed (an error message), never per record."""

    def __init__(self, path: Path, lo: int, i: int):
        self.path, self.lo, self.i = path, lo, i

    def line(self) -> int:
        before, left = 0, self.lo
        with open(self.path, "rb") as f:
            while left > 0 and (block := f.read(min(1 << 24, left))):
                before, left = before + block.count(b"\n"), left - len(block)
        return before + self.i + 1

    def __str__(self) -> str:
        return f"{self.path}:{self.line()}"


def _read_range(path: Path, lo: int, hi: int) -> Iterator[tuple[int, object, LineOf]]:
    """read_json_records over the lines starting in [lo, hi) of a plain JSON-lines file."""
    with open(path, "rb") as f:
        f.seek(lo)
        pos, i = lo, 0
        while pos < hi and (raw := f.readline()):
            pos += len(raw)
            where = LineOf(path, lo, i)
            i += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = _decode(raw, path, where.line())  # raises, naming the file's line
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: invalid JSON: {e}") from None
            yield i - 1, obj, where


def read_json_records(path: Path, start: int = 0,
                      byte_range: tuple[int, int] | None = None
                      ) -> Iterator[tuple[int, object, str]]:
    """(index, parsed record, where) for each record from `start`; blank lines keep their
    index but yield nothing. `where` is "file:line" (or "file[i]" in a JSON array).
    `byte_range`: only the lines starting in it (a `splittable` file), indexed from 0."""
    if byte_range is not None:
        try:
            yield from _read_range(path, *byte_range)
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e}") from None
        return
    try:
        # Bytes, decoded line by line: a text stream decodes in blocks, so its error could
        # not say which line holds the bad byte.
        with _open_bytes(path) as f:
            if path.name.lower().endswith(tuple(f".json{c}" for c in ("", *COMPRESSED))):
                content = _decode(f.read(), path, 1)
                if content.lstrip().startswith("["):
                    try:
                        items = json.loads(content)
                    except ValueError as e:
                        raise DataError(f"{path}: invalid JSON: {e}") from None
                    for i in range(start, len(items)):
                        yield i, items[i], f"{path}[{i}]"
                    return
                lines: Iterator[str] = iter(content.splitlines())
            else:
                lines = (_decode(raw, path, i + 1) for i, raw in enumerate(f))
            for i, line in enumerate(lines):
                if i < start or not line.strip():
                    continue  # skipping unparsed lines keeps resumption cheap
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{i + 1}: invalid JSON: {e}") from None
                yield i, obj, f"{path}:{i + 1}"
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (binary data?): {e.reason}") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read: {e}") from None
    except Exception as e:
        if _bad_compression(e):
            raise DataError(f"{path}: cannot read: {e}") from None
        raise


def read_json_docs(path: Path, text_key: str, start: int = 0,
                   byte_range: tuple[int, int] | None = None) -> Iterator[tuple[int, str]]:
    """(index, text) for each line from `start`; blank lines keep their index but yield nothing."""
    for i, obj, where in read_json_records(path, start, byte_range):
        yield i, text_of(obj, text_key, where)


def _import_pyarrow_parquet(path: Path):
    try:
        import pyarrow.parquet as pq  # optional dependency: only parquet files need it
    except ImportError:
        raise DataDependencyError(
            f"reading {path} needs pyarrow: pip install 'gptoss-runtime[data]' (or pyarrow)"
        ) from None
    return pq


def _open_parquet(path: Path):
    pq = _import_pyarrow_parquet(path)
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends
        raise DataError(f"{path}: not a readable parquet file: {e}") from None


def _group_starts(md) -> list[int]:
    """Where each row group starts when the groups' compressed bytes are laid end to end
    (+ the end): the coordinates of a parquet file's ranges."""
    starts = [0]
    for g in range(md.num_row_groups):
        group = md.row_group(g)
        starts.append(starts[-1] + sum(group.column(c).total_compressed_size
                                       for c in range(group.num_columns)))
    return starts


def _groups_in(md, lo: int, hi: int) -> tuple[int, int]:
    """The row groups [first, last) that start in [lo, hi)."""
    starts = _group_starts(md)[:-1]
    return bisect.bisect_left(starts, lo), bisect.bisect_left(starts, hi)


def read_parquet_docs(path: Path, text_key: str, start: int = 0,
                      byte_range: tuple[int, int] | None = None) -> Iterator[tuple[int, str]]:
    """(row, text) from `start`; whole row groups before `start` are never decoded.
    `byte_range`: only the row groups starting in it (see `cut_points`), rows indexed from
    0 at its first; errors still name the file's row."""
    pf = _open_parquet(path)
    names = pf.schema_arrow.names
    if text_key not in names:
        raise DataError(
            f"{path}: no column {text_key!r} (columns: {', '.join(names)}); set data.text_key"
        )
    md = pf.metadata
    first, last = _groups_in(md, *byte_range) if byte_range else (0, pf.num_row_groups)
    base = sum(md.row_group(g).num_rows for g in range(first))  # the range's first row
    row0 = base
    for rg in range(first, last):
        n = md.row_group(rg).num_rows
        if row0 - base + n > start:
            column = pf.read_row_group(rg, columns=[text_key]).column(0).to_pylist()
            for j in range(max(start - (row0 - base), 0), n):
                text = column[j]
                if text is not None and not isinstance(text, str):
                    raise DataError(f"{path}: row {row0 + j}: {text_key!r} is not a string")
                yield row0 - base + j, text or ""
        row0 += n


def read_text_doc(path: Path, start: int = 0) -> Iterator[tuple[int, str]]:
    """A text file is one document (index 0)."""
    if start == 0:
        try:
            with _open_bytes(path) as f:
                raw = f.read()
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: cannot read: {e}") from None
        except Exception as e:
            if _bad_compression(e):
                raise DataError(f"{path}: cannot read: {e}") from None
            raise
        yield 0, _decode(raw, path, 1)


def read_docs(path: Path, text_key: str, start: int = 0,
              byte_range: tuple[int, int] | None = None) -> Iterator[tuple[int, str]]:
    if has_suffix(path, PARQUET_SUFFIXES):
        return read_parquet_docs(path, text_key, start, byte_range)
    if byte_range is not None:  # a `splittable` JSON-lines file
        return read_json_docs(path, text_key, byte_range=byte_range)
    if has_suffix(path, JSON_SUFFIXES):
        return read_json_docs(path, text_key, start)
    if has_suffix(path, TEXT_SUFFIXES):
        return read_text_doc(path, start)
    raise DataError(f"{path}: unsupported data file type (use {', '.join(SUPPORTED_SUFFIXES)})")


def _is_data_file(path: Path, root: Path) -> bool:
    # Hidden files and folders (.git, .cache of HF downloads) are never data.
    hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
    return not hidden and path.is_file() and has_suffix(path, SUPPORTED_SUFFIXES)


def _expand(s: str) -> list[Path]:
    """The files one path / directory / glob names (in order)."""
    if globlib.has_magic(s):
        matches = sorted(globlib.glob(s, recursive=True))
        if not matches:
            raise DataFileNotFoundError(f"data.dataset_path: no files match {s!r}")
    elif os.path.exists(s):
        matches = [s]
    else:
        raise DataFileNotFoundError(f"data.dataset_path: {s} does not exist")
    files = []
    for m in matches:
        p = Path(m)
        if p.is_dir():
            found = sorted(
                (q for q in p.rglob("*") if _is_data_file(q, p)),
                key=lambda q: q.relative_to(p).as_posix(),
            )
            if not found and not globlib.has_magic(s):
                raise DataFileNotFoundError(
                    f"data.dataset_path: no {'/'.join(SUPPORTED_SUFFIXES)} files under {p}"
                )
            files.extend(found)
        elif has_suffix(p, SUPPORTED_SUFFIXES):
            files.append(p)
        elif not globlib.has_magic(s):
            raise DataError(
                f"{p}: unsupported data file type (use {', '.join(SUPPORTED_SUFFIXES)})"
            )
    return files


def resolve_files(spec: str | Sequence[str]) -> list[Path]:
    """Files named by a path, a directory (recursive, supported types), a glob, or a list."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    files = [f for s in specs for f in _expand(os.path.expanduser(str(s)))]
    if not files:
        raise DataFileNotFoundError(f"data.dataset_path: no supported data files in {spec!r}")
    return files
