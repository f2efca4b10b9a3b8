"""Observability: Weights & Biases (a fake `wandb` module for the call contract, the real one in
offline mode for what lands on disk; never the network), torch.profiler traces per rank, memory snapshots, and the trainer's log lines (tiny model, CPU)."""

import json
import re
import struct
import sys
import types
from pathlib import Path

import pytest
import torch

from parallel_harness import BASE as PARITY_BASE
from parallel_harness import run_distributed
from runtime.train import trainer as trainer_module
from runtime.train.config.loader import load_config
from runtime.train.profiling import StepProfiler
from runtime.train.trainer import Trainer, main
from runtime.train.wandb_logger import RUN_ID_FILE, WandbLogger, run_name

TINY = ["--model.flavor=tiny", "--training.seq_len=32", "--training.local_batch_size=2",
        "--training.device=cpu", "--lr_scheduler.warmup_steps=1", "--metrics.log_freq=1",
        "--checkpoint.enable=false"]
WANDB_ENV = ("WANDB_MODE", "WANDB_NAME", "WANDB_PROJECT", "WANDB_RUN_ID", "SLURM_JOB_ID",
             "SLURM_JOB_NAME")


class FakeWandb(types.ModuleType):
    """Records init/log/finish calls as wandb's module-level API would receive them."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return types.SimpleNamespace(id=kwargs.get("id"))

    def log(self, data, step=None):
        self.calls.append(("log", dict(data), step))

    def finish(self, **kwargs):
        self.calls.append(("finish", kwargs))


@pytest.fixture
def fake_wandb(monkeypatch):
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def job(tmp_path: Path, *extra: str):
    return load_config(None, TINY + [f"--job.dump_folder={tmp_path}", *extra])


# --------------------------------------------------------------------------- W&B

def test_wandb_gets_config_once_every_step_and_finish(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "gptoss-debug")
    cfg = job(tmp_path, "--training.steps=3", "--metrics.enable_wandb",
              "--metrics.wandb_mode=offline")
    assert Trainer(cfg).run() == 0

    kinds = [c[0] for c in fake_wandb.calls]
    assert kinds == ["init", "log", "log", "log", "finish"], kinds
    init = fake_wandb.calls[0][1]
    assert init["config"] == cfg.to_dict()  # the resolved config, logged once at init
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path)
    assert init["project"] == "gptoss-runtime" and init["name"] == "gptoss-debug-4242"
    assert init["id"] == (tmp_path / RUN_ID_FILE).read_text().strip()

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [(c[2], c[1]) for c in fake_wandb.calls if c[0] == "log"]
    assert [step for step, _ in logged] == [1, 2, 3]
    for (step, values), row in zip(logged, rows):
        assert values["loss"] == row["loss"] and values["grad_norm"] == row["grad_norm"]
        assert "step" not in values and "mfu" not in values  # mfu is None on CPU


def test_wandb_names_and_mode_resolution(tmp_path, fake_wandb, monkeypatch):
    cfg = job(tmp_path / "my-run")
    assert run_name(cfg.metrics, str(tmp_path / "my-run")) == "my-run"
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert run_name(cfg.metrics, str(tmp_path / "my-run")) == "job-7"
    monkeypatch.setenv("WANDB_NAME", "from-env")
    assert run_name(cfg.metrics, "x") == "from-env"
    named = job(tmp_path, "--metrics.wandb_run_name=explicit")
    assert run_name(named.metrics, "x") == "explicit"

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "proj-env")
    first = WandbLogger(fake_wandb, cfg, str(tmp_path / "run"))
    again = WandbLogger(fake_wandb, job(tmp_path, "--metrics.wandb_project=proj",
                                        "--metrics.wandb_mode=online"), str(tmp_path / "run"))
    a, b = fake_wandb.calls[0][1], fake_wandb.calls[1][1]
    assert a["mode"] == "offline" and a["project"] == "proj-env"  # the environment honoured
    assert b["mode"] == "online" and b["project"] == "proj"  # the config wins over it
    assert a["id"] == b["id"] and a["resume"] == "allow"  # one dump folder, one W&B run
    first.log({"step": 5, "loss": 1.5, "mfu": None, "flag": True})
    assert fake_wandb.calls[-1] == ("log", {"loss": 1.5}, 5)
    again.close()
    assert fake_wandb.calls[-1][0] == "finish"


def test_wandb_not_installed_is_a_config_error_before_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError

    def never(*args, **kwargs):
        raise AssertionError("the distributed environment was set up")

    monkeypatch.setattr(trainer_module, "setup_distributed_env", never)
    out = tmp_path / "out"
    code = main([*TINY, f"--job.dump_folder={out}", "--metrics.enable_wandb"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "metrics.enable_wandb" in err and "pip install" in err
    assert not out.exists()


def wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file: W&B's transaction log, LevelDB's log format
    (32 KiB blocks of chunks: crc32 u32, length u16, type u8 = full/first/middle/last) after a
    7-byte ':W&B' header, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, parts, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            records.append(wandb_internal_pb2.Record.FromString(parts))
            parts = b""
    return records


def wandb_items(items) -> dict:
    """{key: value} of a record's items (the key is `key` or, in newer wandb, `nested_key`)."""
    return {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in items}


