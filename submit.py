#!/usr/bin/env python3
"""submit.py - launch a gptoss-runtime training job on Slurm through submitit.

    python submit.py --nodes 16 --config configs/gptoss_120b.toml [--section.key=value ...]
    python submit.py --nodes 2 --cpu-ranks-per-node 1 --config configs/debugmodel.toml --wait
    python submit.py --local --cpu-ranks-per-node 2 --config configs/debugmodel.toml
    python submit.py --dry-run --nodes 4 --config configs/gptoss_20b.toml  # print only

One task per GPU (``nodes x gpus_per_node`` ranks; ``--cpu-ranks-per-node`` for CPU/gloo runs):
each task runs :class:`GptOssTrain`, which exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
MASTER_PORT (submitit's TorchDistributedEnvironment) and calls ``runtime.train.trainer.main``.
Before anything is submitted, ``python -m runtime.plan`` checks the config (an unknown key is a
config error), that its parallelism mesh fits the requested world size and that every rank fits
the GPUs' memory (``--gpu-memory-gib``: default from a GPU name in --partition/--constraint,
else 80; ``--skip-memory-check``); a job that cannot run is refused (exit 2).

Signals (the trainer's contract, runtime/train/faults.py): submitit's time-limit signal
(SIGUSR2, ``--signal-delay-s`` before the limit) is forwarded to the trainer as SIGUSR1: it
finishes the step, saves a checkpoint and returns 75; rank 0 then lets submitit requeue the job
(``checkpoint()`` -> ``scontrol requeue``) and the requeued job resumes from the latest
checkpoint in ``job.dump_folder``. ``scancel`` (SIGTERM) saves and ends the job for good: no
requeue. A run without checkpoints (checkpoint.enable = false) is not requeued either.

Overrides (``--section.key=value``, ``--section.key value``, bare ``--section.flag``) are
passed to the trainer untouched. Exit codes: 0 submitted (with --wait: the job succeeded),
1 the job failed, 2 refused (bad arguments, a config error, the mesh or memory does not fit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runtime.errors import EXIT_CONFIG_ERROR, EXIT_REQUEUE

REPO = Path(__file__).resolve().parent
EXIT_REFUSED = EXIT_CONFIG_ERROR  # bad arguments, or the mesh does not fit: nothing submitted
# the trainer's clean stops without a requeue: 128 + the signal (runtime/train/faults.py)
EXIT_SIGNAL_STOPS = {130: "SIGINT", 138: "SIGUSR1", 143: "SIGTERM"}

_OVERRIDE_KEY = re.compile(r"^--[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)+$")


# --------------------------------------------------------------------------- the job
def _export_dist_env(job_env: Any, local: bool) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for init_process_group(env://), through submitit's
    TorchDistributedEnvironment. Its MASTER_PORT default is random in 20000-60000 (partly the
    ephemeral range), so ours is set first: below 32768, derived from the job id."""
    from submitit.helpers import TorchDistributedEnvironment

    from runtime.train.slurm_env import master_port_for_job

    os.environ.setdefault("MASTER_PORT", str(master_port_for_job(job_env.job_id)))
    # every rank sees all of the node's GPUs and takes cuda:LOCAL_RANK (as under srun/torchrun)
    dist_env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if local:  # one machine: no need to resolve its host name
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["GROUP_RANK"] = str(job_env.node)
    return {
        "RANK": str(dist_env.rank),
        "WORLD_SIZE": str(dist_env.world_size),
        "LOCAL_RANK": str(dist_env.local_rank),
    }


def _forward_to_trainer(signum: int, frame: Any) -> None:
    """submitit's preemption/timeout signal -> the trainer's graceful stop (SIGUSR1)."""
    print(
        f"[submit] got {signal.Signals(signum).name}: asking the trainer to checkpoint and stop",
        file=sys.stderr,
        flush=True,
    )
    handler = signal.getsignal(signal.SIGUSR1)
    if callable(handler):
        handler(signal.SIGUSR1, frame)
    else:  # the trainer has not installed its handler yet: SIGTERM is its other stop signal
        term = signal.getsignal(signal.SIGTERM)
        if callable(term) and getattr(term, "__name__", "") != "bypass":
            term(signal.SIGTERM, frame)
        else:
            print(
                "[submit] trainer not started yet: the signal is dropped",
                file=sys.stderr,
                flush=True,
            )


