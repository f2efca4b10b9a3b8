"""Distributed checkpoints (torch.distributed.checkpoint) that are never half-written, never
execute code, never load into a model they do not match, and never lose intact history.

Layout under `<dump_folder>/<checkpoint.folder>/`:
    step-200/            a complete checkpoint:
        __R_I.distcp         DCP tensor data (model, optimizer), any mesh can load it
        .metadata            DCP's index (read through safe_dcp's allow-listing unpickler)
        runtime.json         our non-tensor state as JSON: step, data-loader position, RNG,
                             skipped steps, the model identity (flavor + ModelArgs) and the
                             run's config (to report what a resume changes)
        manifest.json        size + CRC32 of each file above, written last (manifest.py)
    step-300/
    latest               text file naming the newest checkpoint ("step-300"); advisory
    .step-400.tmp/       a save in progress (or killed mid-way: removed at start)
and `<dump_folder>/.lock` (dump_lock.py): one job per dump folder.

Save: every rank writes into the temp directory; rank 0 adds runtime.json, the ranks
checksum the files (split between them), rank 0 writes the manifest, renames the directory
to `step-N` (replacing an existing `step-N` directory: see below) and replaces `latest`.
A kill at any moment leaves the previous checkpoints intact.

Load (resume): the newest `step-N` whose files match its manifest; a damaged or incomplete
one is skipped with a one-line warning. Before anything is loaded: the checkpoint's model
(ModelArgs and every tensor shape) must equal this run's, and the config keys that differ
are printed; keys a resume cannot honour are an error or a named warning (see
resume_checks.py). `checkpoint.exclude_from_loading` (torchtitan's name) takes parts from
the config instead of the checkpoint.

History: a save over an existing `step-N` (only ever a damaged or manifest-less checkpoint
this run fell back past) publishes the new one under that name and keeps the old directory
as `step-N.replaced-<time>` (never deleted unverified); a run started with
`checkpoint.load_step=N` refuses to start while intact checkpoints after step N exist, since
it would mix its new steps with the old run's.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from runtime.errors import ConfigError, DiskFullError, one_line
from runtime.train.checkpoint import manifest
from runtime.train.checkpoint.disk_space import (free_bytes, is_out_of_space,
                                                 out_of_space_message, refuse_if_short,
                                                 state_bytes, tree_bytes)
from runtime.train.checkpoint.dump_lock import DumpFolderError, DumpLock, make_folder
from runtime.train.checkpoint.resume_checks import (base_identity, base_mismatch,
                                                    config_differences, describe_changes,
                                                    global_batch_change, identity_differences,
                                                    lora_change, model_identity, model_mismatch,
                                                    shape_differences, stored_model_shapes,
                                                    unhonoured_changes)
from runtime.safe_dcp import UnsafeCheckpointError, dcp_load, read_metadata_file

_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^\.step-(\d+)\.tmp$")
LATEST = "latest"
RUNTIME_JSON = "runtime.json"
RUNTIME_FORMAT = 1

# What a failed save raises: DCP's CheckpointException is a BaseException (not an Exception);
# KeyboardInterrupt and SystemExit are never caught.
_SAVE_ERRORS = (Exception, CheckpointException)


class CheckpointError(ConfigError):
    """A checkpoint cannot be used as asked; one line, exit code 2 (like any ConfigError)."""


# ------------------------------------------------------------------------- distributed bits

def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _is_distributed() else 1


def _barrier(group=None) -> None:
    if _is_distributed():
        dist.barrier(group=group)


def _all_gather(obj: Any, group=None) -> list[Any]:
    """Every rank's `obj` (small Python data between our own ranks, never from files)."""
    if not _is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _from_rank0(obj: Any, group=None) -> Any:
    if not _is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)  # src: global rank 0, in every group
    return box[0]


def lock_dump_folder(dump_folder: str, log=print,
                     subfolders: tuple[tuple[str, Path], ...] = ()) -> DumpLock | None:
    """Rank 0 takes `<dump_folder>/.lock` (dump_lock.py) and creates `subfolders` ((config
    key, path) pairs); every rank raises the same CheckpointError if another job holds it or
    a folder cannot be made (a file in the way, read-only). Returns the lock on rank 0."""
    lock, error = None, None
    if _rank() == 0:
        try:
            lock = DumpLock.acquire(dump_folder, log)
            for key, path in subfolders:
                make_folder(path, key)
        except DumpFolderError as e:
            if lock is not None:
                lock.release()
                lock = None
            error = str(e)
    error = _from_rank0(error)
    if error:
        raise CheckpointError(error)
    return lock


