"""Data errors: a user's bad input (a missing file, a broken record, a wrong key, an unusable
tokenizer). The message is one line naming the file (file:line for a record) or the key.
A DataError is a `runtime.errors.ConfigError`: every entry point prints it and exits 2."""

from __future__ import annotations

from runtime.errors import ConfigError


class DataError(ConfigError):
    """Bad data or tokenizer input; one line naming the file / record / key."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data or tokenizer path that does not exist (still a FileNotFoundError for callers)."""


class DataDependencyError(DataError, ImportError):
    """An optional package a data source needs (pyarrow, datasets) is not installed."""
