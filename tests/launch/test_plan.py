"""`python -m runtime.plan`: the shipped configs pass at their world sizes, --check-only exit
codes (what the Slurm launchers rely on), bad meshes from the command line are refused naming
the key, and an over-memory config exits non-zero with the reason."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import plan as plan_module
from runtime.train.config.loader import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
SHIPPED = {"gptoss_20b": 16, "gptoss_120b": 128}


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = plan_module.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "runtime.plan", *argv], check=False,
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "no error message"
    assert lines[-1].startswith("error: "), err
    return lines[-1]


# --------------------------------------------------------------------------- shipped configs

@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_config_fits_at_its_world_size(name, capsys):
    world = SHIPPED[name]
    code, out, err = run_main(capsys, "--config", str(CONFIGS / f"{name}.toml"),
                              "--world-size", str(world))
    assert code == 0, out + err
    assert f"on {world} ranks" in out
    assert "pp 1 x dp_replicate 1 x dp_shard_mod_ep" in out and "dp_shard_in_ep 8" in out
    for part in ("params", "optimizer", "FSDP buffers", "activations", "block forward",
                 "logits + loss", "block backward", "reduce-scatter"):
        assert f"  {part} " in out, part
    # FSDP: sharded grads are part of the backward peaks, or replace the accumulated ones
    assert "  grads " not in out
    assert ("  grad accum " in out) == (name == "gptoss_20b")  # 2 micro-batches at 16 ranks
    assert "fits" in out.splitlines()[-1]
    assert "sharding: measured from the sharded parameters (rank 0)" in out


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_config_per_rank_parameters(name):
    """FSDP (+ EP) splits every parameter over all ranks: per-rank ~ total / world."""
    world = SHIPPED[name]
    cfg = load_config(str(CONFIGS / f"{name}.toml"))
    plan = plan_module.plan_job(cfg, world)
    assert plan.rank_params == pytest.approx(plan.total_params / world, rel=0.01)
    assert plan.rank_experts > plan.rank_dense  # experts dominate gpt-oss
    assert plan.fits and plan.total_bytes < 80 * 2**30
    expected_total = {"gptoss_20b": 20.9e9, "gptoss_120b": 116.8e9}[name]
    assert plan.total_params == pytest.approx(expected_total, rel=0.01)
    lines = {line.label: line for line in plan.lines}
    # fp32 params + grads, AdamW 2 x fp32: 16 bytes per parameter in all
    assert lines["params"].bytes == 4 * plan.rank_params
    assert lines["optimizer"].bytes == 8 * plan.rank_params
    if "grad accum" not in lines:  # the sharded fp32 grads peak in backward
        assert lines["block backward"].bytes > 4 * plan.rank_params
        assert lines["reduce-scatter"].bytes > 4 * plan.rank_params
    # the transient peaks do not coincide: the largest one counts, not their sum
    peaks = [x.bytes for x in plan.lines if x.alternative]
    assert len(peaks) == 4
    assert plan.total_bytes == pytest.approx(
        sum(x.bytes for x in plan.lines if not x.alternative) + max(peaks))


def test_cli_subprocess_runs_the_120b_plan():
    proc = run_cli("--config", "configs/gptoss_120b.toml", "--world-size", "128")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "of 80 GiB per GPU: fits" in proc.stdout


# --------------------------------------------------------------------------- --check-only

@pytest.mark.parametrize("name", list(SHIPPED))
def test_check_only_accepts_shipped_configs_without_torch(name):
    world = SHIPPED[name]
    # In a fresh interpreter: the check must not import torch (it runs on login nodes).
    code = ("import sys; from runtime.plan import main; "
            f"rc = main(['--config', 'configs/{name}.toml', '--world-size', '{world}', "
            "'--check-only']); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"ok: configs/{name}.toml: mesh valid for {world} ranks")
    assert "ep=8" in last


def test_check_only_wrong_world_size_exits_2(capsys):
    # 20b wants dp 16 x local 2 to divide global batch 64: 24 ranks do not
    code, out, err = run_main(capsys, "--config", str(CONFIGS / "gptoss_20b.toml"),
                              "--world-size", "24", "--check-only")
    assert code == 2 and out == ""
    assert "training.global_batch_size" in error_line(err)


def test_check_only_cli_exit_codes():
    ok = run_cli("--config", "configs/gptoss_20b.toml", "--world-size", "16", "--check-only")
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("--config", "configs/gptoss_20b.toml", "--world-size", "16", "--check-only",
                  "--parallelism.tensor_parallel_degree=3")
    assert bad.returncode == 2
    assert "tensor_parallel_degree" in error_line(bad.stderr)


# --------------------------------------------------------------------------- bad meshes

BAD_MESHES = [
    # (world, overrides, key that must be named)
    (16, ["--parallelism.tensor_parallel_degree=3"], "tensor_parallel_degree"),
    (16, ["--parallelism.data_parallel_shard_degree=4"], "data_parallel_shard_degree"),
    (16, ["--parallelism.expert_parallel_degree=5"], "expert_parallel_degree"),
    (16, ["--parallelism.expert_parallel_degree=64"], "expert_parallel_degree"),
    (16, ["--parallelism.tensor_parallel_degree=2",
          "--parallelism.expert_tensor_parallel_degree=4"], "expert_tensor_parallel_degree"),
    (16, ["--parallelism.context_parallel_degree=0"], "context_parallel_degree"),
    (16, ["--parallelism.pipeline_parallel_degree=16", "--training.global_batch_size=-1",
          "--parallelism.expert_parallel_degree=1",
          "--model.n_layers=8"], "pipeline_parallel_degree"),
]


@pytest.mark.parametrize("world,overrides,key", BAD_MESHES)
@pytest.mark.parametrize("check_only", [True, False])
def test_bad_mesh_on_command_line_exits_2_naming_the_key(world, overrides, key, check_only, capsys):
    argv = ["--config", str(CONFIGS / "gptoss_20b.toml"), "--world-size", str(world), *overrides]
    code, out, err = run_main(capsys, *argv, *(["--check-only"] if check_only else []))
    assert code == 2, out + err
    assert out == ""  # refused before any plan is printed
    assert key in error_line(err)
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1  # one line


def test_unknown_override_and_bad_world_size_exit_2(capsys):
    code, _, err = run_main(capsys, "--config", str(CONFIGS / "gptoss_20b.toml"),
                            "--world-size", "16", "--parallelism.tensor_parallel=2")
    assert code == 2 and "parallelism.tensor_parallel_degree" in error_line(err)  # did you mean
    code, _, err = run_main(capsys, "--config", str(CONFIGS / "gptoss_20b.toml"),
                            "--world-size", "0", "--check-only")
    assert code == 2 and "world size" in error_line(err)


@pytest.mark.parametrize("argv, line", [
    # the key named once, with its section (was "parallelism.2 * context_parallel_degree")
    (["--parallelism.context_parallel_degree=2", "--parallelism.tensor_parallel_degree=2",
      "--training.seq_len=36"],
     "error: training.seq_len (36) must be divisible by 2 * parallelism.context_parallel_degree "
     "(2) * parallelism.tensor_parallel_degree (2) = 8 (head-tail context parallel, "
     "sequence parallel)"),
    (["--parallelism.tensor_parallel_degree=2", "--parallelism.expert_parallel_degree=2",
      "--parallelism.context_parallel_degree=2"],
     "error: parallelism.expert_parallel_degree (2) must be a multiple of "
     "parallelism.context_parallel_degree * parallelism.tensor_parallel_degree = 4"),
    # argparse's own errors were a usage block plus a line
    (["--world-size=x"], "error: command line: argument --world-size: invalid int value: 'x' "
                         "(see python -m runtime.plan --help)"),
])
def test_cli_bad_mesh_is_one_line_naming_the_keys(argv, line):
    world = [] if any(a.startswith("--world-size") for a in argv) else ["--world-size", "8"]
    for check_only in (["--check-only"], []):
        out = run_cli("--config", "configs/debugmodel.toml", *world, *argv, *check_only)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.splitlines() == [out.stderr.splitlines()[0]]  # one line, no traceback
        assert out.stderr.startswith(line), out.stderr


# --------------------------------------------------------------------------- memory

def test_over_memory_config_exits_1_with_the_reason(capsys):
    # 20b without activation checkpointing: 24 layers of routed-expert activations
    code, out, err = run_main(capsys, "--config", str(CONFIGS / "gptoss_20b.toml"),
                              "--world-size", "16", "--activation_checkpoint.mode=none")
    assert code == 1
    assert "DOES NOT FIT" in out
    line = error_line(err)
    assert line.startswith("error: does not fit:") and "> 80 GiB per GPU" in line
    assert "largest: activations" in line


def test_gpu_memory_flag_changes_the_verdict(capsys):
    argv = ["--config", str(CONFIGS / "gptoss_120b.toml"), "--world-size", "128"]
    code, _, err = run_main(capsys, *argv, "--gpu-memory-gib", "24")
    assert code == 1 and "> 24 GiB per GPU" in error_line(err)
    code, out, _ = run_main(capsys, *argv, "--gpu-memory-gib", "141")
    assert code == 0 and "of 141 GiB per GPU: fits" in out


def test_activation_checkpointing_reduces_the_estimate():
    cfg_none = load_config(str(CONFIGS / "gptoss_20b.toml"), ["--activation_checkpoint.mode=none"])
    acts = {}
    for mode, extra in (("none", []), ("full", ["--activation_checkpoint.mode=full"]),
                        ("op", ["--activation_checkpoint.mode=selective"]),
                        ("every2", ["--activation_checkpoint.mode=selective",
                                    "--activation_checkpoint.selective_ac_option=2"])):
        cfg = load_config(str(CONFIGS / "gptoss_20b.toml"), extra) if extra else cfg_none
        plan = plan_module.plan_job(cfg, 16)
        acts[mode] = next(x.bytes for x in plan.lines if x.label == "activations")
    assert acts["full"] < acts["op"] < acts["every2"] < acts["none"]


def test_tp_pp_cp_ep_plan_is_labelled_and_consistent(capsys):
    # 16 ranks = pp 2 x cp 2 x tp 2 x dp_shard 2; experts over ep 4 with etp 2
    overrides = ["--parallelism.tensor_parallel_degree=2",
                 "--parallelism.context_parallel_degree=2",
                 "--parallelism.pipeline_parallel_degree=2",
                 "--parallelism.expert_parallel_degree=4",
                 "--parallelism.expert_tensor_parallel_degree=2",
                 "--training.global_batch_size=-1"]
    cfg = load_config(str(CONFIGS / "gptoss_20b.toml"), overrides)
    plan = plan_module.plan_job(cfg, 16)
    # every parameter is split over dp_shard x cp x tp = 8 ranks, layers over pp 2
    assert plan.rank_params == pytest.approx(plan.total_params / 16, rel=0.02)
    code, out, _ = run_main(capsys, "--config", str(CONFIGS / "gptoss_20b.toml"),
                            "--world-size", "16", *overrides)
    assert code == 0, out
    assert "sharding: measured from the sharded parameters (rank 0)" in out
    # the trainer cuts the stages; the plan keeps the worst pipeline rank's layers
    assert "pipeline: 1F1B, stages cut as the trainer cuts them" in out
    assert "per rank [pipeline rank" in out


@pytest.mark.parametrize("etp", [1, 2])
def test_ep_over_tp_ranks_and_etp_shard_the_experts(etp, capsys):
    """120b on 128 = dp_shard 64 x tp 2. etp 1: EP 16 takes the TP ranks (dp_shard_in_ep 8 x
    tp 2), each EP rank holds E/16 whole experts; etp 2: EP 8 over dp_shard_in_ep 8, experts
    also split along F over tp (mlp2_bias replicated). Either way FSDP shards the EP rank's
    experts over dp_shard_mod_ep 8."""
    ep = 16 if etp == 1 else 8
    overrides = ["--parallelism.tensor_parallel_degree=2",
                 "--parallelism.data_parallel_shard_degree=64",
                 f"--parallelism.expert_parallel_degree={ep}",
                 f"--parallelism.expert_tensor_parallel_degree={etp}"]
    cfg = load_config(str(CONFIGS / "gptoss_120b.toml"), overrides)
    plan = plan_module.plan_job(cfg, 128)
    d, args = plan.dims, plan.model_args
    assert (d.dp_shard_in_ep, d.dp_shard_mod_ep, d.tp_in_ep) == (8, 8, 2 if etp == 1 else 1)
    E, F, D = args.num_experts, args.moe_inter_dim, args.dim
    experts_per_rank = E // (ep * d.dp_shard_mod_ep)  # 1 (etp 1) or 2 (etp 2): FSDP dim 0
    split_by_etp = 2 * F * D + 2 * F + D * F  # mlp1 weight + bias, mlp2 weight
    per_layer = experts_per_rank * (split_by_etp // etp + D)  # + mlp2_bias
    assert plan.rank_experts == args.n_layers * per_layer
    expert_total = args.n_layers * E * (split_by_etp + D)
    if etp == 1:  # every expert parameter split over all 128 ranks
        assert plan.rank_experts * 128 == expert_total
    else:  # mlp2_bias is split over ep x dp_shard_mod_ep = 64 ranks only
        assert plan.rank_experts * 128 == expert_total + args.n_layers * E * D
    local = plan.applied.local_numel
    assert local["layers.0.moe.experts.mlp1_weight"] == experts_per_rank * 2 * F * D // etp
    assert local["layers.0.moe.experts.mlp2_bias"] == experts_per_rank * D
    code, out, err = run_main(capsys, "--config", str(CONFIGS / "gptoss_120b.toml"),
                              "--world-size", "128", *overrides)
    assert code == 0, out + err
    assert "sharding: measured from the sharded parameters (rank 0)" in out
    ep_line = "dp_shard_in_ep x cp x tp" if etp == 1 else "dp_shard_in_ep x cp"
    assert re.search(rf"^  ep +{ep} = {ep_line}$", out, re.MULTILINE), out
    assert f"degrees      dp_replicate=1 dp_shard=64 cp=1 tp=2 pp=1 ep={ep} etp={etp}" in out


def test_measured_plan_for_pure_data_parallel(capsys):
    code, out, _ = run_main(capsys, "--config", str(CONFIGS / "debugmodel.toml"),
                            "--world-size", "4", "--parallelism.data_parallel_replicate_degree=2")
    assert code == 0, out
    assert "measured from the sharded parameters" in out
    assert "HSDP" in out and "dp_replicate 2 x dp_shard 2" in out


# --------------------------------------------------------------------------- LoRA

LORA = {"gptoss_20b_lora": 1, "gptoss_120b_lora": 8}


@pytest.mark.parametrize("name", list(LORA))
def test_lora_config_plans_frozen_base_and_adapters_within_70_gib(name):
    """The shipped LoRA configs fit in 70 GiB per GPU at their world size: the frozen base in
    bf16 without grads or optimizer state, the adapters (counted independently from the spec's
    layout) as fp32 masters with fp32 grads and AdamW's two fp32 states."""
    from runtime.model.lora_spec import adapter_shapes

    world = LORA[name]
    cfg = load_config(str(CONFIGS / f"{name}.toml"))
    plan = plan_module.plan_job(cfg, world)
    assert plan.total_bytes <= 70 * 2**30, plan_module.format_plan(plan, cfg)
    adapters = sum(math.prod(s) for s in adapter_shapes(cfg.model_args(), cfg.lora_spec()).values())
    assert plan.total_trainable == adapters
    assert plan.rank_trainable == pytest.approx(adapters / world, rel=0.01)
    frozen = plan.rank_params - plan.rank_trainable
    lines = {line.label: line.bytes for line in plan.lines}
    assert lines["params"] == 2 * frozen + 4 * plan.rank_trainable
    if "grads" in lines:  # no FSDP: plain .grad tensors, held through the step
        assert lines["grads"] == 4 * plan.rank_trainable
    else:  # FSDP, accumulating: every unit's unsharded fp32 grads, of the adapters only
        # (unsharded after FSDP's all-gather: EP keeps each rank's experts' adapters only)
        shapes = adapter_shapes(cfg.model_args(), cfg.lora_spec())
        ep = cfg.parallelism.expert_parallel_degree
        unsharded = sum(math.prod(s) / (ep if ".moe.experts." in n else 1)
                        for n, s in shapes.items())
        assert lines["grad accum"] == pytest.approx(4 * unsharded, rel=0.01)
    assert lines["optimizer"] == 8 * plan.rank_trainable
    if world == 1:  # negative control: the same job as a full fine-tune is 16 B/param, no fit
        full = plan_module.plan_job(load_config(str(CONFIGS / f"{name}.toml"),
                                                ["--lora.enable=false"]), world)
        full_lines = {line.label: line.bytes for line in full.lines}
        assert full_lines["params"] == 4 * full.rank_params and full.total_trainable == full.total_params
        assert not full.fits