# ------------------------------------------------------------------------- what is saved

class ModelState(Stateful):
    """The model parts' parameters and persistent buffers by fully qualified name.

    trainable_only (a LoRA run): the frozen base is left out, so a checkpoint holds the
    adapters (+ lora.trainable_extra) and the small buffers (expert bias): MBs, not the base's
    GBs to TBs. The base is read again from its source on resume (TrainState.base_identity
    records which one). include: keep only the names it accepts (a LoRA run loading its
    base from initial_load_path)."""

    def __init__(self, model_parts: list[torch.nn.Module], trainable_only: bool = False,
                 include: Callable[[str], bool] | None = None):
        self.model_parts = model_parts
        self.options = StateDictOptions(ignore_frozen_params=trainable_only)
        self.include = include

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in self.model_parts:
            out.update(get_model_state_dict(part, options=self.options))
        if self.include is not None:
            out = {k: v for k, v in out.items() if self.include(k)}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self.model_parts:
            set_model_state_dict(part, state_dict, options=StateDictOptions(strict=False))

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> full (unsharded) shape of every tensor of the whole model, all ranks'
        stages together (a collective)."""
        local = {name: tuple(t.shape) for name, t in self.state_dict().items()
                 if isinstance(t, torch.Tensor)}
        merged: dict[str, tuple[int, ...]] = {}
        for part in _all_gather(local):
            merged.update(part)
        return merged


class OptimizerState(Stateful):
    def __init__(self, model_parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]):
        self.pairs = list(zip(model_parts, optimizers))

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part, optim in self.pairs:
            out.update(get_optimizer_state_dict(part, optim))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, optim in self.pairs:
            set_optimizer_state_dict(part, optim, state_dict)


@dataclass
class Progress:
    """The run's counters: the trainer advances them, a checkpoint saves and restores them."""
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # non-finite or untrained steps skipped over the run


