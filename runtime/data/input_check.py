"""Check a job's data and tokenizer before anything is built.

`check_data` opens the configured source the way the loader will (so a missing path, a
prepared folder made with another tokenizer or a missing optional package fail here), reads
the head of every file (its first records: invalid JSON, a wrong text key, binary data and
empty files are named as file or file:line) and encodes the first document with the run's
tokenizer; prepared data is checked against its meta.json checksums. Errors are
`DataError`s, one line each, which entry points turn into exit 2.
Records further down a file are checked when they are read (`prepare` reads them all).
"""

from __future__ import annotations

from itertools import islice

from runtime.errors import DataError
from runtime.data.loader import open_source
from runtime.data.prepared import PreparedDataset
from runtime.data.sources import DocumentSource, FileSource

HEAD_RECORDS = 100  # records read from the start of every file


def check_file_heads(source: FileSource, records: int = HEAD_RECORDS) -> None:
    """Read up to `records` records of every file of `source`; a file with no document at all
    is an error (an empty or blank file in a dataset is almost always a broken download)."""
    for path in source.files:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file")
        kept = False
        read_all = True
        for n, (_, item) in enumerate(source.read(path)):
            kept = kept or source.keep(item)
            if n + 1 >= records and kept:
                read_all = False
                break
        if read_all and not kept:
            raise DataError(f"{path}: no non-empty documents (a blank or empty file?)")


def check_data(data_cfg, tokenizer, split: str = "train", rank: int = 0,
               world_size: int = 1) -> DocumentSource | PreparedDataset:
    """Open and spot-check the source a [data] config names; returns it. Prepared data is
    verified against its checksums: this rank's share of them (`rank` of `world_size`; the
    caller combines the ranks' results, as for checkpoints)."""
    source = open_source(data_cfg, tokenizer, split)
    if isinstance(source, PreparedDataset):
        source.verify(rank, world_size)
    if isinstance(source, FileSource):
        check_file_heads(source)
    if isinstance(source, DocumentSource):
        first = [item for _, item in islice(source.stream(), 1)]
        source.encoder(tokenizer)(first)  # the tokenizer (or chat renderer) accepts it
    return source
