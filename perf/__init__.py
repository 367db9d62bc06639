"""Benchmarks driven by perf_analyzer against a running Triton server."""
