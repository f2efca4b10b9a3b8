"""Data: sources -> documents -> packed windows -> this rank's rows of the global batch.

  schema.py    the [data] keys (DataConfig: the job config's [data] section)
  tokenizer.py Tokenizer (HF `tokenizers`), embedded or from a file / HF checkpoint dir
  readers.py   local files (.jsonl/.json/.parquet/.txt) -> records, file:line in errors
  sources.py   DocumentSource: embedded corpus, local files, HF datasets; shuffling
  packing.py   Document (tokens + optional loss mask), PackedStream, window_batch
  prepared.py  prepared data: memory-mapped token files + a document index;
               PreparedStream reads a rank's windows by offset
  preparing.py prepare(): tokenized by worker processes / Slurm array tasks, resumable,
               published atomically; prepare_parts.py its parts; progress.py its progress
  prefetch.py  a background thread producing batches ahead of the training thread
  loader.py    ParallelAwareDataLoader: same global batch on any dp degree, resumable;
               validation_data_config (the [validation] source)
  split.py     HeldOutSplit: validation.split_fraction of a source, by content hash
  chat/        data.dataset = "chat": records -> rendered -> masked -> packed (its own map)
  input_check.py  check_data(): the source and tokenizer spot-checked before the model is built
  __main__.py  `python -m runtime.data` (a shim: the command is runtime/data_cli.py)

Only runtime.model (IGNORE_INDEX) and the leaf runtime.errors are imported from the rest of
the runtime (DataError, a ConfigError: bad data / tokenizer input, one line, exit 2, lives in
runtime.errors): ranks and degrees arrive as plain ints. The names below load on first use, so
`runtime.data.schema` (read by the config on login nodes) never imports torch.
"""

_EXPORTS = {
    "runtime.errors": ("DataError", "DataFileNotFoundError"),
    "runtime.data.loader": ("STATE_VERSION", "ParallelAwareDataLoader", "build_dataloader"),
    "runtime.data.packing": ("Document", "PackedStream", "TextEncoder", "split_microbatches",
                             "window_batch"),
    "runtime.data.prepared": ("PreparedDataset", "PreparedStream"),
    "runtime.data.preparing": ("prepare",),
    "runtime.data.readers": ("read_docs", "read_json_docs", "read_parquet_docs",
                             "resolve_files"),
    "runtime.data.schema": ("DataConfig",),
    "runtime.data.sources": ("DocumentSource", "EmbeddedSource", "FileSource", "HFSource",
                             "build_source"),
    "runtime.data.tokenizer": ("Tokenizer",),
    "runtime.data.input_check": ("check_data",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        import importlib  # lazy exports: the package's torch-using modules load on first use

        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'runtime.data' has no attribute {name!r}")