class TrainState:
    """The trainer's non-tensor state as JSON (runtime.json; identical on every rank):
    step, lr scheduler, data-loader position, CPU RNG, counters; plus the model identity
    and the config, which a resume checks against. `restore` writes into `progress`,
    `lr_scheduler` and `dataloader` (the trainer's own objects)."""

    def __init__(self, progress: Progress, lr_scheduler, dataloader, *, cfg, model_args,
                 lora: bool, global_batch: int | None, dp: int):
        """cfg: the JobConfig; lora: a LoRA run (its frozen base is not in the checkpoint);
        global_batch: sequences per optimizer step over `dp` data-parallel ranks."""
        self.progress, self.lr_scheduler, self.dataloader = progress, lr_scheduler, dataloader
        self.cfg, self.model_args, self.lora = cfg, model_args, lora
        self._global_batch, self.dp = global_batch, dp

    def snapshot(self) -> dict[str, Any]:
        p = self.progress
        return {
            "step": p.step,
            "global_batch": self._global_batch,  # sequences per optimizer step
            "tokens_seen": p.tokens_seen,
            "skipped_steps": p.skipped_steps,
            "lr_scheduler": _plain(self.lr_scheduler.state_dict()),
            "dataloader": _plain(self.dataloader.state_dict()),
            "rng_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        }

    def restore(self, payload: dict[str, Any], exclude: list[str]) -> None:
        p = self.progress
        p.step = int(payload["step"])
        p.tokens_seen = int(payload.get("tokens_seen", 0))
        p.skipped_steps = int(payload.get("skipped_steps", 0))
        if "lr_scheduler" in exclude:
            _restart_schedule_at(self.lr_scheduler, p.step)
        else:
            self.lr_scheduler.load_state_dict(payload["lr_scheduler"])
        if "dataloader" not in exclude:
            self.dataloader.load_state_dict(payload["dataloader"])
        rng = base64.b64decode(payload["rng_cpu"])
        torch.set_rng_state(torch.frombuffer(bytearray(rng), dtype=torch.uint8))

    def model_identity(self) -> dict[str, Any]:
        return model_identity(self.cfg.model.flavor, self.model_args)

    def base_identity(self) -> dict[str, Any] | None:
        """A LoRA run's frozen base (path + header fingerprint), computed once; None for a
        full fine-tune (its checkpoint holds every weight)."""
        if not self.lora:
            return None
        if not hasattr(self, "_base"):
            self._base = base_identity(self.cfg.checkpoint, self.cfg.training.seed)
        return self._base

    def global_batch(self) -> tuple[int | None, str]:
        """This run's effective global batch and how it comes about (for resume messages)."""
        return self._global_batch, describe_global_batch(self.cfg.training, self.dp)

    def config(self) -> dict[str, dict[str, Any]]:
        return self.cfg.to_dict()


def _plain(obj: Any) -> Any:
    """JSON-ready copy (tensors as lists); JSON's allow-list is the point."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # numpy scalars
        return obj.item()
    raise TypeError(f"checkpoint train state: cannot store {type(obj).__name__} as JSON")


def _restart_schedule_at(scheduler, step: int) -> None:
    """This config's schedule (its optimizer.lr and [lr_scheduler]) at `step`: the schedule
    is a pure function of the step, so it continues there (no second warmup)."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, base, lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, lrs):
        group["initial_lr"] = base
        group["lr"] = lr
    scheduler._last_lr = lrs


# ------------------------------------------------------------------------- folder scanning

def step_dirs(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N` directory, complete or not, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), child) for child in folder.iterdir()
             if (m := _STEP_DIR.match(child.name)) and child.is_dir()]
    return sorted(found)


def list_complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of checkpoints whose save finished (a manifest exists; not verified)."""
    return [(s, p) for s, p in step_dirs(folder) if (p / manifest.MANIFEST).is_file()]


def find_latest_checkpoint(folder: Path) -> Path | None:
    """The newest finished checkpoint (cheap: not verified; loading verifies)."""
    complete = list_complete_checkpoints(folder)
    return complete[-1][1] if complete else None


def _unfinished(tmp: Path, step: int) -> str | None:
    """Why the interrupted save `tmp` did not finish writing, or None. With a manifest, the
    manifest decides (verify_checkpoint). Without one (killed while checksumming), DCP's
    index decides: DCP renames `.metadata` into place only after every rank's files were
    written and synced, so an index that reads, files as long as the extents it records, and
    runtime.json (written before the tensor data) naming step N make a complete save."""
    if (tmp / manifest.MANIFEST).is_file():
        return None
    if not (tmp / ".metadata").is_file():
        return "no .metadata: its tensor data was not completely written"
    try:
        stored = read_metadata_file(tmp / ".metadata").storage_data.values()
        record = json.loads((tmp / RUNTIME_JSON).read_text())
    except (UnsafeCheckpointError, OSError, ValueError) as e:
        return " ".join(str(e).split())[:160]
    ends: dict[str, int] = {}
    for info in stored:
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        if not (tmp / name).is_file():
            return f"{name} is missing"
        if (tmp / name).stat().st_size < end:
            return f"{name} is shorter than its index says"
    if not isinstance(record, dict) or record.get("step") != step:
        return f"{RUNTIME_JSON} does not record step {step}"
    return None


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def read_pointer(folder: Path) -> tuple[str | None, str | None]:
    """(checkpoint name in `latest`, None) or (None, why it is unusable / None if absent)."""
    path = folder / LATEST
    if not path.is_file():
        return None, None
    raw = path.read_bytes()[:256]
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None, f"{path} is not text"
    if not _STEP_DIR.match(name):
        return None, f"{path} holds {name[:40]!r}, not a step-N name"
    return name, None


def verify_checkpoint(path: Path,
                      required: tuple[str, ...] = (".metadata", RUNTIME_JSON)) -> str | None:
    """None if every file of `path` matches its manifest, else why not. A collective: the
    files' checksums are split over the ranks."""
    files, problem = manifest.read_manifest(path)
    for name in required if files is not None else ():
        if name not in files:
            problem = problem or f"manifest.json does not list {name}"
    if files is not None and problem is None:
        mine = manifest.files_for_rank(sorted(files), _rank(), _world())
        problem = manifest.check_sizes(path, {n: files[n] for n in mine}) or \
            manifest.check_checksums(path, files, mine)
    problems = [p for p in _all_gather(problem) if p]
    return problems[0] if problems else None


def describe_global_batch(training, dp: int) -> str:
    if training.global_batch_size > 0:
        return f"training.global_batch_size = {training.global_batch_size}"
    return (f"training.global_batch_size = -1: local_batch_size {training.local_batch_size} x "
            f"data-parallel degree {dp}")


def check_model_early(cfg, model_args, global_batch: int | None = None, dp: int = 1) -> None:
    """Before the model is built (a 120b build takes minutes): the checkpoint a resume would
    try first must record this run's model and (when given) global batch, else the one-line
    CheckpointError. Cheap and unverified (the full check of names and shapes follows at
    load time)."""
    ckpt = cfg.checkpoint
    if not ckpt.enable:
        return
    folder = Path(cfg.job.dump_folder) / ckpt.folder
    found = ([folder / f"step-{ckpt.load_step}"] if ckpt.load_step >= 0
             else [p for _, p in reversed(list_complete_checkpoints(folder))])
    for path in found[:1]:
        try:
            record = json.loads((path / RUNTIME_JSON).read_text())
            saved, saved_base = record.get("model"), record.get("lora_base")
            train = record.get("train")
        except (OSError, ValueError, AttributeError):
            return  # unreadable: the load decides (damaged -> skipped)
        current = model_identity(cfg.model.flavor, model_args)
        if isinstance(saved, dict) and identity_differences(saved, current):
            raise CheckpointError(model_mismatch(path, saved, current, {}, {}))
        lora = getattr(cfg, "lora", None)
        base = base_identity(ckpt, cfg.training.seed) if lora is not None and lora.enable else None
        problem = base_mismatch(path, saved_base, base) or (
            lora_change(path, record.get("config"), lora, model_args) if base else None)
        if problem:
            raise CheckpointError(problem)
        if global_batch is not None:
            error, _ = global_batch_change(train, global_batch,
                                           describe_global_batch(cfg.training, dp),
                                           list(ckpt.exclude_from_loading or []))
            if error:
                raise CheckpointError(f"checkpoint {path}: {error}")


# ------------------------------------------------------------------------- the manager

@dataclass
class _PendingSave:
    """One save of a step: its temp directory and its expected size; in async mode also
    DCP's future, the thread that publishes it, and that thread's failure."""
    step: int
    tmp: Path
    needed: int  # bytes (disk_space.py)
    basis: str  # where `needed` comes from, for messages
    future: Any = None
    thread: threading.Thread | None = None
    error: BaseException | None = None


class CheckpointManager:
    def __init__(self, cfg, dump_folder: str, states: dict[str, Any], log=print):
        """cfg: the `[checkpoint]` section; states: "model" (ModelState), "optimizer"
        (OptimizerState), "train" (TrainState). The caller holds the dump-folder lock."""
        self.cfg = cfg
        self.folder = Path(dump_folder) / cfg.folder
        self.states = states
        self.log = log
        self.exclude = list(getattr(cfg, "exclude_from_loading", []) or [])
        self._pending: _PendingSave | None = None  # the async save in flight
        self._async_group = None
        # This run's saves (a stop signal right after an interval save saves nothing new).
        self._saved_steps: set[int] = set()
        self._damaged: set[Path] = set()
        self._last_size: tuple[int, str] | None = None  # (bytes, "the size of step-N")
        if cfg.enable:
            if _rank() == 0:
                self.folder.mkdir(parents=True, exist_ok=True)
            _barrier()
            self._recover_interrupted()
            newest = find_latest_checkpoint(self.folder)
            if newest is not None:  # what the next save will need (every rank: same answer)
                self._last_size = (tree_bytes(newest), f"the size of {newest.name}")
        _barrier()

    # ---------------------------------------------------------------- interrupted saves
    def _recover_interrupted(self) -> None:
        """Every `.step-N.tmp` a killed job left: published when its write had completed and
        it verifies (a kill after an async save reached disk loses nothing), else removed with
        a one-line warning saying why. A collective (checksums split over the ranks)."""
        names = _from_rank0(sorted(p.name for p in self.folder.glob(".step-*.tmp")
                                   if _TMP_DIR.match(p.name) and p.is_dir())
                            if _rank() == 0 else None)
        for name in names:
            tmp = self.folder / name
            step = int(_TMP_DIR.match(name).group(1))
            problem, has_manifest = _from_rank0(
                (_unfinished(tmp, step), (tmp / manifest.MANIFEST).is_file())
                if _rank() == 0 else None)
            if problem is None and not has_manifest:  # killed while checksumming: finish that
                error = self._write_manifest(tmp, step)
                if error is not None:  # a full or read-only disk: kept for a later start
                    self._warn(f"the interrupted save {tmp} is complete but its manifest "
                               f"cannot be written ({error}): left as it is")
                    continue
            if problem is None:
                problem = verify_checkpoint(tmp)
            if _rank() == 0:
                self._settle_interrupted(tmp, step, problem)
        _barrier()

    def _settle_interrupted(self, tmp: Path, step: int, problem: str | None) -> None:
        if problem is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            self._warn(f"removed the interrupted save {tmp} ({problem}): it cannot be verified")
            return
        newer = [s for s, _ in list_complete_checkpoints(self.folder) if s > step]
        self._publish(step, tmp, move_latest=not newer)
        self.log(f"checkpoint step {step}: published {tmp.name}, a save whose write had "
                 f"completed when the job was stopped (verified)")

    def _warn(self, msg: str) -> None:
        self.log(f"warning: {msg}")

    def _read_runtime(self, path: Path) -> dict[str, Any]:
        record = json.loads((path / RUNTIME_JSON).read_text())
        if not isinstance(record, dict) or record.get("format") != RUNTIME_FORMAT:
            raise ValueError(f"{path / RUNTIME_JSON}: unknown format")
        return record

    # ---------------------------------------------------------------- loading
    def _candidates(self) -> list[Path]:
        if self.cfg.load_step >= 0:
            return [self.folder / f"step-{self.cfg.load_step}"]
        name, problem = read_pointer(self.folder)
        if problem:
            self._warn(f"{problem}: ignored, looking for the newest intact checkpoint")
        found = [p for _, p in reversed(step_dirs(self.folder))]
        if name and found and found[0].name != name and (self.folder / name).is_dir():
            self._warn(f"{self.folder / LATEST} names {name} but {found[0].name} is newer: "
                       "the newest intact checkpoint is used")
        return found

    def load_latest(self) -> int | None:
        """Resume from the newest intact checkpoint (or checkpoint.load_step); returns its
        step, or None to start from scratch. Raises CheckpointError (one line) when a
        checkpoint exists but cannot be used."""
        explicit = self.cfg.load_step >= 0
        for path in self._candidates():
            if explicit and not path.is_dir():
                raise CheckpointError(
                    f"checkpoint.load_step={self.cfg.load_step}: no checkpoint at {path}")
            problem = verify_checkpoint(path)
            if problem is None:
                try:
                    record = self._read_runtime(path)
                except (ValueError, KeyError, OSError) as e:
                    problem = f"{RUNTIME_JSON} unreadable: {' '.join(str(e).split())[:120]}"
            if problem is not None:
                self._damaged.add(path)
                if explicit:
                    raise CheckpointError(f"checkpoint.load_step={self.cfg.load_step}: {path} is "
                                          f"damaged ({problem})")
                self._warn(f"checkpoint {path} is damaged or incomplete ({problem}): skipped")
                continue
            return self._resume_from(path, record)
        if self._damaged:
            self._warn(f"no intact checkpoint in {self.folder}: starting from step 0")
        return None

    def _resume_from(self, path: Path, record: dict[str, Any]) -> int:
        train: TrainState = self.states["train"]
        self._check_model(path, record.get("model"), record.get("lora_base"),
                          record.get("config"))
        self._check_history(path)
        self._check_config(path, record.get("config", {}))
        self._check_global_batch(path, record.get("train"))
        self.log(f"resuming from {path}")
        state = {"model": self.states["model"]}
        if "optimizer" not in self.exclude:
            state["optimizer"] = self.states["optimizer"]
        try:
            dcp_load(state, path)
        except UnsafeCheckpointError as e:
            raise CheckpointError(str(e)) from None
        train.restore(record["train"], self.exclude)
        return _step_of(path)

    def _check_model(self, path: Path, saved_identity: dict | None,
                     saved_base: dict | None = None, saved_config: dict | None = None) -> None:
        """Same ModelArgs, the same LoRA base and adapter settings, and the same tensor names
        and shapes, before anything is loaded."""
        train: TrainState = self.states["train"]
        problem = base_mismatch(path, saved_base, train.base_identity())
        if problem is None and train.base_identity() is not None:
            problem = lora_change(path, saved_config, train.cfg.lora, train.model_args)
        if problem:
            raise CheckpointError(problem)
        try:
            stored = stored_model_shapes(path)
        except UnsafeCheckpointError as e:
            raise CheckpointError(str(e)) from None
        problem = model_mismatch(path, saved_identity, train.model_identity(), stored,
                                 self.states["model"].global_shapes())
        if problem:
            raise CheckpointError(problem)

    def _check_history(self, path: Path) -> None:
        """checkpoint.load_step=N with intact-looking checkpoints after N: refuse rather than
        interleave a new run's steps with the old run's."""
        if self.cfg.load_step < 0:
            return
        later = [p.name for s, p in list_complete_checkpoints(self.folder)
                 if s > self.cfg.load_step]
        if later:
            raise CheckpointError(
                f"checkpoint.load_step={self.cfg.load_step}: {self.folder} also holds the later "
                f"checkpoints {', '.join(later)}, which this run's saves would mix with its own; "
                f"move them out of {self.folder} (or copy {path.name} to a new job.dump_folder) "
                f"to branch from step {self.cfg.load_step}")

    def _check_config(self, path: Path, saved_config: dict) -> None:
        train: TrainState = self.states["train"]
        diffs = config_differences(saved_config, train.config())
        if train.base_identity() is not None:  # LoRA: the base is read from there (checked)
            diffs = [d for d in diffs if not d[0].startswith("checkpoint.initial_load_")]
        if diffs:
            self.log(f"resuming {path.name} with config changes: {describe_changes(diffs)}")
        warnings, error = unhonoured_changes(diffs, self.exclude)
        if error:
            raise CheckpointError(error)
        for text in warnings:
            self._warn(text)

    def _check_global_batch(self, path: Path, saved_train: dict | None) -> None:
        current, how = self.states["train"].global_batch()
        if current is None:
            return
        error, warning = global_batch_change(saved_train, current, how, self.exclude)
        if error:
            raise CheckpointError(f"checkpoint {path}: {error}")
        if warning:
            self._warn(warning)

    @staticmethod
    def load_model_only(model_state: ModelState, path: str) -> None:
        """Initial weights from a DCP directory's "model" key (a model-only directory made by
        `python -m runtime.hf.convert hf-to-dcp`, or a training checkpoint)."""
        folder = Path(path)
        if not (folder / ".metadata").is_file():
            raise CheckpointError(f"checkpoint.initial_load_path: no DCP checkpoint at {path}")
        if (folder / manifest.MANIFEST).is_file():
            problem = verify_checkpoint(folder, required=(".metadata",))
            if problem:
                raise CheckpointError(
                    f"checkpoint.initial_load_path: {path} is damaged ({problem})")
        try:
            details = shape_differences(stored_model_shapes(folder), model_state.global_shapes())
            if details:
                raise CheckpointError(f"checkpoint.initial_load_path: {path} holds another model "
                                      f"than this run ({'; '.join(details)}); nothing was loaded")
            dcp_load({"model": model_state}, folder)
        except UnsafeCheckpointError as e:
            raise CheckpointError(f"checkpoint.initial_load_path: {e}") from None

    # ---------------------------------------------------------------- saving
    def should_save(self, step: int, last_step: int) -> bool:
        return self.cfg.enable and (step % self.cfg.interval == 0 or step == last_step)

    def _runtime_record(self, step: int) -> str:
        train: TrainState = self.states["train"]
        record = {"format": RUNTIME_FORMAT, "step": step, "train": train.snapshot(),
                  "model": train.model_identity(), "config": train.config()}
        base = train.base_identity()
        if base is not None:  # a LoRA checkpoint: the base it adapts (read from there on resume)
            record["lora_base"] = base
        return json.dumps(record, indent=1, allow_nan=False)

    def save(self, step: int, *, force_sync: bool = False) -> None:
        """Save `step` (every rank calls this). In sync mode it returns once the checkpoint
        is published; in async mode once the state is staged in memory: a background thread
        per rank waits for DCP's write and publishes it the moment it completes (not at the
        next save), so a kill after that loses nothing."""
        self.wait()  # at most one save in flight; its failure, if any, comes first
        if step in self._saved_steps:
            return  # saved this step already (e.g. interval save, then stop signal)
        self._saved_steps.add(step)
        state = {"model": self.states["model"], "optimizer": self.states["optimizer"]}
        job = self._begin(step, state)
        if self.cfg.async_mode == "async" and not force_sync:
            try:
                job.future = dcp.async_save(state, checkpoint_id=str(job.tmp),
                                            process_group=self._get_async_group())
            except _SAVE_ERRORS as e:
                self._raise_together(job, e)
            job.thread = threading.Thread(target=self._complete_in_background, args=(job,),
                                          name=f"checkpoint-step-{step}", daemon=True)
            self._pending = job
            job.thread.start()
            self.log(f"checkpoint step {step}: async save started")
            return
        self.log(f"checkpoint step {step}: saving to {self.folder / f'step-{step}'}")
        try:
            dcp.save(state, checkpoint_id=str(job.tmp))
        except _SAVE_ERRORS as e:  # DCP fails on every rank together (its last step is collective)
            self._raise_together(job, e)
        self._finalize(job)

    def _begin(self, step: int, state: dict[str, Any]) -> _PendingSave:
        """Rank 0 refuses a save that cannot fit (disk_space.py), then creates the temp
        directory with runtime.json, the state as of now (an async save ends steps later);
        every rank gets the same outcome."""
        needed, basis = self._last_size or self._estimated_size(state)
        job = _PendingSave(step, self.folder / f".step-{step}.tmp", needed, basis)
        record = self._runtime_record(step)

        def prepare() -> None:
            refuse_if_short(self.folder, needed, basis, f"checkpoint step {step}",
                                       f"nothing was written; {self._newest_name()}")
            job.tmp.mkdir(parents=True, exist_ok=True)
            _write_synced(job.tmp / RUNTIME_JSON, record)

        self._on_rank0(job, prepare)
        return job

    def _estimated_size(self, state: dict[str, Any]) -> tuple[int, str]:
        """Before a run's first checkpoint: the bytes of its tensors (a lower bound)."""
        total = sum(_all_gather(state_bytes(state, _rank())))
        return total, "at least the bytes of the model and optimizer state"

    def _complete_in_background(self, job: _PendingSave) -> None:
        """The async save's thread: DCP's write, then the publication (collectives on the
        async gloo group, never the training's). Its error is raised by wait()/poll()."""
        try:
            error = None
            try:
                job.future.result()
            except _SAVE_ERRORS as e:  # on every rank together, as in a sync save
                error = e
            if error is not None:
                self._raise_together(job, error, self._async_group)
            self._finalize(job, self._async_group)
        except BaseException as e:
            job.error = e

    def wait(self) -> None:
        """Block until the async save in flight (if any) is published; raise its failure."""
        job, self._pending = self._pending, None
        if job is None:
            return
        job.thread.join()
        if job.error is not None:
            raise job.error

    def poll(self) -> None:
        """Called every step (cheap): a background save that failed stops a one-process run
        now. With several ranks its failure is raised at the next save or the end, the first
        point every rank reaches together."""
        job = self._pending
        if job is not None and _world() == 1 and not job.thread.is_alive():
            self.wait()

    def check_space(self) -> None:
        """Before training: the next save must fit where the last one did, so a restart on a
        still-full disk stops now instead of after `interval` steps. A collective."""
        problem = None
        if _rank() == 0 and self._last_size is not None:
            try:
                refuse_if_short(self.folder, *self._last_size, "the next checkpoint",
                                f"nothing was trained; {self._newest_name()}")
            except DiskFullError as e:
                problem = str(e)
        problem = _from_rank0(problem)
        if problem:
            raise DiskFullError(problem)

    def _get_async_group(self):
        # Background checkpoint collectives must not share a (NCCL) group with training.
        if _is_distributed() and self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def _finalize(self, job: _PendingSave, group=None) -> None:
        _barrier(group)  # every rank's shards and the .metadata are written
        files = self._checksums(job.tmp, group)

        def publish() -> None:
            manifest.write_manifest(job.tmp, files, job.step)
            self._publish(job.step, job.tmp)
            self._prune(job.step)
            self.log(f"checkpoint step {job.step}: complete")

        self._on_rank0(job, publish, group)
        self._last_size = (sum(f["size"] for f in files.values()),
                           f"the size of step-{job.step}")

    def _checksums(self, tmp: Path, group=None) -> dict[str, dict]:
        """name -> size + CRC32 of every file of the save, split over the ranks."""
        names = None
        if _rank() == 0:
            # The files DCP's own index refers to (not a directory listing: that can lag
            # on network filesystems), plus the index and our JSON.
            stored = read_metadata_file(tmp / ".metadata").storage_data.values()
            names = sorted({info.relative_path for info in stored} | {".metadata", RUNTIME_JSON})
        names = _from_rank0(names, group)
        mine = manifest.describe_files(tmp, manifest.files_for_rank(names, _rank(), _world()))
        files: dict[str, dict] = {}
        for part in _all_gather(mine, group):
            files.update(part)
        return files

    def _write_manifest(self, tmp: Path, step: int) -> str | None:
        """Rank 0 writes the manifest; every rank gets its failure (one line) or None, so no
        rank goes on to a collective the others never reach."""
        files = self._checksums(tmp)
        error = None
        if _rank() == 0:
            try:
                manifest.write_manifest(tmp, files, step)
            except OSError as e:
                error = one_line(e)
        return _from_rank0(error)

    # ---------------------------------------------------------------- failed saves
    def _on_rank0(self, job: _PendingSave, fn, group=None) -> None:
        """Run `fn` on rank 0 only; every rank raises if it failed (_raise_together)."""
        error = None
        if _rank() == 0:
            try:
                fn()
            except _SAVE_ERRORS as e:
                error = e
        self._raise_together(job, error, group)

    def _raise_together(self, job: _PendingSave, error: BaseException | None, group=None) -> None:
        """`error`: this rank's failure of a step all ranks fail or pass together, or rank 0's
        failure of a rank-0-only step (None elsewhere). Rank 0 decides whether the disk was
        full (then the partial save is removed and every rank raises the same one-line
        DiskFullError); any other failure is re-raised as the bug it is."""
        verdict = None
        if _rank() == 0 and error is not None:
            verdict = self._out_of_space(job, error) or ""
        verdict = _from_rank0(verdict, group)
        if verdict:
            raise DiskFullError(verdict) from None
        if error is not None:
            raise error
        if verdict is not None:
            raise RuntimeError(f"checkpoint step {job.step}: the save failed on rank 0")

    def _out_of_space(self, job: _PendingSave, error: BaseException) -> str | None:
        """The one-line message if `error` was the disk filling up (the partial save is then
        removed), else None."""
        if isinstance(error, DiskFullError):
            return str(error)
        written = tree_bytes(job.tmp)
        if not is_out_of_space(error, self.folder, job.needed - written):
            return None
        free = free_bytes(self.folder) + written  # what this save had when the disk filled
        shutil.rmtree(job.tmp, ignore_errors=True)
        return out_of_space_message(self.folder, job.needed, free, job.basis,
                                    f"checkpoint step {job.step}",
                                    f"the partial save was removed; {self._newest_name()}")

    def _newest_name(self) -> str:
        newest = find_latest_checkpoint(self.folder)
        return (f"{newest.name} stays the latest checkpoint" if newest
                else "there is no checkpoint yet")

    def _publish(self, step: int, tmp: Path, move_latest: bool = True) -> None:
        final = self.folder / f"step-{step}"
        if final.exists():
            # Only a checkpoint this run fell back past (damaged, or without a manifest: an
            # older version's) can be here. It is renamed aside, never deleted: no data this
            # run could not verify as garbage is lost. A kill between the renames leaves it
            # aside and the older checkpoints in place.
            aside = self.folder / f"step-{step}.replaced-{time.strftime('%Y%m%dT%H%M%S')}"
            os.rename(final, aside)
            os.rename(tmp, final)
            self._warn(f"checkpoint step {step}: the previous {final.name} was kept as "
                       f"{aside.name} (delete it once you do not need it)")
        else:
            os.rename(tmp, final)
        if not move_latest:
            return
        pointer_tmp = self.folder / f".{LATEST}.tmp"
        _write_synced(pointer_tmp, final.name + "\n")
        os.replace(pointer_tmp, self.folder / LATEST)  # atomic: old or new, never half

    def _prune(self, saved_step: int) -> None:
        """Keep `keep_latest_k` checkpoints: the one just saved and the newest older ones
        this run did not find damaged. Later steps (another history) are never pruned."""
        keep = self.cfg.keep_latest_k
        if keep <= 0:
            return
        older = [p for s, p in list_complete_checkpoints(self.folder) if s < saved_step]
        intact = [p for p in older if p not in self._damaged]
        doomed = [p for p in older if p in self._damaged]
        doomed += intact[:max(0, len(intact) - (keep - 1))]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        self.wait()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
