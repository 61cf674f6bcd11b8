"""Benchmarks, run from the repository root as modules (`python -m
benchmarks.NAME`), so that they import each other and the process harness
in tests/support as packages."""