try:  # submitit is needed to submit, not to print --help or run --dry-run
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - exercised only without submitit

    class _Checkpointable:  # type: ignore[no-redef]
        pass


class GptOssTrain(_Checkpointable):
    """The submitit callable: one instance per rank (task). Checkpointable, so submitit
    requeues it on preemption/timeout; since the trainer resumes from the latest checkpoint in
    job.dump_folder, re-running the same call continues the run."""

    def __init__(
        self,
        repo: str,
        config: str,
        overrides: list[str],
        env: dict[str, str],
        env_defaults: dict[str, str] | None = None,
    ):
        self.repo = repo
        self.config = config
        self.overrides = list(overrides)
        self.env = dict(env)  # --env KEY=VALUE: set on every rank
        # used where the job's environment (exported from the submitting shell) has no value
        self.env_defaults = dict(env_defaults or {})

    def argv(self) -> list[str]:
        return ["--config", self.config, *self.overrides]

    def __call__(self) -> dict[str, Any]:
        import submitit

        os.chdir(self.repo)
        if self.repo not in sys.path:
            sys.path.insert(0, self.repo)
        for key, value in self.env_defaults.items():
            os.environ.setdefault(key, value)
        os.environ.update(self.env)
        job_env = submitit.JobEnvironment()
        local = job_env.cluster == "local"
        dist = _export_dist_env(job_env, local)
        print(
            f"[submit] job {job_env.job_id} rank {dist['RANK']}/{dist['WORLD_SIZE']} "
            f"local {dist['LOCAL_RANK']} on {job_env.hostname}, master "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, restart "
            f"{os.environ.get('SLURM_RESTART_COUNT', '0')}",
            flush=True,
        )

        usr_sig = job_env._usr_sig()
        submitit_handler = signal.getsignal(usr_sig)
        saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
        signal.signal(usr_sig, _forward_to_trainer)
        try:
            from runtime.train.trainer import main as trainer_main

            rc = trainer_main(self.argv())
        finally:
            signal.signal(usr_sig, submitit_handler)
            for s, h in saved.items():
                if h is not None:
                    signal.signal(s, h)
        rc = 0 if rc is None else int(rc)
        result = {
            "exit_code": rc,
            "rank": int(dist["RANK"]),
            "world_size": int(dist["WORLD_SIZE"]),
            "job_id": str(job_env.job_id),
        }
        if rc == 0:
            return result
        if rc in EXIT_SIGNAL_STOPS:  # scancel (SIGTERM), Ctrl-C, or nothing to resume from
            result["stopped_on"] = EXIT_SIGNAL_STOPS[rc]
            print(
                f"[submit] trainer stopped on {EXIT_SIGNAL_STOPS[rc]} (exit {rc}): not requeueing",
                flush=True,
            )
            return result
        if rc == EXIT_REQUEUE:
            print(f"[submit] trainer checkpointed and exited {rc}: requeueing", flush=True)
            if callable(submitit_handler) and int(dist["RANK"]) == 0:
                # submitit's own path: checkpoint() (= same callable) is dumped, the job is
                # requeued (`scontrol requeue`; locally: the controller restarts the tasks) and
                # the process exits without writing a result.
                try:
                    submitit_handler(usr_sig, None)
                except subprocess.CalledProcessError as e:  # e.g. Slurm is already requeueing it
                    print(
                        f"[submit] requeue failed ({e}); leaving it to Slurm",
                        file=sys.stderr,
                        flush=True,
                    )
            # other ranks: leave without a result; the requeue ends this run
            sys.exit(EXIT_REQUEUE)
        raise RuntimeError(f"trainer exited with code {rc} (2 = config error); see this rank's log")


# --------------------------------------------------------------------------- arguments
def _split_overrides(rest: list[str]) -> list[str]:
    """Validate the pass-through `--section.key[=value]` tokens (order kept)."""
    out: list[str] = []
    expect_value = False
    for tok in rest:
        if tok.startswith("--"):
            key = tok.split("=", 1)[0]
            if not _OVERRIDE_KEY.match(key):
                raise SystemExit(
                    f"submit.py: unknown option {tok!r} (config overrides look like "
                    f"--section.key=value; see --help)"
                )
            expect_value = "=" not in tok
        elif not expect_value:
            raise SystemExit(f"submit.py: unexpected argument {tok!r}")
        else:
            expect_value = False
        out.append(tok)
    return out


