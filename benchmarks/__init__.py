"""Speed, memory and numerical-drift measurements, run from the repository root as modules:
``python -m benchmarks.cost DATA_BIN ...`` (``--help`` on each; figures in docs/BENCHMARKS.md)."""
