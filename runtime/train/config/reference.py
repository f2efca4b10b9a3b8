"""docs/config-reference.md, generated from the config schema (one owner: schema.py).

    python -m runtime.train.config.reference            # rewrite docs/config-reference.md
    python -m runtime.train.config.reference --check    # exit 1 when the page is stale

The page is a view of the schema, so it is never edited by hand: a new key in schema.py
(or runtime/data/schema.py) is a new row after one run of this module, and
tests/docs/test_docs.py fails while the committed page differs from `render()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from runtime.train.config.schema import SECTIONS, section_fields, toml_value

PAGE = Path(__file__).resolve().parents[3] / "docs" / "config-reference.md"

_HEADER = """\
# Config reference

Generated from `runtime/train/config/schema.py` (and `runtime/data/schema.py` for `[data]` and `[validation]`) by
`python -m runtime.train.config.reference`; do not edit by hand (`tests/docs/test_docs.py` fails
when this page is stale). `python -m runtime.train --help` prints the same keys.

Set a key in the TOML config (`[section]` then `key = value`) or on the command line as
`--section.key=value` (a TOML literal; the last one wins). What the keys do together:
[training.md](training.md), [data.md](data.md), [checkpoints.md](checkpoints.md),
[parallelism.md](parallelism.md), [fine-tuning.md](fine-tuning.md).
"""


def _cell(text: str) -> str:
    """Markdown table cells: a literal `|` would end the cell."""
    return text.replace("|", "\\|")


def _allowed(f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    if callable(choices):
        choices = choices()
    if not choices:
        return ""
    return ", ".join(f"`{toml_value(c)}`" for c in choices)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def keys() -> list[str]:
    """Every `section.key` of the schema (the docs tests check names against this)."""
    return [f"{s}.{k}" for s in SECTIONS for k in section_fields(s)]


def render() -> str:
    out = [_HEADER]
    out.append("Sections: " + ", ".join(f"[`[{s}]`](#{s})" for s in SECTIONS) + ".\n")
    for section in SECTIONS:
        out.append(f"## {section}\n")
        out.append("| key | type | default | allowed | what |")
        out.append("|---|---|---|---|---|")
        for key, f in section_fields(section).items():
            default = _default(f)
            out.append(
                f"| `{section}.{key}` | {type(default).__name__} | "
                f"`{_cell(toml_value(default))}` | {_cell(_allowed(f))} | "
                f"{_cell(f.metadata.get('help', ''))} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.train.config.reference",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when docs/config-reference.md differs from the schema")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != text:
            print(f"error: {PAGE} is stale: run python -m runtime.train.config.reference",
                  file=sys.stderr)
            return 1
        print(f"ok: {PAGE} matches the schema")
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
