"""GPU benchmark scripts (see benchmarks/README.md). Runnable as `python benchmarks/X.py` or
`python -m benchmarks.X` from the repository root; every script also smoke-runs on CPU."""
