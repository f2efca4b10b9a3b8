"""Async checkpoints survive a crash (issue 20, item 1): a save is published by a background
thread the moment DCP's write completes, not when the next save starts; a save a kill left as
`.step-N.tmp` is published at restart when its write had completed and it verifies, else
removed with one `warning:` line saying why."""

import json
import shutil
import signal

import pytest
from checkpoint_helpers import copy_run, finished_run, make_trainer, parked_job, read_until, run_job

from runtime.train.checkpoint import manifest


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished 4-step run of the tiny model: checkpoints step-2 and step-4."""
    return finished_run(tmp_path_factory)


def _losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def test_kill_9_after_an_async_save_resumes_from_it(tmp_path):
    """The async save of step 4 is published while step 5 runs (the job waits inside step 5
    for it: no step boundary passes); the job is killed -9 at step 7, before the next save.
    The restart resumes from step 4, and its steps 5..7 equal the killed run's."""
    extra = ["--checkpoint.async_mode=async", "--training.steps=7", "--checkpoint.interval=4"]
    job = parked_job(tmp_path, *extra, wait_published=4, park_at_save=7)
    try:
        out = read_until(job, "parked before saving step 7")
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert "step-4 published while step 5 ran" in out, "\n".join(out[-30:])
    assert out[-1] == "parked before saving step 7", "\n".join(out[-30:])
    folder = tmp_path / "checkpoints"
    assert (folder / "latest").read_text().strip() == "step-4"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-4"]
    killed = _losses(tmp_path / "metrics.jsonl")
    assert sorted(killed) == list(range(1, 8))

    proc = run_job(tmp_path, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {folder / 'step-4'}" in proc.stdout
    assert "warning:" not in proc.stdout + proc.stderr
    resumed = _losses(tmp_path / "metrics.jsonl")
    assert sorted(resumed) == list(range(1, 8))
    assert sorted(_losses(tmp_path / "metrics.dropped.jsonl")) == [5, 6, 7]
    for step in (5, 6, 7):
        assert resumed[step] == pytest.approx(killed[step], rel=1e-6, abs=0), step


def _interrupt(folder, damage):
    """step-4 as a kill between its write and its publication leaves it (`latest` still
    names step-2), then damaged by `damage`."""
    ckpts = folder / "checkpoints"
    tmp = ckpts / ".step-4.tmp"
    (ckpts / "step-4").rename(tmp)
    (ckpts / "latest").write_text("step-2\n")
    damage(tmp)


def _truncate(tmp):
    path = tmp / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[:-1000])


@pytest.mark.parametrize("damage, resumed, why", [
    (lambda tmp: None, 4, None),  # killed between the manifest and the rename
    (lambda tmp: (tmp / manifest.MANIFEST).unlink(), 4, None),  # killed while checksumming
    (lambda tmp: [(tmp / manifest.MANIFEST).unlink(), (tmp / ".metadata").unlink()], 2,
     "no .metadata: its tensor data was not completely written"),  # killed while writing
    (lambda tmp: [(tmp / manifest.MANIFEST).unlink(), _truncate(tmp)], 2,
     "__0_0.distcp is shorter than its index says"),
    (lambda tmp: [(tmp / manifest.MANIFEST).unlink(), (tmp / "runtime.json").unlink()], 2,
     "runtime.json"),
    (_truncate, 2, "__0_0.distcp has"),  # with a manifest: the manifest decides
], ids=["manifest", "no-manifest", "no-metadata", "truncated", "no-runtime-json", "damaged"])
def test_an_interrupted_save_is_published_only_when_complete(saved, tmp_path, capsys, damage,
                                                             resumed, why):
    folder = copy_run(saved, tmp_path / "run")
    _interrupt(folder, damage)
    trainer = make_trainer(folder, "--training.steps=6")
    assert trainer.step == resumed
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    ckpts = folder / "checkpoints"
    assert not list(ckpts.glob(".step-*"))
    if why is None:
        assert warnings == [] and "published .step-4.tmp" in out
        assert (ckpts / "latest").read_text().strip() == "step-4"
        assert manifest.read_manifest(ckpts / "step-4")[1] is None
    else:
        assert len(warnings) == 1 and why in warnings[0], out
        assert f"removed the interrupted save {ckpts / '.step-4.tmp'}" in warnings[0]
        assert not (ckpts / "step-4").exists()


def test_a_recovered_save_never_moves_latest_backwards(saved, tmp_path):
    folder = copy_run(saved, tmp_path / "run")
    ckpts = folder / "checkpoints"
    shutil.copytree(ckpts / "step-2", ckpts / ".step-2.tmp")
    shutil.rmtree(ckpts / "step-2")
    assert make_trainer(folder, "--training.steps=6").step == 4
    assert (ckpts / "latest").read_text().strip() == "step-4"
    assert (ckpts / "step-2" / manifest.MANIFEST).is_file()


def test_a_complete_save_whose_manifest_cannot_be_written_is_kept(saved, tmp_path, capsys,
                                                                     monkeypatch):
    # Killed while checksumming; at restart the disk is full: one warning, the save is kept
    # as it is (no traceback, no rank left in a collective), and the next start publishes it.
    import errno

    folder = copy_run(saved, tmp_path / "run")
    _interrupt(folder, lambda tmp: (tmp / manifest.MANIFEST).unlink())
    real = manifest.write_manifest

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifest, "write_manifest", full)
    trainer = make_trainer(folder, "--training.steps=6")
    assert trainer.step == 2
    trainer.dump_lock.release()
    warnings = [x for x in capsys.readouterr().out.splitlines() if x.startswith("warning:")]
    tmp = folder / "checkpoints" / ".step-4.tmp"
    assert warnings == [f"warning: the interrupted save {tmp} is complete but its manifest cannot "
                        "be written ([Errno 28] No space left on device): left as it is"]
    assert (tmp / ".metadata").is_file()
    monkeypatch.setattr(manifest, "write_manifest", real)
    assert make_trainer(folder, "--training.steps=6").step == 4
