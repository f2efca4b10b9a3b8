"""Data: sources -> documents -> packed windows -> this rank's rows of the global batch.

  schema.py    the [data] keys (DataConfig)
  errors.py    DataError: bad data / tokenizer input, one line naming the file or key
  tokenizer.py Tokenizer (HF `tokenizers`), embedded or from a file / HF checkpoint dir
  readers.py   local files (.jsonl/.json/.parquet/.txt) -> records, file:line in errors
  sources.py   DocumentSource: embedded corpus, local files, HF datasets; shuffling
  packing.py   Document (tokens + optional loss mask), PackedStream, window_batch
  loader.py    ParallelAwareDataLoader: same global batch on any dp degree, resumable
  __main__.py  `python -m runtime.data --config C --show N [--json]`

Only runtime.model (IGNORE_INDEX) is imported from the rest of the runtime: ranks and
degrees arrive as plain ints.
"""

from runtime.data.errors import DataError, DataFileNotFoundError
from runtime.data.loader import STATE_VERSION, ParallelAwareDataLoader, build_dataloader
from runtime.data.packing import (
    Document,
    PackedStream,
    TextEncoder,
    split_microbatches,
    window_batch,
)
from runtime.data.readers import read_docs, read_json_docs, read_parquet_docs, resolve_files
from runtime.data.schema import DataConfig
from runtime.data.sources import (
    DocumentSource,
    EmbeddedSource,
    FileSource,
    HFSource,
    build_source,
)
from runtime.data.tokenizer import Tokenizer

__all__ = [
    "STATE_VERSION", "DataConfig", "DataError", "DataFileNotFoundError", "Document",
    "DocumentSource", "EmbeddedSource", "FileSource", "HFSource", "PackedStream",
    "ParallelAwareDataLoader", "TextEncoder", "Tokenizer", "build_dataloader", "build_source",
    "read_docs", "read_json_docs", "read_parquet_docs", "resolve_files", "split_microbatches",
    "window_batch",
]
