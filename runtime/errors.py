"""User-facing errors and the process exit codes every entry point shares (a leaf: no imports).

A user error (bad config key, impossible mesh, missing file) is one line on stderr naming the
key / file, and exit code 2, raised before anything large is built; never a traceback.
Layers below train (model, parallel, hf, data) raise `ConfigError` (data: its `DataError`s); the entry points
(runtime.train, runtime.plan, submit.py, the Slurm helpers) turn it into
`report_config_error(e)` -> exit `EXIT_CONFIG_ERROR`.
"""

from __future__ import annotations

import sys

#: Finished (and, for runtime.plan, the job fits).
EXIT_OK = 0
#: Invalid config, command line or mesh: nothing was started (argparse's usage code too).
EXIT_CONFIG_ERROR = 2
#: Stopped on SIGUSR1/SIGTERM after saving a checkpoint: requeue the job (EX_TEMPFAIL,
#: sysexits.h). The Slurm templates and submit.py requeue on it.
EXIT_REQUEUE = 75
#: A checkpoint did not fit the free space of its folder (refused before it started, or the
#: disk filled while it was written): the run stopped, the partial save was removed and the
#: previous checkpoint is still the latest (EX_IOERR, sysexits.h). Not requeued: the same
#: disk would fail the same way.
EXIT_DISK_FULL = 74


class ConfigError(ValueError):
    """An invalid configuration; the message is one line that names the key and its origin."""


class ParallelismError(ConfigError):
    """Parallelism degrees that do not fit the world size or the model."""


class DataError(ConfigError):
    """Bad data or tokenizer input (a missing file, a broken record, a wrong key, an unusable
    tokenizer); one line naming the file (file:line for a record) or the key."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data or tokenizer path that does not exist (still a FileNotFoundError for callers)."""


class DataDependencyError(DataError, ImportError):
    """An optional package a data source needs (pyarrow, datasets) is not installed."""


class DiskFullError(RuntimeError):
    """A save that does not fit; one line naming the folder, the bytes needed and the bytes
    free. Entry points print it as `error: ...` and exit EXIT_DISK_FULL."""


def one_line(text: object) -> str:
    """`text` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def report_config_error(error: object) -> int:
    """Print `error: <one line>` on stderr; return EXIT_CONFIG_ERROR for the caller to exit with."""
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    return EXIT_CONFIG_ERROR
