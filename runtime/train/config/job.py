"""A config checked against a world size and its model: the run's `ParallelDims`, and the
sequences of one optimizer step on that mesh (`step_batch`, the one place that computes them).

The config layer reads the [parallelism] keys and hands `ParallelDims` plain integers (as
torchtitan does), so runtime.parallel never imports the config. Pure Python until a mesh is
built: `python -m runtime.plan --check-only` runs this without importing torch.
"""

from __future__ import annotations

from typing import NamedTuple

from runtime.model.args import ModelArgs
from runtime.parallel.dims import ParallelDims
from runtime.train.config.schema import JobConfig


def parallel_dims(job: JobConfig, world_size: int) -> ParallelDims:
    """The job's degrees for `world_size` ranks (raises ParallelismError when they don't fit)."""
    p = job.parallelism
    return ParallelDims(
        dp_replicate=p.data_parallel_replicate_degree,
        dp_shard=p.data_parallel_shard_degree,
        cp=p.context_parallel_degree,
        tp=p.tensor_parallel_degree,
        pp=p.pipeline_parallel_degree,
        ep=p.expert_parallel_degree,
        etp=p.expert_tensor_parallel_degree,
        world_size=world_size,
    )


class StepBatch(NamedTuple):
    """One optimizer step: local_batch_size sequences x dp ranks x grad_accum micro-steps."""

    grad_accum: int
    global_batch: int


def step_batch(job: JobConfig, dp: int) -> StepBatch:
    """The step's accumulation and global batch over `dp` data-parallel ranks (raises
    ConfigError when training.global_batch_size does not split)."""
    grad_accum = job.training.gradient_accumulation_steps(dp)
    return StepBatch(grad_accum, job.training.local_batch_size * dp * grad_accum)


def validate_job(job: JobConfig, world_size: int, model: ModelArgs | None = None) -> ParallelDims:
    """All parallelism checks for a config at a world size (model: default job.model_args())."""
    p = job.parallelism
    dims = parallel_dims(job, world_size)
    dims.check_model(
        model or job.model_args(), job.training.seq_len,
        cp_load_balancer=p.context_parallel_load_balancer,
        loss_parallel=not p.disable_loss_parallel,
        pp_schedule=p.pipeline_parallel_schedule,
        pp_layers_per_stage=p.pipeline_parallel_layers_per_stage,
    )
    step_batch(job, dims.dp)  # raises if the global batch doesn't split
    return dims
