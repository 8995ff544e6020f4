"""Evaluation of MemoryLLM models: `python -m eval <benchmark> --model PATH ...` (one command per table row).

Benchmarks: `retention` (SQuAD v2 / NQ knowledge retention), `editing` (CounterFact / zsRE), `longbench` (six
LongBench QA tasks), `card` (results -> model-index of a model card) and `bench` (speed and memory benchmarks).
The metrics live under `eval/metrics/` as `evaluate` modules.
"""
