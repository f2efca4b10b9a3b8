"""Loading a `JobConfig`: a TOML file plus `--section.key=value` overrides, and the CLI parser.

Section and key names follow torchtitan wherever torchtitan has one, so configs and
command lines migrate with few edits. A bad config fails in milliseconds with a one-line
`ConfigError` naming the file (or the command line) and the key, before any process group or
weight exists. Entry points use it like this::

    parser = build_parser("python -m runtime.train")
    try:
        cfg, ns = parse_args(argv, parser)   # --config FILE [--print-config] [--a.b=c ...]
    except ConfigError as e:
        return report_config_error(e)     # runtime.errors: one line, exit 2
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from runtime.errors import ConfigError, one_line
from runtime.train.config.schema import (
    SECTIONS,
    JobConfig,
    Origins,
    coerce,
    field_kind,
    section_fields,
    toml_value,
    validate_config,
)

# Names other trainers (torchtitan) use for things that live elsewhere here.
_SECTION_HINTS = {"float8": "quantize", "mx": "quantize", "lr": "lr_scheduler"}


def _unknown_section(origin: str, section: str, flag: bool) -> ConfigError:
    dash = "--" if flag else ""
    match = _SECTION_HINTS.get(section) or next(
        iter(difflib.get_close_matches(section, list(SECTIONS), n=1, cutoff=0.6)), None)
    tail = f" (did you mean '{dash}{match}'?)" if match else f" (sections: {', '.join(SECTIONS)})"
    return ConfigError(f"{origin}: unknown section '{dash}{section}'{tail}")


def _unknown_key(origin: str, section: str, key: str, flag: bool) -> ConfigError:
    dash = "--" if flag else ""
    # A key that exists in another section (torchtitan's training.dataset -> data.dataset).
    elsewhere = [s for s in SECTIONS if key in section_fields(s)]
    if elsewhere:
        tail = f" (did you mean '{dash}{elsewhere[0]}.{key}'?)"
    else:
        match = difflib.get_close_matches(key, list(section_fields(section)), n=1, cutoff=0.6)
        tail = f" (did you mean '{dash}{section}.{match[0]}'?)" if match else ""
    return ConfigError(f"{origin}: unknown key '{dash}{section}.{key}'{tail}")


def _parse_literal(raw: str, kind: type) -> Any:
    """Command-line text as a TOML literal, with conveniences for strings and lists."""
    parsed: Any = raw
    if "\n" not in raw:
        try:
            parsed = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            if kind is bool and raw.lower() in ("true", "false"):
                parsed = raw.lower() == "true"
    if kind is str and not isinstance(parsed, str):
        return raw  # bare words and numbers-as-text: --model.flavor=20b, selective_ac_option=2
    if kind is list and not isinstance(parsed, list):
        return [item.strip() for item in raw.split(",") if item.strip()]  # a,b,c
    return parsed


# --------------------------------------------------------------------------- loading

def _set(values: dict, origins: Origins, origin: str, flag: bool, section: str, key: str,
         value: Any, shown: str) -> None:
    fields = section_fields(section)
    if key not in fields:
        raise _unknown_key(origin, section, key, flag)
    origins.set(section, key, origin, flag)
    try:
        values.setdefault(section, {})[key] = coerce(field_kind(fields[key]), value)
    except TypeError as e:
        raise origins.error(section, key, f"{e}, got {shown}") from None


def _read_file(path: str, values: dict, origins: Origins) -> None:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        # Editors on Windows save "UTF-8 with BOM"; TOML forbids the mark, tomllib then
        # reports an invalid statement at 1:1. The mark carries no meaning: drop it.
        data = tomllib.loads(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: malformed TOML: {one_line(e)}") from None
    for section, table in data.items():
        if section not in SECTIONS:
            raise _unknown_section(path, section, flag=False)
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: '{section}' must be a [{section}] table, got {table!r}")
        for key, value in table.items():
            _set(values, origins, path, False, section, key, value, repr(value))


def _parse_overrides(argv: list[str]) -> list[tuple[str, str, str]]:
    """`--section.key=value` / `--section.key value` / bare `--section.flag` -> triples."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        name, eq, raw = token[2:].partition("=")
        section, dot, key = name.replace("-", "_").partition(".")
        if not token.startswith("--") or not dot or not key:
            raise ConfigError(f"command line: unexpected argument '{token}' "
                              f"(overrides look like --section.key=value)")
        if section not in SECTIONS:
            raise _unknown_section("command line", section, flag=True)
        fields = section_fields(section)
        if key not in fields:
            raise _unknown_key("command line", section, key, flag=True)
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            bare_flag = nxt is None or nxt.lower() not in ("true", "false")
            if field_kind(fields[key]) is bool and bare_flag:
                raw = "true"  # torchtitan-style bare flag: --compile.enable
            elif nxt is None:
                raise ConfigError(f"command line: --{section}.{key} needs a value")
            else:
                raw, i = nxt, i + 1
        out.append((section, key, raw))
        i += 1
    return out


def load_config(path: str | None, overrides: list[str] | None = None) -> JobConfig:
    """Defaults <- TOML file (optional) <- overrides; validated. Raises ConfigError."""
    origins = Origins(path or "config")
    values: dict[str, dict[str, Any]] = {}
    if path is not None:
        _read_file(path, values, origins)
    for section, key, raw in _parse_overrides(list(overrides or [])):
        value = _parse_literal(raw, field_kind(section_fields(section)[key]))
        _set(values, origins, "command line", True, section, key, value, repr(raw))
    cfg = JobConfig(**{s: SECTIONS[s](**values.get(s, {})) for s in SECTIONS})
    validate_config(cfg, origins)
    return cfg


def config_from_dict(data: dict[str, dict[str, Any]], origin: str = "config") -> JobConfig:
    """A validated JobConfig from nested dicts (e.g. a checkpoint's saved to_dict())."""
    origins = Origins(origin)
    values: dict[str, dict[str, Any]] = {}
    for section, table in data.items():
        if section not in SECTIONS:
            raise _unknown_section(origin, section, flag=False)
        for key, value in table.items():
            _set(values, origins, origin, False, section, key, value, repr(value))
    cfg = JobConfig(**{s: SECTIONS[s](**values.get(s, {})) for s in SECTIONS})
    validate_config(cfg, origins)
    return cfg


# --------------------------------------------------------------------------- command line

def _options_help() -> str:
    lines = ["config keys (override any as --section.key=value; TOML literals):"]
    for section in SECTIONS:
        for key, f in section_fields(section).items():
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            text = f"  --{section}.{key}={toml_value(default)}"
            lines.append(f"{text:<58} {f.metadata['help']}".rstrip())
    return "\n".join(lines)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are ConfigErrors: one line and exit 2 at the entry point
    (argparse's own error() prints the usage block, then exits 2 itself)."""

    def error(self, message: str):
        raise ConfigError(f"command line: {message} (see {self.prog} --help)")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=prog, allow_abbrev=False, epilog=_options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [--config FILE] [--print-config] [--section.key=value ...]",
    )
    # --job.config_file is torchtitan's spelling.
    parser.add_argument("--config", "--job.config_file", dest="config", metavar="FILE",
                        help="TOML config (defaults only when absent)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as TOML and exit")
    return parser


def parse_args(
    argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> tuple[JobConfig, argparse.Namespace]:
    """Parse --config/--print-config (plus any options of `parser`) and the overrides."""
    parser = parser or build_parser()
    ns, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return load_config(ns.config, rest), ns