def parse_time_minutes(text: str) -> int:
    """Slurm time forms -> minutes: 90, 1:30:00, 2-00:00:00, 0-12, 45:00 (MM:SS)."""
    text = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad --time {text!r} (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    days_i = int(days or 0)
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = int(a), int(b or 0), int(c or 0)
    elif c is not None:  # HH:MM:SS
        h, mi, s = int(a), int(b), int(c)
    elif b is not None:  # MM:SS
        h, mi, s = 0, int(a), int(b)
    else:  # minutes
        h, mi, s = 0, int(a), 0
    total = days_i * 1440 + h * 60 + mi + (1 if s else 0)
    if total <= 0:
        raise argparse.ArgumentTypeError(f"--time {text!r} must be positive")
    return total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="submit.py",
        allow_abbrev=False,
        description="Submit a gptoss-runtime training job to Slurm (submitit). Unknown "
        "--section.key=value options are passed to the trainer as config overrides.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python submit.py --nodes 16 --config configs/gptoss_120b.toml --partition gpu\n"
        "  python submit.py --nodes 2 --cpu-ranks-per-node 1 --config configs/debugmodel.toml \\\n"
        "      --wait\n"
        "  python submit.py --dry-run --nodes 2 --config configs/gptoss_20b.toml \\\n"
        "      --training.steps=10",
    )
    p.add_argument("--config", required=True, help="TOML config (a path)")
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8, help="one rank per GPU (default 8)")
    g.add_argument(
        "--cpu-ranks-per-node",
        type=int,
        default=None,
        help="CPU run (gloo): this many ranks per node and no GPUs requested",
    )
    g.add_argument(
        "--cpus-per-task", type=int, default=None, help="CPUs per rank (OMP_NUM_THREADS)"
    )
    g.add_argument("--mem", default=None, help="sbatch --mem, e.g. 0 (all of the node) or 200G")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--exclude", help="nodes to avoid")
    g.add_argument("--exclusive", action="store_true", help="whole nodes")
    g.add_argument(
        "--time",
        type=parse_time_minutes,
        default=parse_time_minutes("04:00:00"),
        help="time limit: minutes, HH:MM:SS or D-HH:MM:SS (default 04:00:00)",
    )
    g.add_argument("--job-name", default=None, help="default: gptoss-<config name>")
    g.add_argument(
        "--dependency",
        default=None,
        help="sbatch --dependency, e.g. singleton (one job of this name at a time)",
    )
    g = p.add_argument_group("container")
    g.add_argument(
        "--container-image",
        default=None,
        help="pyxis image (registry#image:tag or .sqsh) or an Apptainer .sif; the "
        "checkout and the log folder are mounted at their own paths",
    )
    g.add_argument("--container-mounts", default=None, help="extra SRC:DST[,SRC:DST...]")
    g.add_argument("--container-python", default="python", help="python inside the image")
    g = p.add_argument_group("submission")
    g.add_argument(
        "--folder",
        default="logs/submitit/%j",
        help="submitit folder (logs, pickles); %%j = job id (default logs/submitit/%%j)",
    )
    g.add_argument(
        "--signal-delay-s",
        type=int,
        default=180,
        help="seconds before the time limit at which ranks are told to checkpoint",
    )
    g.add_argument(
        "--max-timeouts",
        type=int,
        default=20,
        help="requeues after time-outs before giving up (preemptions do not count)",
    )
    g.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the ranks (repeatable)",
    )
    g.add_argument("--python", default=None, help="python on the nodes (default: this one)")
    g.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=None,
        metavar="G",
        help="memory per GPU for the memory check (default: from a GPU name such as h100/h200/"
        "b200 in --partition or --constraint, else 80)",
    )
    g.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="check the config and mesh, not the memory per rank",
    )
    g.add_argument(
        "--skip-mesh-check",
        action="store_true",
        help="do not run `python -m runtime.plan` (config, mesh, memory) before submitting",
    )
    g = p.add_argument_group("mode")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the sbatch script and parameters, submit nothing",
    )
    g.add_argument(
        "--local",
        action="store_true",
        help="run on this machine with submitit's local executor (nodes x ranks tasks)",
    )
    g.add_argument("--wait", action="store_true", help="follow rank 0's log until the job ends")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = _split_overrides(rest)
    if args.nodes < 1:
        parser.error("--nodes must be >= 1")
    if args.cpu_ranks_per_node is not None and args.cpu_ranks_per_node < 1:
        parser.error("--cpu-ranks-per-node must be >= 1")
    if args.cpu_ranks_per_node is None and args.gpus_per_node < 1:
        parser.error("--gpus-per-node must be >= 1 (or use --cpu-ranks-per-node for a CPU run)")
    if args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0:
        parser.error("--gpu-memory-gib must be > 0")
    for item in args.env:
        if "=" not in item:
            parser.error(f"--env {item!r}: expected KEY=VALUE")
    return args, overrides


