"""The docs (README.md + docs/*.md) are tested: links resolve, the config reference is the
schema's, every page of issue 26 exists and the README stays short."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
from pathlib import Path

import pytest

import runtime.train.config.reference as config_reference

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = ("training", "checkpoints", "fine-tuning", "parallelism", "data", "cluster",
         "benchmarks", "architecture", "config-reference")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def test_every_page_exists_and_the_readme_is_short():
    missing = [p for p in PAGES if not (DOCS / f"{p}.md").is_file()]
    assert not missing
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


# [text](target) outside code; images too. Targets with a scheme are external (not checked).
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces -> '-'."""
    text = _FENCE.sub("", path.read_text())
    out = set()
    for title in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def _links(path: Path) -> list[str]:
    text = _FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in _LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    broken = []
    for target in _links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{doc.name}: broken links {broken}"


def test_link_check_sees_a_broken_link(tmp_path):
    """Negative control: the checker reports a missing file and a missing anchor."""
    (tmp_path / "a.md").write_text("# Top\n[x](b.md) [y](#nowhere) [z](#top) [w](https://e.x)\n")
    links = _links(tmp_path / "a.md")
    assert links == ["b.md", "#nowhere", "#top"]
    assert _anchors(tmp_path / "a.md") == {"top"}


def test_config_reference_is_generated_from_the_schema():
    page = (DOCS / "config-reference.md").read_text(encoding="utf-8")
    assert page == config_reference.render(), (
        "docs/config-reference.md is stale: run python -m runtime.train.config.reference")
    # Every schema key has its row (and the --help list is the same set of keys).
    # `python -m runtime.train --help` stays the full key list.
    from runtime.train.config.loader import build_parser
    help_text = build_parser("python -m runtime.train").format_help()
    for key in config_reference.keys():
        assert f"| `{key}` |" in page
        assert f"  --{key}=" in help_text
    assert len(config_reference.keys()) > 100


# --------------------------------------------------------------------------- bash commands
# Every line of every ```bash block in README.md and docs/ is run here, in this process, in the
# cheapest form that still exercises it (`run`: as written; `check`: the config, overrides and
# mesh validated by the same code as `runtime.plan --check-only`, where a test named in
# COVERED already runs the real thing; `parse`: the command line parsed by the tool's own
# parser). A block whose first line is a marker comment is not run:
#     # gpu-only: <why>      # cluster-only: <why>      # needs-download: <why>
# A command no handler knows fails the test, so a new doc command is either run or marked.
MARKER = re.compile(r"^# (gpu-only|cluster-only|needs-download): \S")
_BASH = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)

# The real runs of what `check` only validates (the test asserts each file exists).
COVERED = {
    "configs/debugmodel.toml": "tests/train/test_trainer.py",
    "configs/debugmodel_sft.toml": "tests/train/test_chat_train.py",
    "configs/debugmodel_lora.toml": "tests/model/test_lora.py",
    "runtime.hf.convert": "tests/hf/test_hf_interop.py",
    "gpu_check.sh --cpu-smoke": "tests/launch/test_benchmarks.py",
    "scripts/test.sh": ".ci/run",
}


def bash_blocks(path: Path) -> list[tuple[str | None, list[str]]]:
    """(marker or None, commands) per ```bash block; continuation lines joined."""
    blocks = []
    for body in _BASH.findall(path.read_text()):
        lines = body.replace("\\\n", " ").splitlines()
        marker = MARKER.match(lines[0]) if lines else None
        commands = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        blocks.append((marker.group(1) if marker else None, commands))
    return blocks