# --------------------------------------------------------------------------- the trainer's check

HUGE = "--training.local_batch_size=100000"  # 25.6M tokens per micro-batch: TiBs of activations
ESTIMATE = re.compile(r"does not fit: ([0-9.]+) GiB per rank > ")


def _train(tmp_path: Path, name: str, *argv: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "runtime.train", "--config", str(CONFIGS / "debugmodel.toml"),
         f"--job.dump_folder={tmp_path / name}", "--training.device=cpu", *argv],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_batch_the_machine_cannot_hold_is_refused_before_the_model(tmp_path, capsys):
    # Refused (a process of its own: exit 2, one line, no model built); bypassed, it goes on
    # to the next check (a missing data file here, so nothing large is ever allocated).
    from runtime.train.trainer import main as train_main

    refused = _train(tmp_path, "refused", HUGE)
    missing = tmp_path / "missing.jsonl"
    assert train_main(["--config", str(CONFIGS / "debugmodel.toml"), "--training.device=cpu",
                       f"--job.dump_folder={tmp_path / 'bypassed'}", HUGE, "--skip-memory-check",
                       "--data.dataset=path", f"--data.dataset_path={missing}"]) == 2
    out, err = capsys.readouterr()
    assert "warning: memory check skipped (training.skip_memory_check): does not fit" in out, out
    assert err.splitlines() == [f"error: data.dataset_path: {missing} does not exist"], err

    out, err = refused.communicate(timeout=240)
    assert refused.returncode == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: memory check: does not fit: "), err
    for key in ("training.local_batch_size (100000)", "training.seq_len (256)",
                "activation_checkpoint.mode", "data_parallel_shard_degree",
                "--skip-memory-check", "MemAvailable"):
        assert key in err, key
    assert "model debugmodel" not in out and not (tmp_path / "refused" / ".lock").exists()
    trainer_estimate = float(ESTIMATE.search(err).group(1))

    # runtime.plan: the same estimate and verdict (exit 1: its "does not fit")
    code, _, err = run_main(capsys, "--config", str(CONFIGS / "debugmodel.toml"),
                            "--world-size", "1", "--training.device=cpu", HUGE)
    assert code == 1 and float(ESTIMATE.search(error_line(err)).group(1)) == trainer_estimate


