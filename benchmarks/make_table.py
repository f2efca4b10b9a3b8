"""Results JSONL (from bench_train.py / bench_block.py / measure_peak.py) -> markdown tables.

    python benchmarks/make_table.py benchmarks/results/2026-11-24.jsonl [more.jsonl] [--out table.md]

Columns compare against the bar of issue 8 (one H100, 20b shapes x 2 layers, seq 4096,
batch 2): torchtitan 42k tokens/s, 55 GiB, first step 125 s; target >= 67k tokens/s,
<= 55 GiB, first step <= 60 s; one block fwd+bwd >= 45% of the measured matmul peak.
A value that was not measured prints as "-".
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import read_jsonl

TORCHTITAN_TOKENS_PER_S = 42_000
TARGET_TOKENS_PER_S = 67_000
TARGET_MEMORY_GIB = 55.0
TARGET_FIRST_STEP_S = 60.0
TARGET_BLOCK_PCT = 45.0


def _f(v, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return format(v, spec)


def _date(r: dict) -> str:
    return (r.get("date") or "-")[:10]


def _gpu(r: dict) -> str:
    return r.get("gpu") or r.get("device") or "-"


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|")


def _train_name(r: dict) -> str:
    name = r.get("label") or Path(r.get("config") or "-").stem
    over = " ".join(r.get("overrides") or [])
    return _esc(f"{name} `{over}`" if over and not r.get("label") else name)


def train_table(rows: list[dict]) -> list[str]:
    out = [("| date | GPU | torch | run | world | tokens/s | tokens/s/GPU | vs torchtitan 42k | "
            "TFLOP/s/GPU | MFU | peak mem GiB | first step s | note |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tps = r.get("tokens_per_s")
        ratio = f"{tps / TORCHTITAN_TOKENS_PER_S:.2f}x" if tps else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        notes = []
        if r.get("error"):
            notes.append(_note(r))
        if tps and tps >= TARGET_TOKENS_PER_S:
            notes.append("tokens/s target met")
        mem = r.get("peak_memory_gib")
        if mem is not None and r.get("memory_kind", "").startswith("cuda") and mem > TARGET_MEMORY_GIB:
            notes.append(f"> {TARGET_MEMORY_GIB:.0f} GiB")
        out.append(f"| {_date(r)} | {_esc(_gpu(r))} | {r.get('torch', '-')} | {_train_name(r)} | "
                   f"{r.get('world_size', '-')} | {_f(tps, ',.0f')} | "
                   f"{_f(r.get('tokens_per_s_per_device'), ',.0f')} | {ratio} | "
                   f"{_f(r.get('tflops_per_device'))} | {mfu} | {_f(mem, '.1f')} | "
                   f"{_f(r.get('first_step_s'), '.1f')} | {'; '.join(notes)} |")
    return out


def block_table(rows: list[dict]) -> list[str]:
    out = [("| date | GPU | torch | run | variant | tokens | dtype/params | compile | attention | "
            "fwd+bwd ms | TFLOP/s | % of peak | first call s | peak mem GiB | note |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = r.get("pct_of_peak")
        pct_s = "-" if pct is None else f"{pct:.1f}%" + (" (>= 45%)" if pct >= TARGET_BLOCK_PCT else "")
        out.append(f"| {_date(r)} | {_esc(_gpu(r))} | {r.get('torch', '-')} | "
                   f"{_esc(r.get('label') or r.get('flavor', '-'))} | {r.get('variant', '-')} | "
                   f"{r.get('batch', '-')}x{r.get('seq_len', '-')} | "
                   f"{r.get('dtype', '-')}/{r.get('param_dtype', '-')} | "
                   f"{'yes' if r.get('compile') else 'no'} | {r.get('attn_backend', '-')} | "
                   f"{_f(r.get('ms'), '.2f')} | {_f(r.get('tflops'), '.1f')} | {pct_s} | "
                   f"{_f(r.get('first_call_s'), '.1f')} | {_f(r.get('peak_memory_gib'), '.1f')} | "
                   f"{_note(r)} |")
    return out


def piece_table(rows: list[dict]) -> list[str]:
    out = ["| run | compile | piece | fwd+bwd ms | TFLOP/s | % of peak | note |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = r.get("pct_of_peak")
        out.append(f"| {_esc(r.get('label') or r.get('flavor', '-'))} | "
                   f"{'yes' if r.get('compile') else 'no'} | {_esc(r.get('piece', '-'))} | "
                   f"{_f(r.get('ms'), '.2f')} | {_f(r.get('tflops'), '.1f')} | "
                   f"{'-' if pct is None else f'{pct:.1f}%'} | {_note(r)} |")
    return out


def _note(r: dict) -> str:
    """The failure kind of a record (OOM, an exception name), else empty."""
    return _esc(r["error"].split(":")[0]) if r.get("error") else ""


def peak_table(rows: list[dict]) -> list[str]:
    out = ["| date | GPU | torch | matmul | ms | TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {_date(r)} | {_esc(_gpu(r))} | {r.get('torch', '-')} | "
                   f"{r.get('peak_shape', '-')} {r.get('peak_dtype', '')} | {_f(r.get('peak_ms'), '.3f')} | "
                   f"{_f(r.get('peak_tflops'), '.1f')} |")
    return out


def make_table(records: list[dict]) -> str:
    """All tables for the records, in the order peak, train, block, pieces (empty ones skipped)."""
    kinds = {k: [r for r in records if r.get("kind") == k] for k in ("peak", "train", "block", "block_piece")}
    sections = []
    if kinds["peak"]:
        sections += ["### Measured matmul peak", "", *peak_table(kinds["peak"]), ""]
    if kinds["train"]:
        sections += ["### Training step (bench_train.py)", "", *train_table(kinds["train"]), ""]
    if kinds["block"]:
        sections += ["### One transformer block, forward + backward (bench_block.py)", "",
                     *block_table(kinds["block"]), ""]
    if kinds["block_piece"]:
        sections += ["### Block pieces, forward + backward (bench_block.py)", "",
                     *piece_table(kinds["block_piece"]), ""]
    if not sections:
        return "No results.\n"
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_table.py", description="results JSONL -> markdown")
    p.add_argument("jsonl", nargs="+", help="results files (bench_*.py --out)")
    p.add_argument("--out", default=None, help="write the markdown here (default: stdout)")
    a = p.parse_args(argv)
    records = [r for path in a.jsonl for r in read_jsonl(path)]
    text = make_table(records)
    if a.out:
        Path(a.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