def test_real_wandb_offline_run_holds_the_config_and_every_step(tmp_path, monkeypatch):
    """The real wandb (offline: no network, no account): the run in <dump_folder>/wandb/ has the
    dump folder's run id, the resolved config and each metrics line at its step."""
    pytest.importorskip("wandb")
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # wandb's own files stay in tmp
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = job(tmp_path, "--training.steps=3", "--metrics.enable_wandb",
              "--metrics.wandb_mode=offline", "--metrics.wandb_run_name=readback")
    assert Trainer(cfg).run() == 0

    run_id = (tmp_path / RUN_ID_FILE).read_text().strip()
    [path] = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = wandb_records(path)
    kinds = [r.WhichOneof("record_type") for r in records]
    [run] = [r.run for r in records if r.HasField("run")]
    assert run.run_id == run_id and run.display_name == "readback"
    assert run.project == "gptoss-runtime"
    config = wandb_items(run.config.update)
    for r in records:
        if r.HasField("config"):
            config.update(wandb_items(r.config.update))
    assert config["training"]["steps"] == 3 and config["model"]["flavor"] == "tiny", config.keys()
    history = [r.history for r in records if r.HasField("history")]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h.step.num for h in history] == [row["step"] for row in rows] == [1, 2, 3]
    history = [wandb_items(h.item) for h in history]
    assert [h["loss"] for h in history] == [row["loss"] for row in rows]
    assert [h["grad_norm"] for h in history] == [row["grad_norm"] for row in rows]
    assert "exit" in kinds  # finished: the run was closed when the trainer returned


# --------------------------------------------------------------------------- profiling

PROFILE_3 = ["--profiling.enable_profiling", "--profiling.profile_freq=3",
             "--profiling.profiler_warmup=1", "--profiling.profiler_active=1"]


def test_profiled_3_step_run_writes_a_trace_per_rank(tmp_path):
    overrides = PARITY_BASE + ["--training.local_batch_size=2", *PROFILE_3]
    run_distributed(2, overrides, steps=3, out_dir=tmp_path)
    traces = tmp_path / "job" / "profile_traces"
    assert sorted(p.name for p in traces.iterdir()) == ["iteration_3"]
    for rank in range(2):
        events = json.loads((traces / "iteration_3" / f"rank{rank}_trace.json").read_text())
        names = {e.get("name", "") for e in events["traceEvents"]}
        assert any(n.startswith("aten::") for n in names), rank  # the step's ops were recorded


def _work():
    torch.randn(16, 16) @ torch.randn(16, 16)


@pytest.mark.parametrize("start, expected", [(0, ["iteration_3", "iteration_6"]),
                                             (4, ["iteration_6", "iteration_9"])])
def test_trace_cycles_follow_the_global_step(tmp_path, start, expected):
    """Resumed at `start`, cycles still end on multiples of profile_freq; the cycle cut short
    by the end of the run writes nothing."""
    cfg = job(tmp_path, *PROFILE_3).profiling
    written = []
    with StepProfiler(cfg, str(tmp_path), 0, torch.device("cpu"), start, log=lambda m: None) as p:
        for _ in range(7):
            _work()
            written.append(p.step())
    assert sorted(d.name for d in (tmp_path / "profile_traces").iterdir()) == expected
    assert sum(written) == 2  # step() says when it wrote (the trainer resets its timer then)


def test_profile_freq_shorter_than_a_cycle_is_a_config_error(tmp_path, capsys):
    assert main([*TINY, "--profiling.enable_profiling", "--profiling.profile_freq=2"]) == 2
    assert "profiling.profile_freq" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_snapshots_every_freq_and_on_oom(tmp_path):
    cfg = job(tmp_path, "--profiling.enable_memory_snapshot", "--profiling.profile_freq=2")
    keep = []
    with pytest.raises(torch.OutOfMemoryError):
        with StepProfiler(cfg.profiling, str(tmp_path), 0, torch.device("cuda"), 0) as p:
            for _ in range(3):
                keep.append(torch.empty(1 << 20, device="cuda"))
                p.step()
            torch.empty(1 << 50, device="cuda")  # 4 PiB: out of memory in step 4
    folder = tmp_path / "memory_snapshot"
    assert sorted(d.name for d in folder.iterdir()) == ["iteration_2", "iteration_4_oom"]
    for name in ("iteration_2", "iteration_4_oom"):
        assert (folder / name / "rank0_memory_snapshot.pickle").stat().st_size > 0


# --------------------------------------------------------------------------- log lines

def test_log_lines_timestamps_folders_parameter_counts(tmp_path, capsys):
    cfg = job(tmp_path, "--training.steps=2", "--checkpoint.enable=true",
              "--checkpoint.interval=5", "--profiling.enable_memory_snapshot")
    assert Trainer(cfg).run() == 0
    out = capsys.readouterr().out.splitlines()

    steps = [line for line in out if re.search(r"\bstep +\d+ \|", line)]
    assert len(steps) == 2
    for line in steps:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step +\d+ \| loss ", line), line
    assert f"dump folder {tmp_path} | checkpoint folder {tmp_path / 'checkpoints'} " \
           f"(every 5 steps)" in out
    params = next(line for line in out if "parameters (model total)" in line)
    total, per_rank = re.search(r"([\d.]+)M parameters \(model total\), ([\d.]+)M on rank 0 "
                                r"\(per rank\)", params).groups()
    assert total == per_rank  # one process holds the whole model
    assert any(line.startswith("warning: profiling.enable_memory_snapshot: memory snapshots "
                               "need CUDA") for line in out)
    assert not (tmp_path / "memory_snapshot").exists()
