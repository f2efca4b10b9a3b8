"""Job configuration: TOML + `--section.key=value` overrides -> a validated `JobConfig`.

This module is the public face only (callers import from here); the concepts live in flat
sibling modules, none of which imports this one (no package/submodule import circle):
    config_schema.py  the sections (dataclasses), each field's rule, cross-key rules, `JobConfig`
    config_loader.py  TOML file and command-line overrides -> JobConfig; the argparse parser
    job.py            a JobConfig against a world size and model -> `ParallelDims` (validate_job)

Errors are `runtime.errors.ConfigError` (one line naming the key; entry points exit 2).
To check a config and its mesh from the shell: `python -m runtime.plan --check-only`.
"""

from runtime.errors import ConfigError
from runtime.train.job import parallel_dims, validate_job
from runtime.train.config_loader import build_parser, config_from_dict, load_config, parse_args
from runtime.train.config_schema import (
    SECTIONS,
    ActivationCheckpointSection,
    CheckpointSection,
    CompileSection,
    DataSection,
    JobConfig,
    JobSection,
    LoRASection,
    LRSchedulerSection,
    MetricsSection,
    ModelSection,
    OptimizerSection,
    ParallelismSection,
    ProfilingSection,
    QuantizeSection,
    TrainingSection,
    ValidationSection,
    validate_config,
)

__all__ = [
    "SECTIONS", "ActivationCheckpointSection", "CheckpointSection", "CompileSection",
    "ConfigError", "DataSection", "JobConfig", "JobSection", "LoRASection", "LRSchedulerSection",
    "MetricsSection", "ModelSection", "OptimizerSection", "ParallelismSection", "ProfilingSection",
    "QuantizeSection", "TrainingSection", "ValidationSection", "build_parser", "config_from_dict",
    "load_config", "parallel_dims", "parse_args", "validate_config", "validate_job",
]
