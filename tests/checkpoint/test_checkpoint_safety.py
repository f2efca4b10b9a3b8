"""Loading a checkpoint never executes code (issue 13, item 2): pickles planted in DCP's
`.metadata` or inside a `.distcp` item are refused with one line naming the file, on resume
and through checkpoint.initial_load_path; the train state is JSON."""

import json
import pickle

import pytest
from checkpoint_helpers import (Payload, copy_run, error_lines, finished_run, make_trainer, plant_item,
                                plant_metadata, run_job)

from runtime.safe_dcp import UnsafeCheckpointError, read_metadata_file
from runtime.train.checkpoint.manager import CheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished 2-step run (checkpoint step-2); tests copy it before poisoning."""
    return finished_run(tmp_path_factory, "--training.steps=2")


def test_train_state_is_json_and_real_metadata_passes_the_allow_list(saved):
    ckpt = saved / "checkpoints" / "step-2"
    record = json.loads((ckpt / "runtime.json").read_text())
    assert record["train"]["step"] == 2
    assert set(record["train"]) >= {"lr_scheduler", "dataloader", "rng_cpu"}
    assert record["model"]["flavor"] == "tiny"
    metadata = read_metadata_file(ckpt / ".metadata")
    assert any(k.startswith("model.") for k in metadata.state_dict_metadata)
    assert not any(k.startswith("train") for k in metadata.state_dict_metadata)  # not in DCP


def test_the_payload_would_run_under_plain_pickle(tmp_path):
    """Negative control: the planted bytes do execute when unpickled the way DCP does."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("where", ["metadata", "item"])
def test_planted_pickle_is_refused_on_resume(saved, tmp_path, where):
    folder = copy_run(saved, tmp_path / "run")
    ckpt = folder / "checkpoints" / "step-2"
    marker = tmp_path / "ran"
    if where == "metadata":
        plant_metadata(ckpt, marker)
        match = r"step-2/\.metadata: refused to load: it references posix\.system"
    else:
        item = plant_item(ckpt, marker)
        match = rf"step-2: refused to load item '{item}': it references posix\.system"
    with pytest.raises(CheckpointError, match=match):
        make_trainer(folder, "--training.steps=4")
    assert not marker.exists()
    assert ckpt.is_dir()  # nothing deleted


def test_planted_pickle_is_refused_as_initial_load_path(saved, tmp_path):
    ckpt = copy_run(saved / "checkpoints" / "step-2", tmp_path / "weights")
    marker = tmp_path / "ran"
    plant_metadata(ckpt, marker)
    with pytest.raises(CheckpointError, match=r"checkpoint.initial_load_path: "
                                              r".*weights/\.metadata: refused to load"):
        make_trainer(tmp_path / "run", f"--checkpoint.initial_load_path={ckpt}")
    assert not marker.exists()


def test_initial_load_path_reads_only_the_model(saved, tmp_path):
    """A payload in the optimizer part of a full checkpoint is never even read (and would
    be refused like on resume)."""
    ckpt = copy_run(saved / "checkpoints" / "step-2", tmp_path / "weights")
    marker = tmp_path / "ran"
    assert plant_item(ckpt, marker).startswith("optimizer.")
    trainer = make_trainer(tmp_path / "run", f"--checkpoint.initial_load_path={ckpt}")
    assert trainer.step == 0 and not marker.exists()


def test_planted_metadata_refused_by_the_job_with_one_line(saved, tmp_path):
    folder = copy_run(saved, tmp_path / "run")
    marker = tmp_path / "ran"
    plant_metadata(folder / "checkpoints" / "step-2", marker)
    proc = run_job(folder, "--training.steps=4")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "step-2/.metadata: refused to load" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_metadata_reader_refuses_foreign_objects(tmp_path):
    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(UnsafeCheckpointError, match="holds a dict, not DCP metadata"):
        read_metadata_file(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(UnsafeCheckpointError, match="not a readable DCP metadata file"):
        read_metadata_file(path)


def test_planted_metadata_refused_by_dcp_to_hf(saved, tmp_path, capsys):
    from runtime.hf.convert import main as convert_main

    ckpt = copy_run(saved / "checkpoints" / "step-2", tmp_path / "weights")
    marker = tmp_path / "ran"
    plant_metadata(ckpt, marker)
    assert convert_main(["dcp-to-hf", str(ckpt), str(tmp_path / "hf"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights/.metadata: refused to load" in err[0]
    assert not marker.exists()
