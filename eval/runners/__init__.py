"""The benchmark runners, one module per table, each with a `BENCHMARK` (a `benchmark.Benchmark`), registered here
by command name; `card` turns their results into a model card's model-index."""

BENCHMARKS = {"retention": "retention", "editing": "editing", "longbench": "longbench"}  # command -> module