def ranks_per_node(args: argparse.Namespace) -> int:
    return args.cpu_ranks_per_node if args.cpu_ranks_per_node is not None else args.gpus_per_node


def world_size(args: argparse.Namespace) -> int:
    return args.nodes * ranks_per_node(args)


# --------------------------------------------------------------------------- checks
#: memory per GPU (GiB) by a name found in --partition / --constraint (first match wins)
GPU_MEMORY_GIB_BY_NAME = (
    ("gh200", 96.0),
    ("h200", 141.0),
    ("h100", 80.0),
    ("gb200", 186.0),
    ("b200", 180.0),
    ("a100-40", 40.0),
    ("a100", 80.0),
    ("l40s", 48.0),
    ("mi300x", 192.0),
)
DEFAULT_GPU_MEMORY_GIB = 80.0


def gpu_memory_gib(args: argparse.Namespace) -> tuple[float, str]:
    """(GiB per GPU, where the number came from) for the memory check."""
    if args.gpu_memory_gib is not None:
        return args.gpu_memory_gib, "--gpu-memory-gib"
    for option in ("partition", "constraint"):
        text = (getattr(args, option) or "").lower()
        for name, gib in GPU_MEMORY_GIB_BY_NAME:
            if name in text:
                return gib, f"{name} in --{option}"
    return DEFAULT_GPU_MEMORY_GIB, "default"


