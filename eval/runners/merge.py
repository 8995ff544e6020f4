"""`python -m eval merge SHARD.json... --out RESULT.json`: the shards of one run (`--offset`/`--limit`) as one result.

The shards must come from one benchmark with one configuration (apart from `offset`, `limit`, `batch_size` and the
versions recorded), and hold distinct samples. The merged result holds every sample once, in the shards' order,
with the aggregates computed again from them by the benchmark's own `aggregate`, its plot beside it, and the
shards' timings summed.
"""

import argparse
import json
import pathlib
from types import SimpleNamespace

from ..paths import COMMAND
from . import common
from .card import benchmark_of


SHARD_KEYS = {"offset", "limit", "batch_size", "torch", "python"}  # config keys that may differ between shards
SHARD_COUNTS = {"unrelated_chunk_writes"}  # config counts of each shard's work: summed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{COMMAND} merge", description=__doc__.splitlines()[0])
    parser.add_argument("shards", nargs="+", help="result JSON files of one run's shards")
    parser.add_argument("--out", required=True, help="merged result JSON (a PNG plot is written beside it)")
    return parser


def comparable(config: dict) -> dict:
    """What of a shard's configuration must be the same in every shard of one run."""
    return {key: value for key, value in config.items() if key not in SHARD_KEYS | SHARD_COUNTS}


def merged(shards: list[dict]) -> dict:
    """One result from `shards` (result dicts of one benchmark and configuration)."""
    first = shards[0]
    config = comparable(first["config"])
    for shard in shards[1:]:
        if shard["benchmark"] != first["benchmark"] or comparable(shard["config"]) != config:
            raise ValueError("the shards differ in benchmark or configuration: they are not one run")
    samples = [sample for shard in shards for sample in shard["samples"]]
    keys = [(sample.get("id"), sample.get("index")) for sample in samples]
    if len(set(keys)) != len(keys):
        raise ValueError("the shards overlap: a sample appears twice")
    timings = {}
    for shard in shards:
        for phase, seconds in shard.get("timings", {}).items():
            timings[phase] = round(timings.get(phase, 0.0) + seconds, 3)
    limits = [shard["config"].get("limit") for shard in shards]
    counts = {key: summed([shard["config"][key] for shard in shards]) for key in SHARD_COUNTS if key in first["config"]}
    return {
        "benchmark": first["benchmark"],
        "config": {**first["config"], **counts, "offset": 0, "limit": len(samples), "shard_limits": limits},
        "aggregates": aggregates(first, samples),
        "samples": samples,
        "timings": timings,
    }


def aggregates(result: dict, samples: list[dict]) -> dict:
    """The aggregates of `samples` under `result`'s benchmark and configuration (its own `aggregate`)."""
    args = SimpleNamespace(**result["config"])
    baselines = common.baselines(args)
    conditions = (["memory"] if result["config"].get("memory_model") else []) + baselines
    run = SimpleNamespace(args=args, baselines=baselines, conditions=conditions)  # what `aggregate` reads of a Run
    return benchmark_of(result).aggregate(run, samples)


def summed(counts: list[dict]) -> dict:
    """Per key, the sum of the shards' counts."""
    return {key: sum(count.get(key, 0) for count in counts) for key in dict.fromkeys(k for c in counts for k in c)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = merged([json.loads(pathlib.Path(path).read_text()) for path in args.shards])
    path, png = benchmark_of(results).write(results, pathlib.Path(args.out))
    print(f"wrote {path} and {png} ({len(results['samples'])} samples from {len(args.shards)} shards)")
    return 0
