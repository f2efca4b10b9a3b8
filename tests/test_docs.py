"""The docs (README.md + docs/*.md) are tested: links resolve, the config reference is the
schema's, every page of issue 26 exists and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runtime.train import config_reference

ROOT = Path(__file__).resolve().parents[1]
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
        "docs/config-reference.md is stale: run python -m runtime.train.config_reference")
    # Every schema key has its row (and the --help list is the same set of keys).
    for key in config_reference.keys():
        assert f"| `{key}` |" in page
