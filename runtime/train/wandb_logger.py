"""Weights & Biases: the step metrics of metrics.jsonl, sent from rank 0 (an optional extra).

    pip install '.[wandb]'          then  --metrics.enable_wandb  (or enable_wandb = true)

`require_wandb(cfg)` runs first thing in the trainer, on every rank: enabled without wandb
installed is a one-line config error (exit 2) before any process group or weight exists.

Names, each from the first that is set:
    project   metrics.wandb_project, $WANDB_PROJECT, "gptoss-runtime"
    run name  metrics.wandb_run_name, $WANDB_NAME, "<SLURM_JOB_NAME>-<SLURM_JOB_ID>", the
              dump folder's name
    mode      metrics.wandb_mode, $WANDB_MODE, wandb's default (online). Offline runs (no
              network on the cluster) land in <dump_folder>/wandb/; upload them later with
              `wandb sync <dump_folder>/wandb/offline-run-*`.
One dump folder is one W&B run: its id is kept in <dump_folder>/wandb_run_id, so a requeued or
resumed job continues the same run ($WANDB_RUN_ID overrides). The resolved config is logged
once, at init; every metrics line (metrics.log_freq) is logged with its step; the run is
finished when the trainer exits.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from runtime.errors import ConfigError

DEFAULT_PROJECT = "gptoss-runtime"
RUN_ID_FILE = "wandb_run_id"


def require_wandb(metrics_cfg):
    """The wandb module when metrics.enable_wandb, else None; ConfigError if not installed."""
    if not metrics_cfg.enable_wandb:
        return None
    try:
        import wandb  # optional extra: imported only when enabled
    except ImportError:
        raise ConfigError("metrics.enable_wandb = true but wandb is not installed "
                          "(pip install '.[wandb]', or set metrics.enable_wandb = false)") from None
    return wandb


def run_name(metrics_cfg, dump_folder: str) -> str:
    if metrics_cfg.wandb_run_name:
        return metrics_cfg.wandb_run_name
    if os.environ.get("WANDB_NAME"):
        return os.environ["WANDB_NAME"]
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id:
        return f"{os.environ.get('SLURM_JOB_NAME', 'job')}-{job_id}"
    return Path(dump_folder).resolve().name


def _run_id(dump_folder: Path) -> str:
    """The dump folder's W&B run id (created on first use): requeued legs continue one run."""
    if os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    path = dump_folder / RUN_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


class WandbLogger:
    """A metrics sink (see MetricsLogger's `sinks`): log(record) per metrics line, close()."""

    def __init__(self, wandb, job_cfg, dump_folder: str):
        folder = Path(dump_folder)
        folder.mkdir(parents=True, exist_ok=True)
        m = job_cfg.metrics
        self.wandb = wandb
        self.run = wandb.init(
            project=m.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=run_name(m, dump_folder),
            id=_run_id(folder), resume="allow",
            mode=m.wandb_mode or os.environ.get("WANDB_MODE") or None,  # None: wandb's default
            dir=str(folder),
            config=job_cfg.to_dict(),
        )

    def log(self, record: dict) -> None:
        # Numbers only (mfu is None without a known peak); NaN/inf are kept, W&B plots them.
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                  and not isinstance(v, bool)}
        self.wandb.log(values, step=record["step"])

    def close(self) -> None:
        self.wandb.finish()
