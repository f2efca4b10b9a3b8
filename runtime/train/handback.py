"""`checkpoint.last_save_in_hf`: after the last step, the model as an HF checkpoint that
transformers and vLLM load, in `<dump_folder>/hf/`.

Weights and config.json come from `runtime.hf.save_hf` (any mesh but pipeline stages: every
rank gathers the full tensors one at a time, rank 0 writes) in
`checkpoint.last_save_hf_dtype`, experts dense or MXFP4 (`last_save_hf_experts`). Under
pipeline parallelism no rank holds every stage, so rank 0 converts the final DCP checkpoint
(saved synchronously at the last step) instead. Then rank 0 adds the tokenizer files and
chat template (`runtime.hf.handback.write_tokenizer_files`).

The export is written into a temporary sibling (`<dump_folder>/.hf.tmp-*`) and renamed to
`hf/` only when complete (runtime/atomic_dir.py: an older export is swapped out in one step),
so `hf/` is always a complete export, the old one or the new one. `check_export_target` runs
before the model is built: an `hf` that is a file, or a folder the export cannot replace, is
one line (exit 2) then, not after the last step.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from runtime.atomic_dir import make_temp_dir, replace_dir, restore_aside
from runtime.errors import ConfigError
from runtime.hf import save_hf
from runtime.hf.convert import dcp_to_hf
from runtime.hf.handback import write_tokenizer_files

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


def save_last_in_hf(trainer) -> Path:
    """Every rank calls this (gathers are collectives); returns the export directory."""
    cfg, ck = trainer.cfg, trainer.cfg.checkpoint
    out = export_dir(cfg.job.dump_folder)
    dtype = getattr(torch, ck.last_save_hf_dtype)
    tmp = make_temp_dir(out) if trainer.rank == 0 else out  # only rank 0 writes
    try:
        if trainer.dims.pp > 1:
            trainer.checkpointer.wait()  # the final save must be complete on disk
            step_dir = trainer.checkpointer.folder / f"step-{trainer.step}"
            if trainer.rank == 0:
                dcp_to_hf(step_dir, tmp, dtype=dtype, args=trainer.model_args,
                          experts_format=ck.last_save_hf_experts, progress=True)
        else:
            save_hf(trainer.model, tmp, dtype=dtype, experts_format=ck.last_save_hf_experts,
                    progress=trainer.rank == 0)
        if trainer.rank == 0:
            tok = trainer.tokenizer
            write_tokenizer_files(tmp, tokenizer_file=tok.source, tokenizer_dir=tok.directory,
                                  bos=tok.decode([tok.bos_id]), eos=tok.decode([tok.eos_id]),
                                  pad=tok.decode([tok.pad_id]),
                                  chat_template=cfg.data.chat_template)
            replace_dir(tmp, out)
    finally:
        if trainer.rank == 0 and tmp.exists() and tmp != out:
            shutil.rmtree(tmp, ignore_errors=True)  # failed: `hf/` keeps the previous export
    if dist.is_initialized():
        dist.barrier()
    return out
