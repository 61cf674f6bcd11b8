"""Helpers that tests and benchmarks share: no tests here."""
