"""What a resume may and may not change (issue 13, items 1, 6, 7, 11): another model is
refused before anything is loaded or pruned; changed config keys are listed, and those a
resume cannot honour are an error or a named warning; metrics.jsonl holds every step once
and no NaN; non-finite steps are named and capped by training.max_skipped_steps."""

import json
import shutil
import signal
import subprocess
import time

import pytest
from checkpoint_helpers import (ROOT, copy_run, error_lines, finished_run, job_command, make_trainer,
                                metrics_steps, run_job, run_job_ranks)

from runtime.train.checkpoint.manager import CheckpointError, find_latest_checkpoint
from runtime.train.faults import NonFiniteLossError
from runtime.train.metrics import truncate_metrics
from runtime.train.optim import lr_factor
from runtime.train.trainer import Trainer, main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished 4-step run of the 2-layer tiny model: checkpoints step-2 and step-4."""
    return finished_run(tmp_path_factory)


def _step_dirs(folder):
    return sorted(p.name for p in (folder / "checkpoints").glob("step-*"))


# ----------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("change, named", [
    ("--model.n_layers=1", "n_layers 2 here 1"),  # a smaller model: DCP would load a subset
    ("--model.flavor=debugmodel", "flavor 'tiny' here 'debugmodel'"),
])
def test_another_model_is_refused_and_nothing_is_pruned(saved, tmp_path, change, named):
    folder = copy_run(saved, tmp_path / "run")
    with pytest.raises(CheckpointError, match="holds another model than this run") as err:
        make_trainer(folder, change, "--checkpoint.keep_latest_k=1", "--training.steps=8")
    assert named in str(err.value)
    assert "new job.dump_folder" in str(err.value) and "model.flavor='tiny'" in str(err.value)
    assert _step_dirs(folder) == ["step-2", "step-4"]


def test_another_model_is_refused_before_the_model_is_built(saved, tmp_path, monkeypatch):
    def build(self):
        raise AssertionError("the model was built")

    monkeypatch.setattr(Trainer, "_build_model", build)
    with pytest.raises(CheckpointError, match="n_layers 2 here 1"):
        make_trainer(copy_run(saved, tmp_path / "run"), "--model.n_layers=1")


def test_another_model_exits_2_with_one_line(saved, tmp_path):
    folder = copy_run(saved, tmp_path / "run")
    proc = run_job(folder, "--model.n_layers=1", "--checkpoint.keep_latest_k=1",
                   "--training.steps=8")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "n_layers 2 here 1" in lines[0] and "Traceback" not in proc.stderr
    assert _step_dirs(folder) == ["step-2", "step-4"]


def test_shapes_are_compared_without_the_identity_record(saved, tmp_path):
    """A model-only DCP directory (hf-to-dcp output) has no runtime.json: the tensor names
    and shapes of its index still have to match."""
    weights = tmp_path / "weights"
    shutil.copytree(saved / "checkpoints" / "step-4", weights)
    with pytest.raises(CheckpointError, match="initial_load_path: .* holds another model .*"
                                              "not in this model"):
        make_trainer(tmp_path / "run", "--model.n_layers=1",
                     f"--checkpoint.initial_load_path={weights}")


# ----------------------------------------------------------------------------- item 6
def test_changed_keys_are_listed(saved, tmp_path, capsys):
    folder = copy_run(saved, tmp_path / "run")
    make_trainer(folder, "--training.steps=6", "--metrics.log_freq=2")
    out = capsys.readouterr().out
    assert ("resuming step-4 with config changes: training.steps 4 -> 6; "
            "metrics.log_freq 1 -> 2") in out
    assert "warning" not in out


def test_changed_lr_needs_the_scheduler_reset(saved, tmp_path):
    folder = copy_run(saved, tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"optimizer.lr = 0.001 cannot take effect .* "
                                              r"restored lr scheduler keeps 0.003"
                                              r".*exclude_from_loading"):
        make_trainer(folder, "--optimizer.lr=1e-3", "--training.steps=6")
    trainer = make_trainer(folder, "--optimizer.lr=1e-3", "--training.steps=6",
                           '--checkpoint.exclude_from_loading=["lr_scheduler"]')
    assert trainer.step == 4
    _, _, lr = trainer.optimizer_step(next(iter(trainer.dataloader)))
    assert lr == pytest.approx(1e-3 * lr_factor(5, 6, 1, "cosine", 0.2, 0.1), rel=1e-12)


def test_ignored_optimizer_setting_is_a_named_warning(saved, tmp_path, capsys):
    folder = copy_run(saved, tmp_path / "run")
    trainer = make_trainer(folder, "--optimizer.weight_decay=0.0", "--training.steps=6")
    warnings = [l for l in capsys.readouterr().out.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1
    assert "optimizer.weight_decay = 0.0 cannot take effect" in warnings[0]
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.1  # what the warning says
    fresh = make_trainer(folder, "--optimizer.weight_decay=0.0", "--training.steps=6",
                         '--checkpoint.exclude_from_loading=["optimizer"]')
    assert fresh.optimizer.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("overrides, key", [
    (["--data.dataset_path=corpus.jsonl"], "--data.dataset_path"),
    (["--data.dataset=path", "--data.dataset_path=a.jsonl", "--data.hf_dataset=org/x"],
     "--data.hf_dataset"),
])
def test_data_keys_the_source_ignores_are_config_errors(overrides, key):
    from runtime.errors import ConfigError
    from runtime.train.config.loader import load_config

    with pytest.raises(ConfigError, match=rf"command line: {key} is set but (--)?data.dataset = "
                                          r"'\w+' never reads it"):
        load_config(None, overrides)


def test_excluded_dataloader_starts_the_data_over(saved, tmp_path):
    folder = copy_run(saved, tmp_path / "run")
    resumed = make_trainer(folder, "--training.steps=6")
    fresh = make_trainer(folder, "--training.steps=6",
                         '--checkpoint.exclude_from_loading=["dataloader"]')
    assert resumed.step == fresh.step == 4
    assert resumed.dataloader.state_dict() != fresh.dataloader.state_dict()
    assert fresh.dataloader.state_dict() == make_trainer(tmp_path / "new").dataloader.state_dict()


# ----------------------------------------------------------------------------- item 7
def test_truncate_metrics_keeps_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(rows) + '\n{"step": 5, "lo')  # killed mid-line
    assert truncate_metrics(path, 2) == 3
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]
    assert len((tmp_path / "metrics.dropped.jsonl").read_text().splitlines()) == 3


def test_kill_9_then_resume_logs_every_step_once(tmp_path):
    """A job killed -9 mid-run (after logging steps its last checkpoint does not hold, maybe
    mid-save, leaving its lock behind) is rerun: every step appears once in metrics.jsonl."""
    cmd, env = job_command(tmp_path, "--training.steps=100000", "--metrics.log_freq=1")
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and job.poll() is None:
            path = tmp_path / "metrics.jsonl"
            if path.exists() and path.read_text().count("\n") >= 7:
                break
            time.sleep(0.02)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert job.returncode == -signal.SIGKILL
    resume_at = int(find_latest_checkpoint(tmp_path / "checkpoints").name.split("-")[1])
    logged = metrics_steps(tmp_path)
    assert len(logged) >= 7 and max(logged) >= resume_at
    proc = run_job(tmp_path, f"--training.steps={resume_at + 3}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert metrics_steps(tmp_path) == list(range(1, resume_at + 4))


def test_resume_after_kill_logs_every_step_once(saved, tmp_path):
    folder = copy_run(saved, tmp_path / "run")
    shutil.rmtree(folder / "checkpoints" / "step-4")  # as if killed -9 after logging step 4
    assert make_trainer(folder, "--training.steps=5").run() == 0
    assert metrics_steps(folder) == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- item 11
def _poison(monkeypatch, loss=1.0, grad_norm=1.0):
    real = Trainer.train_step

    def step(self, batch):
        real(self, batch)
        return loss, grad_norm

    monkeypatch.setattr(Trainer, "train_step", step)


def test_nonfinite_grad_norm_is_named(tmp_path, monkeypatch):
    _poison(monkeypatch, grad_norm=float("inf"))
    with pytest.raises(NonFiniteLossError, match="non-finite grad norm inf at step 1"):
        make_trainer(tmp_path, "--checkpoint.enable=false").run()


def test_skipped_steps_are_capped_and_logged_as_null(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, loss=float("nan"), grad_norm=float("nan"))
    trainer = make_trainer(tmp_path, "--training.on_nonfinite=skip",
                           "--training.max_skipped_steps=2", "--training.steps=8")
    with pytest.raises(NonFiniteLossError, match="training.max_skipped_steps"):
        trainer.run()
    assert trainer.step == 3
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] is None  # strict JSON
    assert "step 1: non-finite loss nan, step skipped (1 of at most 2)" in capsys.readouterr().out


def test_skipped_steps_count_across_resumes(saved, tmp_path):
    folder = copy_run(saved, tmp_path / "run")
    trainer = make_trainer(folder, "--training.steps=6")
    trainer.step, trainer.skipped_steps = 5, 2
    trainer.checkpointer.save(5, force_sync=True)
    resumed = make_trainer(folder, "--training.steps=6")
    assert (resumed.step, resumed.skipped_steps) == (5, 2)


def test_too_many_skipped_steps_exit_2(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, grad_norm=float("nan"))
    code = main(["--model.flavor=tiny", "--training.seq_len=32", "--training.local_batch_size=2",
                 "--training.steps=8", "--training.on_nonfinite=skip",
                 f"--job.dump_folder={tmp_path}"])
    assert code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "grad norm" in err[0] and "max_skipped_steps (3)" in err[0]


# ------------------------------------------------------------------- issue 20 item 5
def test_another_world_size_never_changes_the_global_batch_silently(saved, tmp_path):
    """global_batch_size = -1 is local x dp: resuming the 1-rank run (4 x 1) on 2 ranks
    (4 x 2) would double the batch. Two real ranks refuse before the model is built, with one
    line saying how to keep it or accept it; an explicit global_batch_size resumes, and the
    named exclude accepts the new batch with a warning."""
    folder = copy_run(saved, tmp_path / "run")
    ranks = run_job_ranks(folder, "--training.steps=6")
    outs = [(out, err) for _, out, err in ranks]
    assert [code for code, _, _ in ranks] == [2, 2], outs
    want = (f"error: checkpoint {folder}/checkpoints/step-4: the checkpoint was trained with a "
            f"global batch of 4 sequences per step, this run's is 8 (training.global_batch_size "
            f"= -1: local_batch_size 4 x data-parallel degree 2); set "
            f"training.global_batch_size = 4 to keep it, or add \"global_batch\" to "
            f"checkpoint.exclude_from_loading to continue with 8\n")
    assert outs[0][1] == want, outs[0]
    assert "parameters" not in outs[0][0] and not (folder / ".lock").exists()
    assert json.loads((folder / "checkpoints" / "step-4" / "runtime.json").read_text()
                      )["train"]["global_batch"] == 4
    # one rank, local 2: the same change of the effective batch (4 -> 2)
    with pytest.raises(CheckpointError, match="global batch of 4 sequences per step, this run's "
                                              "is 2"):
        make_trainer(folder, "--training.local_batch_size=2")
    # keep it: an explicit global batch (2 x 2 accumulation steps) resumes as before
    kept = make_trainer(folder, "--training.local_batch_size=2", "--training.global_batch_size=4",
                        "--training.steps=5")
    assert (kept.step, kept.global_batch, kept.grad_accum) == (4, 4, 2)
    kept.dump_lock.release()
    # accept it: a named warning, then training goes on with the new batch
    logs = []
    accepted = make_trainer(folder, "--training.local_batch_size=2", "--training.steps=5",
                            "--checkpoint.exclude_from_loading=global_batch")
    assert accepted.step == 4 and accepted.global_batch == 2
    accepted.checkpointer.log = logs.append
    accepted.checkpointer._check_global_batch(folder / "checkpoints" / "step-4", {"global_batch": 4})
    assert logs == ["warning: the checkpoint was trained with a global batch of 4 sequences per "
                    "step, this run's is 2 (training.global_batch_size = -1: local_batch_size 2 "
                    "x data-parallel degree 1): continuing with 2 (checkpoint.exclude_from_loading "
                    "has \"global_batch\")"]
    assert accepted.run() == 0 and accepted.step == 5
