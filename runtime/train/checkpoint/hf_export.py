"""`checkpoint.last_save_in_hf`: after the last step, the model as an HF checkpoint that
transformers and vLLM load, in `<dump_folder>/hf/`.

Weights and config.json come from `runtime.hf.save_hf` (any mesh but pipeline stages: every
rank gathers the full tensors one at a time, rank 0 writes) in
`checkpoint.last_save_hf_dtype`, experts dense or MXFP4 (`last_save_hf_experts`). Under
pipeline parallelism no rank holds every stage, so rank 0 converts the final DCP checkpoint
(saved synchronously at the last step) instead. Then rank 0 adds the tokenizer files and
chat template (`runtime.hf.tokenizer_files.write_tokenizer_files`).

The export is written into a temporary sibling (`<dump_folder>/.hf.tmp-*`) and renamed to
`hf/` only when complete (runtime/atomic_dir.py: an older export is swapped out in one step),
so `hf/` is always a complete export, the old one or the new one. `check_export_target` runs
before the model is built: an `hf` that is a file, or a folder the export cannot replace, is
one line (exit 2) then, not after the last step.

A LoRA run writes what `lora.export` selects into that folder: "merged" (the checkpoint above,
each adapted weight W + scaling * B @ A), "adapter" (only `hf/adapter/`: a PEFT adapter folder,
runtime/hf/adapter.py, with the tokenizer files) or "both". Under pipeline parallelism the
adapters come from the final checkpoint (a LoRA checkpoint holds exactly the trained tensors).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from runtime.atomic_dir import make_temp_dir, replace_dir, restore_aside
from runtime.errors import ConfigError
from runtime.hf import save_hf
from runtime.hf.adapter import ADAPTER_DIR, write_adapter
from runtime.hf.convert import dcp_to_hf, read_dcp_model_entries
from runtime.hf.tokenizer_files import write_tokenizer_files
from runtime.hf.keymap import RUNTIME_ONLY, canonical_runtime_key
from runtime.model.lora_spec import is_lora_name
from runtime.safe_dcp import dcp_load

EXPORT_DIR = "hf"


def export_dir(dump_folder: str) -> Path:
    return Path(dump_folder) / EXPORT_DIR


def check_export_target(dump_folder: str, rank: int) -> None:
    """Before the model is built (every rank; rank 0 looks, the others get its verdict):
    raises the one-line ConfigError of `_check_export_target`."""
    problem = None
    if rank == 0:
        try:
            _check_export_target(export_dir(dump_folder))
        except ConfigError as e:
            problem = str(e)
    if dist.is_initialized():
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise ConfigError(problem)


def _check_export_target(out: Path) -> None:
    """`out` must be absent or a folder the export can replace. Also finishes what a kill
    left: an old export renamed aside goes back to `hf/`; temporary exports are removed."""
    restore_aside(out)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    key = "checkpoint.last_save_in_hf"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{key}: {out} is a file, not a folder; the export after the last "
                          f"step would fail: move it away or use another job.dump_folder")
    # The export is written beside `hf/` and swapped in; the old export is then deleted.
    for folder, task in [(out.parent, "be written"), (out, f"replace the old one in {out}")]:
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: {folder} is not writable, so the export after the last "
                              f"step could not {task}: fix its permissions or use another "
                              f"job.dump_folder")


def check_lora_export(cfg, pp: int) -> None:
    """Before anything is built: a LoRA hand-back this run could not write is one line."""
    lora, ck = getattr(cfg, "lora", None), cfg.checkpoint
    if lora is None or not lora.enable or not ck.last_save_in_hf:
        return
    if lora.export in ("adapter", "both") and "sinks" in lora.trainable_extra:
        raise ConfigError(f"lora.export = {lora.export!r} with 'sinks' in lora.trainable_extra: "
                          "a PEFT adapter has no place for the attention sinks (a bare parameter); "
                          "use lora.export = 'merged'")
    if lora.export in ("merged", "both") and pp > 1:
        raise ConfigError(f"lora.export = {lora.export!r} (a merged checkpoint) with "
                          f"parallelism.pipeline_parallel_degree = {pp} is not supported yet "
                          "(no rank holds the whole base); use lora.export = 'adapter' and "
                          "merge with PEFT's merge_and_unload")


@dataclass(frozen=True)
class _Export:
    """What one export reads (save_last_in_hf's arguments)."""
    cfg: Any  # the JobConfig
    model: nn.Module
    model_args: Any
    tokenizer: Any
    lora_spec: Any
    rank: int
    step: int
    checkpointer: Any  # CheckpointManager: the final checkpoint under pipeline parallelism
    pipeline: bool


def save_last_in_hf(cfg, model: nn.Module, tokenizer, *, model_args, lora_spec, rank: int,
                    step: int, checkpointer, pipeline: bool) -> Path:
    """Every rank calls this (gathers are collectives); returns the export directory.
    model: every local parameter under the full model's names (the runner's `model`);
    lora_spec: None for a full fine-tune; pipeline: no rank holds every stage, so rank 0
    converts the final checkpoint of `step` (`checkpointer` waits for it and knows where
    it is)."""
    e = _Export(cfg, model, model_args, tokenizer, lora_spec, rank, step, checkpointer,
                pipeline)
    out = export_dir(cfg.job.dump_folder)
    mode = cfg.lora.export if lora_spec is not None else "merged"
    tmp = make_temp_dir(out) if rank == 0 else out  # only rank 0 writes
    try:
        if mode in ("merged", "both"):
            _save_merged(e, tmp)
        if mode in ("adapter", "both"):
            _save_adapter(e, tmp / ADAPTER_DIR)
        if rank == 0:
            replace_dir(tmp, out)
    finally:
        if rank == 0 and tmp.exists() and tmp != out:
            shutil.rmtree(tmp, ignore_errors=True)  # failed: `hf/` keeps the previous export
    if dist.is_initialized():
        dist.barrier()
    return out


def _write_tokenizer(e: _Export, out: Path) -> list[str]:
    tok = e.tokenizer
    return write_tokenizer_files(out, tokenizer_file=tok.source, tokenizer_dir=tok.directory,
                                 bos=tok.decode([tok.bos_id]), eos=tok.decode([tok.eos_id]),
                                 pad=tok.decode([tok.pad_id]),
                                 chat_template=e.cfg.data.chat_template)


def _final_checkpoint(e: _Export) -> Path:
    """The last step's DCP checkpoint, complete on disk (it was saved synchronously)."""
    e.checkpointer.wait()
    return e.checkpointer.folder / f"step-{e.step}"


def _save_merged(e: _Export, tmp: Path) -> None:
    """The full HF checkpoint (a LoRA run's adapters folded into the base) into `tmp`."""
    ck = e.cfg.checkpoint
    dtype = getattr(torch, ck.last_save_hf_dtype)
    if e.pipeline:
        step_dir = _final_checkpoint(e)
        if e.rank == 0:
            dcp_to_hf(step_dir, tmp, dtype=dtype, args=e.model_args,
                      experts_format=ck.last_save_hf_experts, progress=True)
    else:
        save_hf(e.model, tmp, dtype=dtype, experts_format=ck.last_save_hf_experts,
                progress=e.rank == 0,
                lora_scaling=e.lora_spec.scaling if e.lora_spec else None)
    if e.rank == 0:
        _write_tokenizer(e, tmp)


def _save_adapter(e: _Export, out: Path) -> None:
    """`<export>/adapter/`: the PEFT adapter folder (+ the tokenizer files, so it is
    self-contained), written by rank 0."""
    cfg, spec = e.cfg, e.lora_spec
    tensors = _adapters_from_checkpoint(e) if e.pipeline else _adapters_from_model(e.model)
    if e.rank != 0:
        return
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tokenizer-") as tok_dir:
        names = _write_tokenizer(e, Path(tok_dir))
        write_adapter(out, tensors, e.model_args.n_layers, rank=spec.rank,
                      alpha=spec.alpha, use_rslora=spec.use_rslora, dropout=spec.dropout,
                      base_model=cfg.checkpoint.initial_load_hf or None,
                      dtype=getattr(torch, cfg.checkpoint.last_save_hf_dtype),
                      extra_files=[Path(tok_dir) / n for n in names])


def _adapters_from_model(model) -> dict[str, torch.Tensor]:
    """Full adapter tensors (and whole modules trained in full) on rank 0; every rank gathers,
    in the same order (full_tensor is a collective)."""
    params = {canonical_runtime_key(n): p for n, p in model.named_parameters()}
    trained = {k for k, p in params.items() if p.requires_grad and not is_lora_name(k)}
    modules = {k.rpartition(".")[0] for k in trained}  # PEFT saves these modules whole
    keys = sorted(k for k in params if is_lora_name(k) or k.rpartition(".")[0] in modules)
    out = {}
    for key in keys:
        p = params[key]
        full = p.full_tensor() if isinstance(p, DTensor) else p
        out[key] = full.detach().to("cpu", torch.float32)
    return out


def _adapters_from_checkpoint(e: _Export) -> dict[str, torch.Tensor]:
    """Under pipeline parallelism no rank holds every stage: rank 0 reads the adapters from
    the final checkpoint (saved synchronously at the last step; a LoRA checkpoint holds
    exactly the trained tensors)."""
    step_dir = _final_checkpoint(e)
    if e.rank != 0:
        return {}
    entries = read_dcp_model_entries(step_dir)
    wanted = {k: e for k, e in entries.items() if not RUNTIME_ONLY.match(k)}
    model = {e.name: torch.empty(e.shape, dtype=e.dtype) for e in wanted.values()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp_load({"model": model}, step_dir, no_dist=True)
    return {k: model[e.name].float() for k, e in wanted.items()}
