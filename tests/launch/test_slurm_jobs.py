"""sbatch'd jobs on the local Slurm (2 nodes; the slurm_cluster fixture in conftest.py):
the launcher against a stand-in trainer and the real trainer (signal -> checkpoint -> requeue ->
resume), scancel, the refusals before srun, self-submission, a fresh clone, interactive.sh's
Ctrl-C, the prepare array. Run them under `flock /tmp/slurm-tests.lock` (one Slurm per machine)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import launch_helpers as lh
import pytest
from launch_helpers import (
    PLAN_PRESENT,
    REPO,
    TINY,
    assert_resumed,
    batch_log,
    exit_code,
    fake_job,
    interrupt_when,
    needs_plan,
    needs_trainer,
    sbatch,
)


@pytest.mark.slurm
def test_slurm_launcher_mechanics(slurm_cluster, tmp_path):
    """The launcher against a stand-in trainer (independent of the real one): 2 nodes, rank env,
    USR1 -> checkpoint -> exit 75 -> scontrol requeue -> resume; a bad mesh is refused (exit 2)."""
    root = lh.make_fake_checkout(tmp_path / "checkout")
    env = lh.python_env(CONFIG="configs/fake.toml", OMP_NUM_THREADS="1")
    dump = tmp_path / "dump"
    jid = sbatch(
        root / "slurm" / "debug.sbatch",
        "--training.steps=40",
        "--fake.step_s=0.1",
        f"--job.dump_folder={dump}",
        cwd=root,
        env=env,
    )
    interrupt_when(
        dump / "metrics.jsonl",
        5,
        jid,
        lambda: lh.run(["scancel", "--signal=USR1", jid], check=True),
        logs=root / "logs",
    )
    state = lh.wait_job(jid, 180)
    job_dir = root / "logs" / f"gptoss-debug-{jid}"
    log = lh.tail(root / "logs" / f"gptoss-debug-{jid}.out", 60) + "\n" + lh.dump_job_logs(job_dir)
    assert state == "COMPLETED", log
    assert lh.job_field(jid, "Restarts") == "1", log
    assert_resumed([r["step"] for r in lh.read_metrics(dump / "metrics.jsonl")], 40, log)
    assert {r["world"] for r in lh.read_metrics(dump / "metrics.jsonl")} == {2}
    rank0 = (job_dir / "rank-0.log").read_text()
    assert "rank 0/2" in rank0 and "resuming from step" in rank0
    assert "rank 1/2" in (job_dir / "rank-1.log").read_text()
    assert (
        "host node02" in (job_dir / "rank-1.log").read_text()
    )  # one task per node, really on node02
    attempts = (job_dir / "attempts.log").read_text()
    assert (
        "attempt 0 exit 75" in attempts
        and "attempt 0 requeue" in attempts
        and "attempt 1 exit 0" in attempts
    )
    assert (job_dir / "pids" / "rank-1").read_text().startswith("node02 ")

    # a mesh that does not fit: refused before srun, exit 2, no requeue
    jid = sbatch(root / "slurm" / "debug.sbatch", "--fake.world=3", cwd=root, env=env)
    state = lh.wait_job(jid, 60, release_requeued=False)
    out = lh.tail(root / "logs" / f"gptoss-debug-{jid}.out")
    assert state == "FAILED" and exit_code(jid) == "2:0", out
    assert (
        "mesh check failed: configs/fake.toml for this job's 2 ranks" in out
        and "mesh needs 3 ranks" in out
    ), out
    assert not (root / "logs" / f"gptoss-debug-{jid}" / "rank-0.log").exists()

    # a crashing trainer: the job fails with its exit code and is not requeued
    jid = sbatch(root / "slurm" / "debug.sbatch", "--fake.step_s=oops", cwd=root, env=env)
    state = lh.wait_job(jid, 60, release_requeued=False)
    out = lh.tail(root / "logs" / f"gptoss-debug-{jid}.out")
    assert state == "FAILED" and exit_code(jid) == "1:0", out
    assert lh.job_field(jid, "Restarts") == "0" and "failed with exit 1" in out, out


@pytest.mark.slurm
@needs_trainer
def test_slurm_debug_sbatch_end_to_end(slurm_cluster, tmp_path):
    """sbatch slurm/debug.sbatch: the real trainer on 2 nodes (gloo); interrupted with USR1,
    it checkpoints, requeues and resumes from the saved step; loss falls; checkpoints written."""
    dump = tmp_path / "dump"
    (tmp_path / "logs").mkdir()  # sbatch does not create the --output folder
    env = lh.python_env(LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1")
    if not PLAN_PRESENT:
        env["SKIP_MESH_CHECK"] = "1"
    total = 60
    jid = sbatch(
        REPO / "slurm" / "debug.sbatch",
        *TINY,
        f"--training.steps={total}",
        "--checkpoint.interval=30",
        f"--job.dump_folder={dump}",
        cwd=REPO,
        env=env,
        sbatch_opts=[f"--output={tmp_path}/logs/%x-%j.out"],
    )
    seen = interrupt_when(
        dump / "metrics.jsonl",
        5,
        jid,
        lambda: lh.run(["scancel", "--signal=USR1", jid], check=True),
        timeout=180,
        logs=tmp_path / "logs",
    )
    state = lh.wait_job(jid, 240)
    job_dir = tmp_path / "logs" / f"gptoss-debug-{jid}"
    log = (
        lh.tail(tmp_path / "logs" / f"gptoss-debug-{jid}.out", 60)
        + "\n"
        + lh.dump_job_logs(job_dir)
    )
    assert state == "COMPLETED", log
    assert lh.job_field(jid, "Restarts") == "1", log
    rows = lh.read_metrics(dump / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert_resumed(steps, total, log)
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu", "memory_gib"):
        assert key in rows[-1], key
    losses = [r["loss"] for r in rows]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"loss did not fall: {losses}"
    ckpt = dump / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step-{total}", log
    assert (ckpt / f"step-{total}").is_dir()
    # the interrupt saved a checkpoint between the periodic ones, and the second attempt
    # continued from it (its first step is the saved step + 1, not 1)
    attempts = (job_dir / "attempts.log").read_text()
    assert "attempt 0 exit 75" in attempts and "attempt 1 exit 0" in attempts, attempts
    assert seen < total


@pytest.mark.slurm
@needs_trainer
@needs_plan
def test_slurm_debug_sbatch_refuses_bad_mesh(slurm_cluster, tmp_path):
    (tmp_path / "logs").mkdir()
    env = lh.python_env(LOG_DIR=str(tmp_path / "logs"))
    jid = sbatch(
        REPO / "slurm" / "debug.sbatch",
        "--parallelism.data_parallel_shard_degree=4",
        f"--job.dump_folder={tmp_path / 'dump'}",
        cwd=REPO,
        env=env,
        sbatch_opts=[f"--output={tmp_path}/logs/%x-%j.out"],
    )
    state = lh.wait_job(jid, 90, release_requeued=False)
    out = lh.tail(tmp_path / "logs" / f"gptoss-debug-{jid}.out")
    assert state == "FAILED" and exit_code(jid) == "2:0", out
    assert "mesh check failed: configs/debugmodel.toml for this job's 2 ranks" in out, out
    assert not (tmp_path / "dump").exists()


@pytest.mark.slurm
@needs_trainer
def test_slurm_scancel_ends_the_job_and_usr1_without_checkpoints_is_not_requeued(
    slurm_cluster, tmp_path
):
    """Item 1: scancel -> every rank saves and exits 143 -> the job ends, never requeued.
    Item 2: the time-limit signal on a run without checkpoints -> exit 138, not requeued (a
    requeued leg would start again at step 0)."""
    (tmp_path / "logs").mkdir()
    env = lh.python_env(LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1")
    jobs = {}
    for name, extra in [("cancel", "--checkpoint.enable=true"), ("nockpt", "--checkpoint.enable=false")]:
        jobs[name] = sbatch(
            REPO / "slurm" / "debug.sbatch", *TINY, "--training.steps=100000",
            "--checkpoint.interval=100000", extra, f"--job.dump_folder={tmp_path / name}",
            cwd=REPO, env=env, sbatch_opts=[f"--output={tmp_path}/logs/%x-%j.out"],
        )
    interrupt_when(tmp_path / "cancel" / "metrics.jsonl", 3, jobs["cancel"],
                   lambda: lh.run(["scancel", jobs["cancel"]], check=True), timeout=240,
                   logs=tmp_path / "logs")
    interrupt_when(tmp_path / "nockpt" / "metrics.jsonl", 3, jobs["nockpt"],
                   lambda: lh.run(["scancel", "--signal=USR1", jobs["nockpt"]], check=True),
                   timeout=240, logs=tmp_path / "logs")
    states = {name: lh.wait_job(jid, 120, release_requeued=False) for name, jid in jobs.items()}
    time.sleep(5)  # a requeue would show up as PENDING / Restarts=1 by now
    logs = {name: lh.dump_job_logs(tmp_path / "logs") for name in jobs}
    assert states["cancel"] == "CANCELLED" and lh.job_state(jobs["cancel"]) == "CANCELLED", logs["cancel"]
    assert lh.job_field(jobs["cancel"], "Restarts") == "0", logs["cancel"]
    rank0 = (tmp_path / "logs" / f"gptoss-debug-{jobs['cancel']}" / "rank-0.log").read_text()
    last = lh.read_metrics(tmp_path / "cancel" / "metrics.jsonl")[-1]["step"]
    assert f"SIGTERM: stopped after step {last}, checkpoint saved; exit 143" in rank0, rank0
    latest = tmp_path / "cancel" / "checkpoints" / "latest"
    assert latest.read_text().strip() == f"step-{last}", rank0
    assert states["nockpt"] == "FAILED" and exit_code(jobs["nockpt"]) == "138:0", logs["nockpt"]
    assert lh.job_field(jobs["nockpt"], "Restarts") == "0", logs["nockpt"]
    out = lh.tail(tmp_path / "logs" / f"gptoss-debug-{jobs['nockpt']}.out")
    assert "ranks stopped on SIGUSR1 (exit 138): not requeueing" in out, out
    assert not (tmp_path / "nockpt" / "checkpoints").exists()


@pytest.mark.slurm
def test_slurm_refusals_before_srun(slurm_cluster, tmp_path):
    """Each refused in the job, before any rank starts, with exit 2 and one line:
    item 2: --time not longer than the --signal lead; item 4: a rank does not fit the GPUs'
    memory; item 7: an sbatch option after the script, an unknown config key."""
    root, env = fake_job(tmp_path)
    script = root / "slurm" / "debug.sbatch"
    cases = {
        "time": (sbatch(script, cwd=root, env=env, sbatch_opts=["--time=1"]),
                 "time limit 00:01:00 (60 s) is not longer than the time-limit signal's lead "
                 "(--signal=...@60"),
        "memory": (sbatch(script, "--fake.gib=100", cwd=root, env=dict(env, GPU_MEMORY_GIB="80")),
                   "memory check failed: configs/fake.toml on this job's 2 ranks"),
        "option": (sbatch(script, "--training.steps=3", "--hold", cwd=root, env=env),
                   "'--hold' is not a config override"),
        "key": (sbatch(script, "--fake.bad_key=3", cwd=root, env=env),
                "config error in configs/fake.toml or the overrides: error: command line: "
                "unknown key '--fake.bad_key'"),
    }
    for name, (jid, message) in cases.items():
        state = lh.wait_job(jid, 90, release_requeued=False)
        out = lh.tail(root / "logs" / f"gptoss-debug-{jid}.out")
        assert state == "FAILED" and exit_code(jid) == "2:0", (name, out)
        assert message in out, (name, out)
        assert "mesh check failed" not in out and "launch: srun" not in out, (name, out)
        assert lh.job_field(jid, "Restarts") == "0", (name, out)
    out = lh.tail(root / "logs" / f"gptoss-debug-{cases['memory'][0]}.out")
    assert "does not fit: 100.0 GiB per rank > 80 GiB per GPU" in out, out
    # the same job with enough memory per GPU runs
    jid = sbatch(script, "--fake.gib=100", "--training.steps=3", "--fake.step_s=0.05", cwd=root,
                 env=dict(env, GPU_MEMORY_GIB="141"))
    assert lh.wait_job(jid, 90, release_requeued=False) == "COMPLETED", batch_log(root, jid)
    assert "mesh and memory check ok" in batch_log(root, jid)


@pytest.mark.slurm
def test_slurm_self_submit_options_reach_sbatch(slurm_cluster, tmp_path):
    """Item 7: `bash slurm/debug.sbatch --hold ...` holds the job (sbatch got --hold) and the
    trainer never sees it."""
    root, env = fake_job(tmp_path)
    out = subprocess.run(
        ["bash", "slurm/debug.sbatch", "--hold", "--parsable", "--training.steps=3"],
        cwd=root, env={k: v for k, v in env.items() if k != "SLURM_JOB_ID"},
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    jid = out.stdout.strip().split(";")[0]
    try:
        assert lh.job_state(jid) == "PENDING" and lh.job_field(jid, "Reason") == "JobHeldUser"
        assert lh.job_field(jid, "Restarts") == "0"
    finally:
        lh.run(["scancel", jid])


@pytest.mark.slurm
@needs_trainer
def test_slurm_fresh_clone_sbatch(slurm_cluster, tmp_path):
    """Item 3: the tracked files only (as `git clone` gives them, no logs/ made by hand):
    `sbatch slurm/debug.sbatch` runs the real trainer, checked by the real plan, and logs."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    for name in filter(None, files.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    assert (clone / "logs").is_dir(), "logs/ must be tracked (logs/.gitignore)"
    assert not list((clone / "logs").glob("*.out"))
    env = lh.python_env(OMP_NUM_THREADS="1")
    env.pop("LOG_DIR", None)
    env["PYTHONPATH"] = ""  # the job must import the clone's runtime (common.sh adds it)
    jid = sbatch(clone / "slurm" / "debug.sbatch", *TINY, "--training.steps=4",
                 f"--job.dump_folder={tmp_path / 'dump'}", cwd=clone, env=env)
    state = lh.wait_job(jid, 240, release_requeued=False)
    out = clone / "logs" / f"gptoss-debug-{jid}.out"
    log = lh.tail(out, 60) + "\n" + lh.dump_job_logs(clone / "logs" / f"gptoss-debug-{jid}")
    assert state == "COMPLETED", log
    assert "mesh and memory check ok" in log and "training finished (exit 0)" in log, log
    assert [r["step"] for r in lh.read_metrics(tmp_path / "dump" / "metrics.jsonl")][-1] == 4


