"""Slurm <-> torch.distributed glue: environment variables, node lists, exit codes.

The launch model (see slurm/README.md) is ONE TASK PER GPU started by ``srun``: every rank
is a plain ``python -m runtime.train`` process, receives Slurm's signals directly
(``--signal=USR1@<s>``; torchrun's agent would not forward SIGUSR1) and finds its peers via
``MASTER_ADDR``/``MASTER_PORT``. :func:`setup_distributed_env` translates Slurm's per-task
variables into the ones ``torch.distributed.init_process_group(init_method="env://")`` reads.
It is a no-op under torchrun (which already sets ``RANK``/``WORLD_SIZE``) and outside Slurm.

This module imports nothing heavy (no torch): the sbatch templates and ``submit.py`` use it
on login nodes too.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass

from runtime.errors import EXIT_CONFIG_ERROR, EXIT_REQUEUE  # re-exported: the launchers' codes

#: MASTER_PORT = BASE + job id % SPAN: 20000-32767, below the Linux ephemeral port range
#: (32768-60999), where another process may already hold the port (EADDRINUSE).
MASTER_PORT_BASE = 20000
MASTER_PORT_SPAN = 12768

__all__ = [
    "EXIT_CONFIG_ERROR",
    "EXIT_REQUEUE",
    "DistEnv",
    "first_host",
    "master_port_for_job",
    "parse_nodelist",
    "parse_tasks_per_node",
    "setup_distributed_env",
]


# --------------------------------------------------------------------------- node lists
def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside of brackets: 'a[1-2,4],b' -> ['a[1-2,4]', 'b']."""
    parts: list[str] = []
    depth = 0
    cur: list[str] = []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in Slurm node list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm node list {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm node list {text!r}")
    parts.append("".join(cur))
    return parts


def _expand_range_list(body: str, text: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept, as Slurm does)."""
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"bad range {item!r} in Slurm node list {text!r}")
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            out.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ValueError(f"descending range {item!r} in Slurm node list {text!r}")
        width = len(lo_s)
        out.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return out


def _expand_host_pattern(pattern: str, text: str) -> list[str]:
    """Expand one host expression, which may hold several bracket groups (cartesian product):
    'rack[1-2]-n[01-02]' -> rack1-n01, rack1-n02, rack2-n01, rack2-n02."""
    m = re.search(r"\[([^\]]*)\]", pattern)
    if m is None:
        if "[" in pattern or "]" in pattern:
            raise ValueError(f"unbalanced brackets in Slurm node list {text!r}")
        return [pattern]
    prefix, suffix = pattern[: m.start()], pattern[m.end() :]
    return [
        prefix + value + rest
        for value in _expand_range_list(m.group(1), text)
        for rest in _expand_host_pattern(suffix, text)
    ]


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist expression (``SLURM_JOB_NODELIST``) into host names, in order.

    Handles ``node[01-04,07],gpu5``, several bracket groups in one name
    (``rack[1-2]-node[01-02]``), zero padding and plain comma lists. Pure Python, so it works
    where ``scontrol show hostnames`` is not available (containers, login nodes).
    """
    text = nodelist.strip()
    if not text:
        raise ValueError("empty Slurm node list")
    hosts: list[str] = []
    for part in _split_top_level(text):
        part = part.strip()
        if not part:
            raise ValueError(f"empty entry in Slurm node list {text!r}")
        hosts.extend(_expand_host_pattern(part, text))
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (where task 0 of a block-distributed step runs)."""
    return parse_nodelist(nodelist)[0]


def parse_tasks_per_node(spec: str) -> list[int]:
    """Expand ``SLURM_TASKS_PER_NODE``-style counts: ``'2(x3),1'`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if not m:
            raise ValueError(f"bad Slurm tasks-per-node spec {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def master_port_for_job(job_id: str | int) -> int:
    """A port derived from the job id, the same on every node and across requeues of the job
    (requeued jobs keep their id), different for jobs running side by side."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return MASTER_PORT_BASE + int(digits) % MASTER_PORT_SPAN


# --------------------------------------------------------------------------- env setup
@dataclass
class DistEnv:
    """What :func:`setup_distributed_env` found or set."""

    source: str  # "preset" (RANK/WORLD_SIZE already set: torchrun, submit.py), "slurm", "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    job_id: str | None = None
    changed: tuple[str, ...] = ()  # the variables this call wrote

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (
            f"dist env [{self.source}] rank {self.rank}/{self.world_size} "
            f"local {self.local_rank}/{self.local_world_size} node {self.node_rank} "
            f"master {self.master_addr}:{self.master_port}"
        )


def _int(env: MutableMapping[str, str], key: str, default: int | None = None) -> int | None:
    value = env.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def _from_preset(env: MutableMapping[str, str]) -> DistEnv:
    port = _int(env, "MASTER_PORT")
    world = _int(env, "WORLD_SIZE", 1) or 1
    local_world = _int(env, "LOCAL_WORLD_SIZE", world) or world
    rank = _int(env, "RANK", 0) or 0
    return DistEnv(
        source="preset",
        rank=rank,
        world_size=world,
        local_rank=_int(env, "LOCAL_RANK", 0) or 0,
        local_world_size=local_world,
        node_rank=_int(env, "GROUP_RANK", rank // max(local_world, 1)) or 0,
        master_addr=env.get("MASTER_ADDR"),
        master_port=port,
        job_id=env.get("SLURM_JOB_ID") or env.get("TORCHELASTIC_RUN_ID"),
    )


def setup_distributed_env(environ: MutableMapping[str, str] | None = None) -> DistEnv:
    """Make ``init_process_group(init_method="env://")`` work under ``srun``.

    - ``RANK`` and ``WORLD_SIZE`` already set (torchrun, submit.py, a test harness):
      nothing is changed.
    - Inside a Slurm job *step* (a task started by ``srun``: ``SLURM_PROCID`` plus
      ``SLURM_STEP_NUM_TASKS``/``SLURM_STEP_ID``): sets ``RANK``, ``WORLD_SIZE``,
      ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` and, unless already set,
      ``MASTER_ADDR`` (first host of the step's node list) and ``MASTER_PORT``
      (:func:`master_port_for_job`).
    - Otherwise (no Slurm, or a batch/salloc shell that is not a step: there
      ``SLURM_NTASKS`` counts the job's tasks, not the processes that exist): a single
      process; nothing is changed.

    ``environ`` defaults to ``os.environ`` (tests pass a dict).
    """
    env = os.environ if environ is None else environ

    if env.get("RANK") not in (None, "") and env.get("WORLD_SIZE") not in (None, ""):
        return _from_preset(env)

    procid = _int(env, "SLURM_PROCID")
    in_step = "SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if procid is None or not in_step:
        return DistEnv(source="single", job_id=env.get("SLURM_JOB_ID"))

    world = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")
    if world is None:
        raise ValueError(
            "inside a Slurm step but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS is set"
        )
    if not 0 <= procid < world:
        raise ValueError(f"SLURM_PROCID={procid} is outside the step's {world} tasks")
    local_rank = _int(env, "SLURM_LOCALID", 0) or 0
    node_rank = _int(env, "SLURM_NODEID", 0) or 0

    per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    local_world = None
    if per_node_spec:
        counts = parse_tasks_per_node(per_node_spec)
        if node_rank < len(counts):
            local_world = counts[node_rank]
    if local_world is None:
        local_world = _int(env, "SLURM_NTASKS_PER_NODE") or world

    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    changed: list[str] = []

    def put(key: str, value: object) -> None:
        env[key] = str(value)
        changed.append(key)

    put("RANK", procid)
    put("WORLD_SIZE", world)
    put("LOCAL_RANK", local_rank)
    put("LOCAL_WORLD_SIZE", local_world)
    put("GROUP_RANK", node_rank)

    master_addr = env.get("MASTER_ADDR") or None
    if master_addr is None:
        nodelist = (
            env.get("SLURM_STEP_NODELIST")
            or env.get("SLURM_JOB_NODELIST")
            or env.get("SLURM_NODELIST")
        )
        master_addr = first_host(nodelist) if nodelist else socket.gethostname()
        put("MASTER_ADDR", master_addr)
    master_port = _int(env, "MASTER_PORT")
    if master_port is None:
        master_port = master_port_for_job(job_id or 0)
        put("MASTER_PORT", master_port)

    return DistEnv(
        source="slurm",
        rank=procid,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        job_id=job_id,
        changed=tuple(changed),
    )


def _main(argv: list[str] | None = None) -> int:
    """`python -m runtime.train.slurm_env [first-host NODELIST | hosts NODELIST | port JOBID]`:
    shell helpers for the sbatch templates (no `scontrol` needed, e.g. inside a container)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "first-host":
        print(first_host(args[1]))
    elif len(args) == 2 and args[0] == "hosts":
        print("\n".join(parse_nodelist(args[1])))
    elif len(args) == 2 and args[0] == "port":
        print(master_port_for_job(args[1]))
    elif not args:
        print(setup_distributed_env(dict(os.environ)).describe())
    else:
        print(
            "usage: python -m runtime.train.slurm_env "
            "[first-host NODELIST | hosts NODELIST | port JOBID]",
            file=sys.stderr,
        )
        return EXIT_CONFIG_ERROR
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
