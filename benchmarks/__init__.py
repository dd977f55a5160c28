"""Benchmarks: ``python -m benchmarks [--quick]`` (``make bench``). Not part of the test suite."""