@pytest.mark.slurm
@needs_trainer
def test_slurm_interactive_ctrl_c_saves_and_stops(slurm_cluster, tmp_path):
    """Issue 13 item 10 on the interactive path: Ctrl-C on `bash slurm/interactive.sh` in an
    allocation reaches every rank as SIGINT: they finish the step, save and exit 130."""
    import signal as sig

    out = lh.run(["salloc", "--no-shell", "-N", "2", "--ntasks-per-node=1", "--time=10",
                  "-J", "gptoss-interactive"], timeout=60)
    m = re.search(r"Granted job allocation (\d+)", out.stderr)
    assert m, out.stderr
    jid = m.group(1)
    dump = tmp_path / "dump"
    env = lh.python_env(
        OMP_NUM_THREADS="1", LOG_DIR=str(tmp_path / "logs"), RANK_LOGS="1", SLURM_JOB_ID=jid,
        SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST=lh.job_field(jid, "NodeList"), SLURM_JOB_NAME="interactive",
    )
    proc = subprocess.Popen(
        ["bash", "slurm/interactive.sh", "configs/debugmodel.toml", *TINY,
         "--training.steps=100000", "--checkpoint.enable=true", "--checkpoint.interval=100000",
         f"--job.dump_folder={dump}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lh.wait_for(lambda: len(lh.read_metrics(dump / "metrics.jsonl")) >= 3 or proc.poll() is not None,
                    240, "3 logged steps")
        proc.send_signal(sig.SIGINT)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        lh.run(["scancel", jid])
    log = text + "\n" + lh.dump_job_logs(tmp_path / "logs")
    assert proc.returncode == 130, log
    assert "ranks stopped on SIGINT (exit 130)" in text, log
    last = lh.read_metrics(dump / "metrics.jsonl")[-1]["step"]
    rank_logs = [(tmp_path / "logs" / f"interactive-{jid}" / f"rank-{r}.log").read_text()
                 for r in (0, 1)]
    assert all("Ctrl-C: finishing this step, saving" in text for text in rank_logs), rank_logs
    assert f"SIGINT: stopped after step {last}, checkpoint saved; exit 130" in rank_logs[0], log
    assert (dump / "checkpoints" / "latest").read_text().strip() == f"step-{last}", log


@pytest.mark.slurm
def test_slurm_prepare_array_then_finalize(slurm_cluster, tmp_path):
    """bash slurm/prepare.sbatch: a 3-task array (one task per node: 8 CPUs each) writes the
    parts, the dependent job publishes them: the same bytes as one process here."""
    from runtime.data import FileSource, TextEncoder, Tokenizer
    from runtime.data.preparing import prepare

    data = tmp_path / "in"
    data.mkdir()
    for i in range(4):
        (data / f"d{i}.jsonl").write_text("".join(
            f'{{"text": "document {j} of file {i}: {"word " * (j % 13)}"}}\n' for j in range(60)))
    out = tmp_path / "prep"
    env = lh.python_env(OMP_NUM_THREADS="1")
    args = ["--out", str(out), "--workers", "2", "--part-mb", "0.002", "--data.dataset=path",
            f"--data.dataset_path={data}/*.jsonl"]
    submitted = lh.run(["bash", str(REPO / "slurm" / "prepare.sbatch"), "--array=0-2",
                        "--cpus-per-task=8", f"--output={tmp_path}/logs/%x-%A_%a.out", "--",
                        *args], cwd=tmp_path, env=env, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    m = re.search(r"array job (\d+) and finalize job (\d+)", submitted.stdout)
    assert m, submitted.stdout
    array, final = m.groups()
    state = lh.wait_job(final, 300, release_requeued=False)
    logs = "\n".join(lh.tail(p) for p in sorted((tmp_path / "logs").glob("*.out")))
    assert state == "COMPLETED", logs
    assert {lh.job_state(f"{array}_{i}") for i in range(3)} == {"COMPLETED"}, logs
    hosts = {re.search(r"on (node\d+)", lh.tail(p)).group(1)
             for p in (tmp_path / "logs").glob(f"*-{array}_*.out")}
    assert hosts == {"node01", "node02"}, logs  # the array really ran on both nodes
    assert "resuming" not in logs and "prepared 240 documents" in logs, logs
    tok = Tokenizer.load()
    files = sorted(data.glob("*.jsonl"))
    prepare(FileSource(files), TextEncoder(tok), tmp_path / "ref", tok,
            part_bytes=int(0.002 * (1 << 20)))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()}
