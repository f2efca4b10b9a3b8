"""The config field convention, shared by every TOML section (train/config/schema.py, data/schema.py).

A key is a dataclass field whose metadata carries its allowed values (`choices`, a tuple or a
callable returning one) or a `check`, plus its --help text. A check returns None when the
value is fine, else a phrase such as "must be > 0" that the config loader puts after the key.
Pure Python (no torch), at the bottom layer so that data/ and train/ both use it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import field
from typing import Any, Callable


def option(default: Any, *, choices: Any = None, check: Callable | None = None, help: str = ""):
    """A config key with its rule; a list default is copied per instance."""
    meta = {"choices": choices, "check": check, "help": help}
    if isinstance(default, list):
        return field(default_factory=functools.partial(list, default), metadata=meta)
    return field(default=default, metadata=meta)


def positive(v):
    return None if v > 0 else "must be > 0"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def unit_interval(v):
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def half_open_unit(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def non_empty(v):
    return None if v else "must not be empty"


def degree(v):
    return None if v >= 1 else "must be >= 1"


def auto_or_positive(v):
    return None if v == -1 or v >= 1 else "must be -1 (auto) or >= 1"


def date_or_empty(v):
    return None if not v or re.fullmatch(r"\d{4}-\d{2}-\d{2}", v) else "must be YYYY-MM-DD or ''"


def subset(allowed: tuple[str, ...]):
    """A check for a list whose entries must all be in `allowed`."""
    def check(v):
        bad = [x for x in v if x not in allowed]
        return f"entries must be in {list(allowed)}" if bad else None
    return check
