"""`checkpoint.last_save_in_hf`: after the last step, the model as an HF checkpoint that
transformers and vLLM load, in `<dump_folder>/hf/`.

Weights and config.json come from `runtime.hf.save_hf` (any mesh but pipeline stages: every
rank gathers the full tensors one at a time, rank 0 writes) in
`checkpoint.last_save_hf_dtype`, experts dense or MXFP4 (`last_save_hf_experts`). Under
pipeline parallelism no rank holds every stage, so rank 0 converts the final DCP checkpoint
(saved synchronously at the last step) instead. Then rank 0 adds the tokenizer files and
chat template (`runtime.hf.handback.write_tokenizer_files`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from runtime.hf import save_hf
from runtime.hf.convert import dcp_to_hf
from runtime.hf.handback import write_tokenizer_files

EXPORT_DIR = "hf"


def export_dir(dump_folder: str) -> Path:
    return Path(dump_folder) / EXPORT_DIR


def save_last_in_hf(trainer) -> Path:
    """Every rank calls this (gathers are collectives); returns the export directory."""
    cfg, ck = trainer.cfg, trainer.cfg.checkpoint
    out = export_dir(cfg.job.dump_folder)
    dtype = getattr(torch, ck.last_save_hf_dtype)
    if trainer.dims.pp > 1:
        trainer.checkpointer.wait()  # the final save must be complete on disk
        step_dir = trainer.checkpointer.folder / f"step-{trainer.step}"
        if trainer.rank == 0:
            dcp_to_hf(step_dir, out, dtype=dtype, args=trainer.model_args,
                      experts_format=ck.last_save_hf_experts, progress=True)
    else:
        save_hf(trainer.model, out, dtype=dtype, experts_format=ck.last_save_hf_experts,
                progress=trainer.rank == 0)
    if trainer.rank == 0:
        tok = trainer.tokenizer
        write_tokenizer_files(out, tokenizer_file=tok.source, tokenizer_dir=tok.directory,
                              bos=tok.decode([tok.bos_id]), eos=tok.decode([tok.eos_id]),
                              pad=tok.decode([tok.pad_id]), chat_template=cfg.data.chat_template)
    if dist.is_initialized():
        dist.barrier()
    return out
