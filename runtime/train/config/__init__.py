"""Job configuration: TOML + `--section.key=value` overrides -> a validated `JobConfig`.

One concept per module; import from the module that owns the name (this package file imports
nothing, so no module of the package runs through it and there is no circle):
    schema.py     the sections (dataclasses), each field's rule, cross-key rules, `JobConfig`,
                  `validate_config`
    loader.py     TOML file and command-line overrides -> JobConfig (`load_config`,
                  `config_from_dict`, `parse_args`, `build_parser`)
    job.py        a JobConfig against a world size and model -> `ParallelDims` (`validate_job`,
                  `parallel_dims`)
    reference.py  docs/config-reference.md generated from the schema (`python -m
                  runtime.train.config.reference [--check]`)

None of them imports anything of runtime.train outside this package. Errors are
`runtime.errors.ConfigError` (one line naming the key; entry points exit 2). To check a config
and its mesh from the shell: `python -m runtime.plan --check-only`.
"""
