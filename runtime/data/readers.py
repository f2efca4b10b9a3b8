"""Local data files -> (record index, text) in file order.

Formats: `.jsonl` / `.json` (+ `.gz`): one JSON object per line with a text key (a `.json`
file may also be one JSON array of objects); `.parquet`: one row per document (needs
pyarrow); `.txt` / `.md`: the whole file is ONE document. `resolve_files` turns a path,
directory (recursive), glob or list of them into the sorted file list a source reads.
"""

from __future__ import annotations

import glob as globlib
import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

from runtime.data.errors import DataDependencyError, DataError, DataFileNotFoundError

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES


def has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


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


def read_json_records(path: Path, start: int = 0) -> Iterator[tuple[int, object, str]]:
    """(index, parsed record, where) for each record from `start`; blank lines keep their
    index but yield nothing. `where` is "file:line" (or "file[i]" in a JSON array)."""
    try:
        # Bytes, decoded line by line: a text stream decodes in blocks, so its error could
        # not say which line holds the bad byte.
        with _open_bytes(path) as f:
            if path.name.lower().endswith((".json", ".json.gz")):
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


def read_json_docs(path: Path, text_key: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """(index, text) for each line from `start`; blank lines keep their index but yield nothing."""
    for i, obj, where in read_json_records(path, start):
        yield i, text_of(obj, text_key, where)


def _import_pyarrow_parquet(path: Path):
    try:
        import pyarrow.parquet as pq  # optional dependency: only parquet files need it
    except ImportError:
        raise DataDependencyError(
            f"reading {path} needs pyarrow: pip install 'gptoss-runtime[data]' (or pyarrow)"
        ) from None
    return pq


def read_parquet_docs(path: Path, text_key: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """(row, text) from `start`; whole row groups before `start` are never decoded."""
    pq = _import_pyarrow_parquet(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends
        raise DataError(f"{path}: not a readable parquet file: {e}") from None
    names = pf.schema_arrow.names
    if text_key not in names:
        raise DataError(
            f"{path}: no column {text_key!r} (columns: {', '.join(names)}); set data.text_key"
        )
    row0 = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if row0 + n > start:
            column = pf.read_row_group(rg, columns=[text_key]).column(0).to_pylist()
            for j in range(max(start - row0, 0), n):
                text = column[j]
                if text is not None and not isinstance(text, str):
                    raise DataError(f"{path}: row {row0 + j}: {text_key!r} is not a string")
                yield row0 + j, text or ""
        row0 += n


def read_text_doc(path: Path, start: int = 0) -> Iterator[tuple[int, str]]:
    """A text file is one document (index 0)."""
    if start == 0:
        try:
            yield 0, path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (binary data?): {e.reason}") from None


def read_docs(path: Path, text_key: str, start: int = 0) -> Iterator[tuple[int, str]]:
    if has_suffix(path, JSON_SUFFIXES):
        return read_json_docs(path, text_key, start)
    if has_suffix(path, PARQUET_SUFFIXES):
        return read_parquet_docs(path, text_key, start)
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
