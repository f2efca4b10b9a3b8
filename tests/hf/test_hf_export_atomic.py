"""The HF hand-back (`checkpoint.last_save_in_hf`) is published whole (issue 20, item 3): it is
written beside `hf/` and swapped in once complete, so `hf/` is always the old complete export
or the new one; files and folders get the umask's modes (the export, checkpoints, prepared
data); an `hf` the export cannot replace is one line, exit 2, before the model is built."""

import json
import os
import stat
import subprocess

import pytest
from checkpoint_helpers import error_lines, make_trainer, run_job

from runtime import atomic_dir
from runtime.train.checkpoint import hf_export

HF = ["--checkpoint.last_save_in_hf=true", "--checkpoint.last_save_hf_dtype=float32"]


@pytest.fixture
def umask_002():
    """A team's umask: group-writable files (the defaults 0600 / 0700 of tempfile and
    safetensors would show as wrong)."""
    old = os.umask(0o002)
    yield
    os.umask(old)


def _modes(folder):
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
            for p in [folder, *folder.rglob("*")]}


def _contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_export_is_swapped_in_whole_with_the_umask_modes(tmp_path, monkeypatch, umask_002):
    assert make_trainer(tmp_path, *HF, "--training.steps=2").run() == 0
    hf = tmp_path / "hf"
    first = _contents(hf)
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= set(first)
    for folder in (hf, tmp_path / "checkpoints"):
        modes = _modes(folder)
        assert {m for p, m in modes.items() if (folder / p).is_dir()} == {0o775}, modes
        assert {m for p, m in modes.items() if (folder / p).is_file()} == {0o664}, modes

    # A later export that dies mid-way (after its first shard) leaves the old one as it was.
    import runtime.hf.save as save

    real = save.save_file

    def dies(tensors, path, **kwargs):
        real(tensors, path, **kwargs)
        raise KeyboardInterrupt("killed mid-export")

    monkeypatch.setattr(save, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path, *HF, "--training.steps=4").run()
    assert _contents(hf) == first
    assert sorted(p.name for p in tmp_path.glob(".hf*")) == []

    monkeypatch.setattr(save, "save_file", real)
    assert make_trainer(tmp_path, *HF, "--training.steps=6").run() == 0
    assert _contents(hf).keys() == first.keys() and _contents(hf) != first
    assert sorted(p.name for p in tmp_path.glob(".hf*")) == []


def test_a_kill_between_the_renames_is_undone_at_start(tmp_path, monkeypatch):
    """Without renameat2's exchange the old export is renamed aside first: a kill then leaves
    no `hf/`, the old export aside and the new one under a temp name."""
    old, new, hf = tmp_path / "old", tmp_path / "new", tmp_path / "hf"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    atomic_dir.replace_dir(old, hf)
    monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def killed_after_first(src, dst):
        real_rename(src, dst)
        if str(dst).endswith(".hf.old"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", killed_after_first)
    tmp = atomic_dir.make_temp_dir(hf)
    (new / "config.json").rename(tmp / "config.json")
    with pytest.raises(KeyboardInterrupt):
        atomic_dir.replace_dir(tmp, hf)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not hf.exists()
    hf_export.check_export_target(str(tmp_path), rank=0)
    assert (hf / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.glob(".hf*")) == []


def test_the_exchange_swaps_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not atomic_dir._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported here (the two-rename path is used)")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


@pytest.mark.parametrize("fault", ["file", "read-only"])
def test_an_hf_the_export_cannot_replace_fails_before_training(tmp_path, fault):
    hf = tmp_path / "hf"
    mounted = False
    if fault == "file":
        hf.write_text("not an export")
    else:
        hf.mkdir()
        (hf / "config.json").write_text("{}")
        if os.geteuid() == 0:  # root ignores permission bits: a read-only bind mount
            subprocess.run(["mount", "--bind", str(hf), str(hf)], check=True)
            mounted = True
            subprocess.run(["mount", "-o", "remount,bind,ro", str(hf)], check=True)
        else:
            hf.chmod(0o555)
    try:
        proc = run_job(tmp_path, *HF)
    finally:
        if mounted:
            subprocess.run(["umount", str(hf)], check=True)
        hf.chmod(0o755) if hf.is_dir() else None
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "Traceback" not in proc.stderr
    why = "is a file, not a folder" if fault == "file" else "is not writable"
    assert line.startswith(f"error: checkpoint.last_save_in_hf: {hf} {why}"), line
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing was built or trained


def test_prepared_folder_has_the_umask_modes(tmp_path, umask_002):
    from runtime.data import FileSource, TextEncoder, Tokenizer
    from runtime.data.preparing import prepare

    tok = Tokenizer.load()
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["some text", "more"]))
    prepare(FileSource([path]), TextEncoder(tok), tmp_path / "prep", tok)
    modes = _modes(tmp_path / "prep")
    assert modes["."] == 0o775 and set(modes.values()) <= {0o775, 0o664}, modes
