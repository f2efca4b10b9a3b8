"""Distributed checkpoints (torch.distributed.checkpoint) that are never half-written.

Layout under `<dump_folder>/<checkpoint.folder>/`:
    step-200/            a complete DCP checkpoint (model, optimizer, train state)
    step-300/
    latest               text file naming the newest complete checkpoint ("step-300")
    .step-400.tmp/       a save in progress (or killed mid-way: ignored, removed at start)

A save writes into the temp directory; only after every rank finished does rank 0 rename
it to `step-N` and then atomically replace `latest`. A kill at any moment therefore leaves
the previous checkpoint and pointer intact. The model state uses
`torch.distributed.checkpoint.state_dict`, so the same files load on any mesh (resharding).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
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
from torch.distributed.checkpoint.stateful import Stateful

_STEP_DIR = re.compile(r"^step-(\d+)$")
LATEST = "latest"


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_distributed() else 0


def _barrier() -> None:
    if _is_distributed():
        dist.barrier()


class ModelState(Stateful):
    """The model parts' parameters and persistent buffers by fully qualified name."""

    def __init__(self, model_parts: list[torch.nn.Module]):
        self.model_parts = model_parts

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in self.model_parts:
            out.update(get_model_state_dict(part))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self.model_parts:
            set_model_state_dict(part, state_dict, options=StateDictOptions(strict=False))


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


class TrainState(Stateful):
    """Step, lr scheduler, data loader position and RNG, stored as one JSON string (the
    same on every rank, so DCP writes it once)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        t = self.trainer
        payload = {
            "step": t.step,
            "lr_scheduler": t.lr_scheduler.state_dict(),
            "dataloader": t.dataloader.state_dict(),
            "rng_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "tokens_seen": t.tokens_seen,
        }
        return {"json": json.dumps(payload, default=_json_default)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        payload = json.loads(state_dict["json"])
        t = self.trainer
        t.step = payload["step"]
        t.tokens_seen = payload.get("tokens_seen", 0)
        t.lr_scheduler.load_state_dict(payload["lr_scheduler"])
        t.dataloader.load_state_dict(payload["dataloader"])
        rng = base64.b64decode(payload["rng_cpu"])
        torch.set_rng_state(torch.frombuffer(bytearray(rng), dtype=torch.uint8))


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"checkpoint train state: cannot serialise {type(obj).__name__}")


def list_complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of finished checkpoints, oldest first (a DCP dir is complete once its
    `.metadata` exists; temp dirs never match `step-N`)."""
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / ".metadata").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(folder: Path) -> Path | None:
    pointer = folder / LATEST
    if pointer.is_file():
        candidate = folder / pointer.read_text().strip()
        if (candidate / ".metadata").is_file():
            return candidate
    complete = list_complete_checkpoints(folder)  # pointer missing or stale: newest complete
    return complete[-1][1] if complete else None


class CheckpointManager:
    def __init__(self, cfg, dump_folder: str, states: dict[str, Stateful], log=print):
        """cfg: the `[checkpoint]` section; states: what a checkpoint holds ("model",
        "optimizer", "train")."""
        self.cfg = cfg
        self.folder = Path(dump_folder) / cfg.folder
        self.states = states
        self.log = log
        self._pending: tuple[Any, int, Path] | None = None  # async save in flight
        self._async_group = None
        if _rank() == 0 and cfg.enable:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()

    # ---------------------------------------------------------------- loading
    def load_latest(self) -> int | None:
        """Resume from the newest complete checkpoint; returns its step or None."""
        if self.cfg.load_step >= 0:
            path = self.folder / f"step-{self.cfg.load_step}"
            if not (path / ".metadata").is_file():
                raise FileNotFoundError(
                    f"checkpoint.load_step={self.cfg.load_step}: no complete checkpoint at {path}")
        else:
            path = find_latest_checkpoint(self.folder)
        if path is None:
            return None
        self.log(f"resuming from {path}")
        dcp.load(self.states, checkpoint_id=str(path))
        return int(_STEP_DIR.match(path.name).group(1))

    @staticmethod
    def load_model_only(model_state: ModelState, path: str) -> None:
        """Initial weights from a model-only DCP directory ({"model": ...}), e.g. made by
        `python -m runtime.hf.convert hf-to-dcp`."""
        if not (Path(path) / ".metadata").is_file():
            raise FileNotFoundError(f"checkpoint.initial_load_path: no DCP checkpoint at {path}")
        dcp.load({"model": model_state}, checkpoint_id=path)

    # ---------------------------------------------------------------- saving
    def should_save(self, step: int, last_step: int) -> bool:
        return self.cfg.enable and (step % self.cfg.interval == 0 or step == last_step)

    def save(self, step: int, *, force_sync: bool = False) -> None:
        self.wait()  # at most one save in flight; its finalisation comes first
        final = self.folder / f"step-{step}"
        if (final / ".metadata").is_file():
            return  # already saved this step (e.g. interval save, then stop signal)
        tmp = self.folder / f".step-{step}.tmp"
        if self.cfg.async_mode == "async" and not force_sync:
            future = dcp.async_save(self.states, checkpoint_id=str(tmp),
                                    process_group=self._get_async_group())
            self._pending = (future, step, tmp)
            self.log(f"checkpoint step {step}: async save started")
            return
        self.log(f"checkpoint step {step}: saving to {final}")
        dcp.save(self.states, checkpoint_id=str(tmp))
        self._finalize(step, tmp)

    def wait(self) -> None:
        """Block until an async save is on disk, then publish it."""
        if self._pending is None:
            return
        future, step, tmp = self._pending
        self._pending = None
        future.result()
        self._finalize(step, tmp)

    def _get_async_group(self):
        # Background checkpoint collectives must not share a (NCCL) group with training.
        if _is_distributed() and self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def _finalize(self, step: int, tmp: Path) -> None:
        _barrier()  # every rank's shards are written
        if _rank() == 0:
            final = self.folder / f"step-{step}"
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            pointer_tmp = self.folder / f".{LATEST}.tmp"
            pointer_tmp.write_text(final.name + "\n")
            os.replace(pointer_tmp, self.folder / LATEST)  # atomic: old or new, never half
            self._prune()
            self.log(f"checkpoint step {step}: complete")
        _barrier()

    def _prune(self) -> None:
        keep = self.cfg.keep_latest_k
        if keep <= 0:
            return
        for _, path in list_complete_checkpoints(self.folder)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        self.wait()
