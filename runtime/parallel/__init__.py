"""Parallelism: degrees and mesh (dims), and the per-strategy modules that apply them."""

from runtime.parallel.dims import ParallelDims, ParallelismError, pipeline_num_stages

__all__ = ["ParallelDims", "ParallelismError", "pipeline_num_stages"]
