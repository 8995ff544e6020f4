"""The benchmark runners, one module per table, each with a `BENCHMARK` (a `benchmark.Benchmark`), registered here
by command name; `card` turns their results into a model card's model-index."""

import importlib


BENCHMARKS = {"retention": "retention", "editing": "editing", "longbench": "longbench"}  # command -> module


def load_benchmark(command: str):
    """The `Benchmark` registered as `command` (its module imported now)."""
    return importlib.import_module(f".{BENCHMARKS[command]}", __name__).BENCHMARK
