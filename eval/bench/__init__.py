"""`python -m eval.bench`: what MemoryLLM costs (latency, throughput, size, stability), as ratios against baselines
measured in the same process run. Writes `bench.json`, PNG plots and `bench_table.md` (see `run.py`)."""