def _exit_code(fn, argv) -> int:
    """A tool's main in this process; argparse's --help exits 0 through SystemExit."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = fn(argv)
    except SystemExit as e:
        code = e.code or 0
    assert code == 0, f"exit {code}: {out.getvalue()[-2000:]}"
    return code


def _check_train(argv: list[str], world: int) -> str:
    """`python -m runtime.train ARGS` on `world` ranks: --help / --print-config run as
    written; a training run is validated (config, overrides, mesh) and its config must be one
    whose real run a test covers."""
    if "--help" in argv or "--print-config" in argv:
        from runtime.train.trainer import main
        _exit_code(main, argv)
        return "run"
    from runtime import plan
    _exit_code(plan.main, [*argv, "--check-only", "--world-size", str(world)])
    config = argv[argv.index("--config") + 1]
    assert config in COVERED, f"no test runs {config} for real: add one to COVERED"
    return "check"


def run_doc_command(command: str) -> str:
    """Run one documented command (see the comment above); returns how it was run."""
    argv = shlex.split(command, comments=True)
    if argv[:3] == ["python", "-m", "runtime.train"]:
        return _check_train(argv[3:], 1)
    if argv[0] == "torchrun":
        nproc = int(argv[argv.index("--nproc-per-node") + 1])
        return _check_train(argv[argv.index("runtime.train") + 1:], nproc)
    if argv[:3] == ["python", "-m", "runtime.plan"]:
        from runtime import plan
        # The full plan builds the model on the meta device: 2 layers keep it under a second.
        extra = [] if "--check-only" in argv else ["--model.n_layers=2"]
        _exit_code(plan.main, argv[3:] + extra)
        return "run"
    if argv[:3] == ["python", "-m", "runtime.data"]:
        from runtime.data_cli import main
        _exit_code(main, argv[3:])
        return "run"
    if argv[:3] == ["python", "-m", "runtime.hf.convert"]:
        from runtime.hf.convert import build_parser
        build_parser().parse_args(argv[3:])  # conversions themselves: COVERED
        return "parse"
    if argv[:2] == ["python", "scripts/eval_chat_sample.py"]:
        # needs a fine-tuned export and transformers: its own --help, the arguments parsed
        script = runpy.run_path(str(ROOT / argv[1]), run_name="doc_test")
        _exit_code(script["main"], ["--help"])
        return "parse"
    if argv[:2] == ["bash", "scripts/run_debug.sh"]:
        # setup.sh, then exactly this training command (its real run: COVERED)
        last = (ROOT / "scripts/run_debug.sh").read_text().strip().splitlines()[-1]
        assert "-m runtime.train --config configs/debugmodel.toml" in last
        return _check_train(["--config", "configs/debugmodel.toml", *argv[2:]], 1)
    if argv[:2] == ["bash", "scripts/test.sh"]:
        assert "scripts/test.sh" in (ROOT / COVERED["scripts/test.sh"]).read_text()
        return "covered"
    if argv[:3] == ["bash", "benchmarks/gpu_check.sh", "--cpu-smoke"]:
        assert '"--cpu-smoke"' in (ROOT / COVERED["gpu_check.sh --cpu-smoke"]).read_text()
        return "covered"
    raise AssertionError(f"no doc-test handler for `{command}`: add one to tests/docs/test_docs.py "
                         "or start its block with a marker (# gpu-only: / # cluster-only: / "
                         "# needs-download: <why>)")


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.name)
def test_every_bash_command_runs_or_is_marked(doc, monkeypatch):
    monkeypatch.chdir(ROOT)
    for marker, commands in bash_blocks(doc):
        if marker:
            continue
        for command in commands:
            run_doc_command(command)
    for path in COVERED.values():
        assert (ROOT / path).is_file()


def test_doc_command_checks_can_fail(tmp_path, monkeypatch):
    """Negative controls: an unknown command, a misspelt key, a bad mesh and a wrong
    subcommand each fail; a marked block is not run."""
    monkeypatch.chdir(ROOT)
    for bad in ("make train",
                "python -m runtime.train --config configs/debugmodel.toml --training.stepz=3",
                "torchrun --nproc-per-node 3 -m runtime.train --config configs/debugmodel.toml "
                "--parallelism.tensor_parallel_degree=2",
                "python -m runtime.data --config configs/debugmodel.toml --shwo 2",
                "python -m runtime.train --config configs/gptoss_20b.toml"):  # no test runs it
        with pytest.raises(AssertionError):
            run_doc_command(bad)
    with pytest.raises(SystemExit):
        run_doc_command("python -m runtime.hf.convert dcp-2-hf SRC DST")
    doc = tmp_path / "x.md"
    doc.write_text("```bash\n# cluster-only: needs Slurm\nsbatch x\n```\n"
                   "```bash\npython -m runtime.train --help   # keys\n```\n")
    assert bash_blocks(doc) == [("cluster-only", ["sbatch x"]),
                                (None, ["python -m runtime.train --help   # keys"])]
    assert run_doc_command(bash_blocks(doc)[1][1][0]) == "run"


# --------------------------------------------------------------------------- config keys
# `section.key` anywhere in the docs (prose, tables, commands; not Python examples) must be a
# key of the schema. Longer dotted paths (`model.layers.3.q_proj`) and file names
# (`metrics.jsonl`, `model.py`) are not keys.
_SECTIONS = "|".join(sorted({k.split(".")[0] for k in config_reference.keys()}))
_KEY = re.compile(rf"(?<![\w./<])({_SECTIONS})\.([a-z_][a-z0-9_]*)(\*)?(?![\w(]|\.\w)")
_FILE_EXT = {"py", "md", "json", "jsonl", "toml", "sh", "txt", "safetensors", "sbatch", "bin",
             "npy", "pickle", "lock"}
_PYTHON = re.compile(r"^```python\n.*?^```", re.S | re.M)


def doc_keys(text: str) -> set[str]:
    text = _PYTHON.sub("", text)
    keys = set()
    for section, key, star in _KEY.findall(text):
        if key in _FILE_EXT:
            continue
        keys.add(f"{section}.{key}{star}")
    return keys


def _unknown(keys: set[str]) -> list[str]:
    schema = set(config_reference.keys())
    return sorted(k for k in keys if not (
        k in schema or (k.endswith("*") and any(s.startswith(k[:-1]) for s in schema))))


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.name)
def test_config_keys_named_in_the_docs_exist(doc):
    assert not _unknown(doc_keys(doc.read_text())), f"{doc.name}: not in the schema"


def test_key_check_sees_a_wrong_key():
    text = ("Set `training.stepz = 3`, `--optimizer.lr=1`, `checkpoint.initial_load_*` and "
            "`lora.nope_*`; not keys: `<dump>/metrics.jsonl`, model.py, `model.layers.3.x`, "
            "runtime.model.args, `model.to_empty(`.\n```python\nmodel.bogus = 1\n```\n")
    keys = doc_keys(text)
    assert keys == {"training.stepz", "optimizer.lr", "checkpoint.initial_load_*", "lora.nope_*"}
    assert _unknown(keys) == ["lora.nope_*", "training.stepz"]
