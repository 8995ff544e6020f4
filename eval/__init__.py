"""Evaluation of MemoryLLM models: `python -m eval <benchmark> --model PATH ...` (one command per table row), or
`python -m memoryllm_eval ...` once installed (see `README.md` here).

Benchmarks: `retention` (SQuAD v2 / NQ knowledge retention), `editing` (CounterFact / zsRE), `longbench` (six
LongBench QA tasks), `card` (results -> model-index of a model card) and `bench` (speed and memory benchmarks).
The runners follow one protocol (`runners/benchmark.py`); the metrics live under `metrics/` as `evaluate` modules.
"""
