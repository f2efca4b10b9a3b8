"""runtime/train/slurm_env.py: Slurm's node lists and step variables -> torch.distributed's
RANK/WORLD_SIZE/MASTER_*, the job's master port (and slurm/common.sh's copy of its rule)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from launch_helpers import REPO

from runtime.train.slurm_env import (
    EXIT_CONFIG_ERROR,
    EXIT_REQUEUE,
    first_host,
    master_port_for_job,
    parse_nodelist,
    parse_tasks_per_node,
    setup_distributed_env,
)


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-04,07],gpu5", ["node01", "node02", "node03", "node04", "node07", "gpu5"]),
        ("a,b,c", ["a", "b", "c"]),
        ("gpu-[8-10]", ["gpu-8", "gpu-9", "gpu-10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("h100-st-p5-[1-2],cpu[3]", ["h100-st-p5-1", "h100-st-p5-2", "cpu3"]),
        ("node[1,3-4]x", ["node1x", "node3x", "node4x"]),
    ],
)
def test_parse_nodelist(text, hosts):
    assert parse_nodelist(text) == hosts
    assert first_host(text) == hosts[0]


@pytest.mark.parametrize(
    "bad", ["", "node[01-", "node01]", "node[a-b]", "node[3-1]", "a,,b", "n[[1]]"]
)
def test_parse_nodelist_errors(bad):
    with pytest.raises(ValueError):
        parse_nodelist(bad)


def test_parse_tasks_per_node_and_port():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        parse_tasks_per_node("2(x)")
    assert master_port_for_job(123) == master_port_for_job("123") == 20123
    assert master_port_for_job("4567_3") == master_port_for_job(45673)  # array ids
    assert all(20000 <= master_port_for_job(j) < 32768 for j in (0, 1, 12767, 12768, 987654321))
    assert EXIT_REQUEUE == 75 and EXIT_CONFIG_ERROR == 2


def slurm_step_env(**extra):
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
        "SLURM_STEP_NODELIST": "gpu[07-08,11-12]",
        "SLURM_JOB_NODELIST": "gpu[07-08,11-12]",
    }
    env.update(extra)
    return env


def test_setup_distributed_env_from_slurm_step():
    env = slurm_step_env()
    d = setup_distributed_env(env)
    assert d.source == "slurm" and d.distributed
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank) == (5, 8, 1, 2, 2)
    assert d.master_addr == "gpu07" and d.master_port == 20000 + 4242
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"
    assert env["LOCAL_WORLD_SIZE"] == "2" and env["GROUP_RANK"] == "2"
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == "24242"
    assert set(d.changed) == {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    }
    assert "rank 5/8" in d.describe()


def test_setup_distributed_env_keeps_explicit_master():
    env = slurm_step_env(MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    d = setup_distributed_env(env)
    assert (d.master_addr, d.master_port) == ("10.0.0.1", 29500)
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"
    assert "MASTER_ADDR" not in d.changed and "MASTER_PORT" not in d.changed


def test_setup_distributed_env_uneven_tasks_per_node():
    env = slurm_step_env(
        SLURM_PROCID="6",
        SLURM_NODEID="2",
        SLURM_LOCALID="0",
        SLURM_STEP_NUM_TASKS="7",
        SLURM_STEP_TASKS_PER_NODE="3(x2),1",
    )
    d = setup_distributed_env(env)
    assert (d.rank, d.world_size, d.local_world_size) == (6, 7, 1)


def test_setup_distributed_env_preset_is_untouched():
    env = slurm_step_env(
        RANK="3",
        WORLD_SIZE="16",
        LOCAL_RANK="3",
        LOCAL_WORLD_SIZE="8",
        MASTER_ADDR="h",
        MASTER_PORT="1234",
    )
    before = dict(env)
    d = setup_distributed_env(env)
    assert env == before
    assert d.source == "preset" and (d.rank, d.world_size, d.local_rank) == (3, 16, 3)
    assert d.changed == ()


def test_setup_distributed_env_batch_shell_and_no_slurm():
    # the batch script itself (no step): SLURM_NTASKS counts the job's tasks, not processes
    batch = {
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "16",
        "SLURM_JOB_NODELIST": "n[1-2]",
    }
    before = dict(batch)
    d = setup_distributed_env(batch)
    assert d.source == "single" and not d.distributed and batch == before
    d = setup_distributed_env({})
    assert d.source == "single" and d.world_size == 1


def test_setup_distributed_env_bad_values():
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        setup_distributed_env(slurm_step_env(SLURM_PROCID="x"))
    with pytest.raises(ValueError, match="outside"):
        setup_distributed_env(slurm_step_env(SLURM_PROCID="8"))


def test_slurm_env_cli():
    out = subprocess.run(
        [sys.executable, "-m", "runtime.train.slurm_env", "first-host", "node[03-04],x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip() == "node03"


def test_master_port_below_ephemeral_range_and_shell_agrees():
    from runtime.train import slurm_env

    top = slurm_env.MASTER_PORT_BASE + slurm_env.MASTER_PORT_SPAN
    assert top <= 32768  # Linux ip_local_port_range starts at 32768
    shell = (REPO / "slurm" / "common.sh").read_text()
    assert (
        f"$(({slurm_env.MASTER_PORT_BASE} + SLURM_JOB_ID % {slurm_env.MASTER_PORT_SPAN}))" in shell
    )
    ports = {master_port_for_job(j) for j in range(0, 200000, 1)}
    assert min(ports) == 20000 and max(ports) == 32767