def test_a_normal_batch_passes_the_check(capsys):
    # negative control for the test above: the shipped debug config, same machine and check
    from runtime.train.memory_plan import check_memory

    cfg = load_config(str(CONFIGS / "debugmodel.toml"), [])
    assert check_memory(cfg, 1, "cpu", None, 1) == (None, None)
    code, out, _ = run_main(capsys, "--config", str(CONFIGS / "debugmodel.toml"),
                            "--world-size", "1", "--training.device=cpu")
    assert code == 0 and "(MemAvailable in /proc/meminfo): fits" in out
    # and the flag's config key is a plain bool override
    assert load_config(None, ["--training.skip_memory_check=true"]).training.skip_memory_check


def test_two_real_ranks_after_the_check_save_every_shard(tmp_path):
    # The check runs the estimate's fake process group before the real one. In-process, torch
    # kept state from it that put rank 1's FSDP parameters on a mesh with rank 0's coordinate
    # (its checkpoint shards then claimed rank 0's offsets: half of every tensor was missing).
    # The estimate runs in a forked child with more than one rank; the saved step must hold
    # every element of every sharded tensor exactly once.
    import math

    from checkpoint_helpers import run_job_ranks
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from runtime.safe_dcp import read_metadata_file

    ranks = run_job_ranks(tmp_path, "--training.steps=1", "--checkpoint.interval=1",
                          "--checkpoint.enable=true")
    assert [code for code, _, _ in ranks] == [0, 0], ranks
    meta = read_metadata_file(tmp_path / "checkpoints" / "step-1" / ".metadata")
    sharded = 0
    for key, item in meta.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            stored = sum(math.prod(c.sizes) for c in item.chunks)
            assert stored == math.prod(item.size), (key, stored, tuple(item.size))
            sharded += len(item.chunks) > 1
    assert sharded > 10  # FSDP really split the parameters and their Adam state over 2 ranks
