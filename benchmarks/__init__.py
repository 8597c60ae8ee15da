"""Benchmarks: throughput, latency, memory, rule changes and a Quix Streams peer.

Each measurement is a module run from the repository root (``python -m benchmarks.<name>``); it
prints a table and writes a JSON result (machine facts, versions, settings, raw samples) to
``benchmarks/results/``. They measure, they never assert on time: tests only run them in
``--quick`` mode to keep them from rotting.
"""
