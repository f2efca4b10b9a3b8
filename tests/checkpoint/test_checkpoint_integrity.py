"""A damaged checkpoint never kills a job and never loads silently (issue 13, items 3 and 5):
every save writes a manifest (sizes + CRC32) after the data; a load verifies it and falls
back to the newest intact checkpoint with a one-line warning; saves over an existing step
replace it atomically; a branch from an older step refuses to mix histories."""

import shutil

import pytest
from checkpoint_helpers import copy_run, error_lines, finished_run, make_trainer, metrics_steps, run_job

from runtime.train.checkpoint import manifest
from runtime.train.checkpoint.manager import CheckpointError, find_latest_checkpoint


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished 4-step run with checkpoints step-2 and step-4."""
    return finished_run(tmp_path_factory)


def _distcp(ckpt):
    return next(ckpt.glob("*.distcp"))


def _zero_range(path, start=1000, length=4096):
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(length))


DAMAGE = {
    "deleted distcp": lambda c: _distcp(c).unlink(),
    "truncated distcp": lambda c: _distcp(c).write_bytes(_distcp(c).read_bytes()[:-100]),
    "zeroed range": lambda c: _zero_range(_distcp(c)),
    "no manifest": lambda c: (c / manifest.MANIFEST).unlink(),
    "garbage runtime.json": lambda c: (c / "runtime.json").write_text("{"),
}
WHY = {
    "deleted distcp": "__0_0.distcp is missing",
    "truncated distcp": "__0_0.distcp has",
    "zeroed range": "__0_0.distcp fails its checksum",
    "no manifest": "no manifest.json",
    "garbage runtime.json": "runtime.json",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_is_skipped_for_the_newest_intact(saved, tmp_path, capsys, damage):
    folder = copy_run(saved, tmp_path / "run")
    DAMAGE[damage](folder / "checkpoints" / "step-4")
    trainer = make_trainer(folder, "--training.steps=6")
    assert trainer.step == 2
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step-4 is damaged or incomplete" in warnings[0]
    assert WHY[damage] in warnings[0]


@pytest.mark.parametrize("pointer", [b"step-\x00\xff\xfe garbage", b"not a checkpoint\n", b""])
def test_garbage_latest_pointer_is_ignored(saved, tmp_path, capsys, pointer):
    folder = copy_run(saved, tmp_path / "run")
    (folder / "checkpoints" / "latest").write_bytes(pointer)
    assert make_trainer(folder, "--training.steps=6").step == 4
    assert "latest" in capsys.readouterr().out


def test_explicitly_requested_damaged_checkpoint_is_an_error(saved, tmp_path):
    folder = copy_run(saved, tmp_path / "run")
    _zero_range(_distcp(folder / "checkpoints" / "step-2"))
    shutil.rmtree(folder / "checkpoints" / "step-4")
    with pytest.raises(CheckpointError, match=r"checkpoint.load_step=2: .*step-2 is damaged "
                                              r"\(__0_0.distcp fails its checksum\)"):
        make_trainer(folder, "--checkpoint.load_step=2")


def test_branching_from_an_older_step_refuses_to_mix_histories(saved, tmp_path):
    folder = copy_run(saved, tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"load_step=2: .* later checkpoints step-4"):
        make_trainer(folder, "--checkpoint.load_step=2", "--optimizer.weight_decay=0.0")
    assert (folder / "checkpoints" / "step-4" / manifest.MANIFEST).is_file()  # untouched
    shutil.move(folder / "checkpoints" / "step-4", tmp_path / "step-4-aside")
    assert make_trainer(folder, "--checkpoint.load_step=2").step == 2


def test_save_over_a_damaged_step_takes_its_name_and_keeps_it_aside(saved, tmp_path, capsys):
    folder = copy_run(saved, tmp_path / "run")
    ckpt = folder / "checkpoints" / "step-4"
    _zero_range(_distcp(ckpt))
    trainer = make_trainer(folder)
    assert trainer.step == 2 and trainer.run() == 0
    assert "the previous step-4 was kept as step-4.replaced-" in capsys.readouterr().out
    assert find_latest_checkpoint(folder / "checkpoints") == ckpt
    assert make_trainer(folder, "--training.steps=6").step == 4  # the new step-4 is intact
    (aside,) = (folder / "checkpoints").glob("step-4.replaced-*")
    assert manifest.check_checksums(aside, manifest.read_manifest(aside)[0], ["__0_0.distcp"])
    assert not list((folder / "checkpoints").glob(".step-*"))


def test_requeued_job_survives_a_corrupt_latest(saved, tmp_path):
    """The real entry point, as a requeue runs it: exit 0, every step logged once."""
    folder = copy_run(saved, tmp_path / "run")
    _zero_range(_distcp(folder / "checkpoints" / "step-4"), start=5000, length=100)
    (folder / "checkpoints" / "latest").write_bytes(b"\x89PNG\r\n\x1a\n")
    proc = run_job(folder, "--training.steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not error_lines(proc)
    assert ("step-4 is damaged or incomplete (__0_0.distcp fails its checksum): skipped"
            in proc.stdout)
    assert "resumed at step 2" in proc.stdout
    assert metrics_steps(folder) == [1, 2, 3, 4, 5, 6]  # the old 3 and 4 were moved aside
    assert find_latest_checkpoint(folder / "checkpoints").name == "step-6"
