"""Job configuration: TOML + `--section.key=value` overrides -> a validated `JobConfig`.

This package's face only (callers import from here); the concepts live in its modules, none
of which imports this face or anything of runtime.train outside this package (no circle, no
import back up):
    schema.py     the sections (dataclasses), each field's rule, cross-key rules, `JobConfig`
    loader.py     TOML file and command-line overrides -> JobConfig; the argparse parser
    job.py        a JobConfig against a world size and model -> `ParallelDims` (validate_job)
    reference.py  docs/config-reference.md generated from the schema (`python -m
                  runtime.train.config.reference [--check]`); not re-exported here

Errors are `runtime.errors.ConfigError` (one line naming the key; entry points exit 2).
To check a config and its mesh from the shell: `python -m runtime.plan --check-only`.
"""

from runtime.errors import ConfigError
from runtime.train.config.job import parallel_dims, validate_job
from runtime.train.config.loader import build_parser, config_from_dict, load_config, parse_args
from runtime.train.config.schema import (
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