def run_plan(
    config: str, world: int, overrides: list[str], *extra: str, python: str = sys.executable
) -> tuple[int, str]:
    """`python -m runtime.plan --config C --world-size N EXTRA [overrides]` -> (exit code, its
    last line)."""
    cmd = [python, "-m", "runtime.plan", "--config", config, "--world-size", str(world), *extra]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    try:
        proc = subprocess.run(
            [*cmd, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, f"could not run {' '.join(cmd[1:4])} ({e})"
    lines = [ln for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit code {proc.returncode}"
    return proc.returncode, last.removeprefix("error: ")


def check_job(args: argparse.Namespace, config: str, overrides: list[str]) -> str | None:
    """None if the job can run, else the one-line reason to refuse it. Prints what passed."""
    world = world_size(args)
    limit_s, lead_s = args.time * 60, args.signal_delay_s
    if limit_s <= lead_s:
        return (
            f"--time {args.time} min ({limit_s} s) is not longer than --signal-delay-s {lead_s}: "
            "every leg would be told to checkpoint and requeue as soon as it starts"
        )
    if args.skip_mesh_check:
        return None
    rc, line = run_plan(config, world, overrides, "--print-config")
    if rc != 0:
        return f"config error: {line}"
    what = (
        f"{args.nodes} node(s) x {ranks_per_node(args)} "
        f"{'CPU rank(s)' if args.cpu_ranks_per_node is not None else 'GPU(s)'}"
    )
    if args.skip_memory_check:
        rc, line = run_plan(config, world, overrides, "--check-only")
        memory = "memory check skipped (--skip-memory-check)"
    else:
        gib, source = gpu_memory_gib(args)
        rc, line = run_plan(config, world, overrides, "--gpu-memory-gib", f"{gib:g}")
        memory = f"memory ok for {gib:g} GiB per GPU ({source})"
    if rc == 1:
        return (
            f"{args.config} does not fit the memory of {world} ranks ({what}, {gib:g} GiB per "
            f"GPU from {source}; --gpu-memory-gib sets it, --skip-memory-check skips): {line}"
        )
    if rc != 0:
        return f"{args.config} does not fit {world} ranks ({what}): {line}"
    print(f"[submit] config ok, mesh check ok: {args.config} fits {world} ranks; {memory}", flush=True)
    return None


def read_dump_folder(config: str, overrides: list[str]) -> str | None:
    """job.dump_folder as the trainer will see it (config, then overrides); informational."""
    value = None
    try:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        with open(config, "rb") as f:
            value = tomllib.load(f).get("job", {}).get("dump_folder")
    except Exception:
        pass
    for i, tok in enumerate(overrides):
        if tok.startswith("--job.dump_folder="):
            value = tok.split("=", 1)[1]
        elif tok == "--job.dump_folder" and i + 1 < len(overrides):
            value = overrides[i + 1]
    if value is None:
        return None
    return str((REPO / value).resolve()) if not os.path.isabs(value) else value


# --------------------------------------------------------------------------- executor
def _container(args: argparse.Namespace, folder_root: Path, python: str) -> tuple[list[str], str]:
    """(srun args, python command) for the requested container, if any."""
    image = args.container_image
    if not image:
        return [], python
    mounts = [f"{REPO}:{REPO}"]
    if not str(folder_root).startswith(str(REPO) + os.sep):
        mounts.append(f"{folder_root}:{folder_root}")
    if args.container_mounts:
        mounts.append(args.container_mounts)
    if image.endswith(".sif"):
        py = (
            f"apptainer exec --nv --bind {shlex.quote(','.join(mounts))} "
            f"--pwd {shlex.quote(str(REPO))} "
            f"{shlex.quote(image)} {args.container_python}"
        )
        return [], py
    srun = [
        f"--container-image={image}",
        f"--container-mounts={','.join(mounts)}",
        f"--container-workdir={REPO}",
    ]
    return srun, args.container_python


def slurm_parameters(args: argparse.Namespace, folder: Path) -> tuple[dict[str, Any], str]:
    """(submitit SlurmExecutor parameters, python command)."""
    python = args.python or shlex.quote(sys.executable)
    folder_root = Path(str(folder).split("%", 1)[0]).resolve()
    srun_args, python = _container(args, folder_root, python)
    name = args.job_name or f"gptoss-{Path(args.config).stem}"
    params: dict[str, Any] = {
        "job_name": name,
        "nodes": args.nodes,
        "ntasks_per_node": ranks_per_node(args),
        "time": args.time,
        "signal_delay_s": args.signal_delay_s,
        "stderr_to_stdout": True,
        "additional_parameters": {"requeue": True},
    }
    if args.cpu_ranks_per_node is None:
        params["gpus_per_node"] = args.gpus_per_node
    for key in ("cpus_per_task", "partition", "account", "qos", "constraint", "exclude", "mem"):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    if args.exclusive:
        params["exclusive"] = True
    if args.dependency:
        params["dependency"] = args.dependency
    if srun_args:
        params["srun_args"] = srun_args
    return params, python


def job_env_vars(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """(--env values, defaults) for the ranks. The defaults mirror slurm/gptoss_*.sbatch (see the
    comments there); the submitting shell's environment, exported by sbatch, takes precedence."""
    defaults = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.cpus_per_task or 1)}
    if args.cpu_ranks_per_node is None:  # GPUs: NCCL error handling + allocator settings
        defaults.update(
            {
                "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
                "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                "TORCH_FR_BUFFER_SIZE": "2000",  # flight recorder (was TORCH_NCCL_TRACE_BUFFER_SIZE)
                "NCCL_DEBUG": "WARN",
                "CUDA_DEVICE_MAX_CONNECTIONS": "1",
                "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
            }
        )
    env = dict(item.split("=", 1) for item in args.env)
    return env, defaults


def make_executor(args: argparse.Namespace, folder: Path):
    import submitit

    if args.local:
        ex = submitit.LocalExecutor(folder=str(folder), max_num_timeout=args.max_timeouts)
        ex.update_parameters(
            timeout_min=args.time,
            tasks_per_node=world_size(args),
            gpus_per_node=0 if args.cpu_ranks_per_node is not None else args.gpus_per_node,
            signal_delay_s=args.signal_delay_s,
            stderr_to_stdout=True,
        )
        return ex
    params, python = slurm_parameters(args, folder)
    ex = submitit.SlurmExecutor(
        folder=str(folder), max_num_timeout=args.max_timeouts, python=python
    )
    ex.update_parameters(**params)
    return ex


def dry_run_text(args: argparse.Namespace, folder: Path, call: GptOssTrain) -> str:
    lines = [
        "# submit.py --dry-run: nothing submitted",
        f"# world size: {args.nodes} node(s) x {ranks_per_node(args)} rank(s) = {world_size(args)}",
        f"# trainer call (every rank): runtime.train.trainer.main({call.argv()!r})",
        f"# rank environment (--env): {json.dumps(call.env, sort_keys=True)}",
        f"# rank environment defaults: {json.dumps(call.env_defaults, sort_keys=True)}",
    ]
    if args.local:
        lines.append(
            f"# local executor: {world_size(args)} task(s) on this machine, folder {folder}, "
            f"timeout {args.time} min"
        )
        return "\n".join(lines) + "\n"
    from submitit.slurm.slurm import _make_sbatch_string

    params, python = slurm_parameters(args, folder)
    lines.append(f"# submitit SlurmExecutor parameters: {json.dumps(params, sort_keys=True)}")
    lines.append(f"# folder: {folder}")
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    lines.append(_make_sbatch_string(command=command, folder=str(folder), **params))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- follow
def last_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else repr(error)


def follow(job: Any, poll_s: float = 2.0) -> int:
    """Print rank 0's log as it grows until the job is done; 0 on success."""
    path = Path(job.paths.stdout)
    pos = 0
    print(f"[submit] following {path} (Ctrl-C stops following, not the job)", flush=True)

    def drain() -> None:
        nonlocal pos
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except OSError:
            return
        if len(chunk) > 0:
            pos += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()

    try:
        while not job.done():
            drain()
            time.sleep(poll_s)
        drain()
    except KeyboardInterrupt:
        print(f"\n[submit] stopped following; job {job.job_id} keeps running", flush=True)
        return 0
    try:
        results = job.results()
        result = results[0] if len(results) == 1 else {"ranks": len(results), "rank0": results[0]}
    except Exception as e:  # submitit re-raises the job's error (or UncompletedJobError)
        print(
            f"[submit] job {job.job_id} failed: {last_line(e)}",
            flush=True,
        )
        return 1
    print(f"[submit] job {job.job_id} done: {result}", flush=True)
    return 0


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    config = Path(args.config)
    if not config.is_file():
        print(f"submit.py: config {args.config} not found", file=sys.stderr)
        return EXIT_REFUSED
    config_abs = str(config.resolve())
    world = world_size(args)

    refusal = check_job(args, config_abs, overrides)
    if refusal:
        print(f"submit.py: refusing to submit: {refusal}", file=sys.stderr)
        return EXIT_REFUSED

    folder = Path(args.folder)
    if not folder.is_absolute():
        folder = Path.cwd() / folder
    env, env_defaults = job_env_vars(args)
    if args.skip_memory_check:  # the trainer's own pre-flight memory check is skipped too
        overrides = [*overrides, "--training.skip_memory_check=true"]
    call = GptOssTrain(str(REPO), config_abs, overrides, env, env_defaults)

    if args.dry_run:
        sys.stdout.write(dry_run_text(args, folder, call))
        return 0

    try:
        import cloudpickle

        if __name__ != "__main__":  # imported as a module: ship the code, not a reference
            cloudpickle.register_pickle_by_value(sys.modules[__name__])
    except (ImportError, AttributeError, ValueError):
        pass
    executor = make_executor(args, folder)
    job = executor.submit(call)
    dump = read_dump_folder(config_abs, overrides)
    print(
        f"[submit] submitted job {job.job_id} ({'local' if args.local else 'slurm'}): "
        f"{world} ranks, config {args.config}",
        flush=True,
    )
    print(f"[submit] log (rank 0): {job.paths.stdout}", flush=True)
    print(
        f"[submit] logs (all):   {Path(job.paths.stdout).parent}/{job.job_id}_*_log.out", flush=True
    )
    if dump:
        print(f"[submit] dump folder:  {dump} (metrics.jsonl, checkpoints/)", flush=True)
    if not args.local:
        print(
            f"[submit] save and stop: scancel --signal=TERM {job.job_id} (plain scancel: "
            f"the same within the cluster's KillWait)    save and requeue: "
            f"scancel --signal=USR2 {job.job_id}",
            flush=True,
        )
    if args.wait or args.local:
        return follow(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
