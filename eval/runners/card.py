"""`python -m eval card RESULTS.json... --card hub_configs/<variant>/README.md`: results -> the card's model-index.

Each result JSON written by a runner becomes `EvalResult` entries (task type text-generation) in the card's YAML
metadata, through `huggingface_hub`'s `ModelCard` / `ModelCardData` (1.x and 2.x); which entries, each benchmark
says (`Benchmark.card_entries`). Entries already in the card for the same task, dataset, split and metric are
replaced, and so are those of the same task, dataset and split that select other questions (`dataset_args`, one per
group in the model-index: e.g. retention's `max_answer_tokens`); others are kept.
Only the memory model's own numbers go in (baselines stay in the result files).
"""

import argparse
import json
import pathlib

from huggingface_hub import EvalResult, ModelCard

from ..paths import COMMAND
from . import BENCHMARKS, load_benchmark


SPLITS = {"dev": "part-a", "heldout": "part-b"}  # the halves of the shared data files


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{COMMAND} card", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="result JSON files written by the runners")
    parser.add_argument("--card", required=True, help="model card (README.md) to update in place")
    parser.add_argument("--model-name", help="model-index name (default: the card's, else its folder name)")
    return parser


# ---------------------------------------------------------------------------------------------------- conversions
def benchmark_of(results: dict):
    """The registered `Benchmark` that wrote `results` (its `benchmark` is `<command>` or `<command>-<dataset>`)."""
    benchmark = results["benchmark"]
    command = benchmark.split("-", 1)[0]
    if command not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}")
    return load_benchmark(command)


def eval_results(results: dict) -> list[EvalResult]:
    memory = results["aggregates"].get("memory")
    if memory is None:
        return []  # a plain LM's baselines describe another model
    split = results["config"].get("split", "dev")
    entries = benchmark_of(results).card_entries(results, memory)
    return [
        EvalResult(
            task_type="text-generation",
            task_name=entry.task_name,
            metric_type=entry.metric_type,
            metric_name=entry.metric_name,
            metric_value=round(float(entry.value), 4),
            **{"dataset_split": SPLITS.get(split, split), **entry.fields},
        )
        for entry in entries
    ]


def _key(result: EvalResult) -> tuple:
    """What a result is of: its group in the model-index (task, dataset, config, split, revision) and its metric."""
    return (*result.unique_identifier, result.metric_name)


def merge(existing: list[EvalResult] | None, new: list[EvalResult]) -> list[EvalResult]:
    """`existing` without the results that `new` replaces, then `new`. The model-index keeps one `dataset_args` per
    group (e.g. retention's `max_answer_tokens`), so a group's results of another selection of questions go too."""
    replaced = {_key(result) for result in new}
    selections = {result.unique_identifier: result.dataset_args for result in new}

    def stale(result: EvalResult) -> bool:
        group = result.unique_identifier
        return _key(result) in replaced or (group in selections and result.dataset_args != selections[group])

    return [result for result in existing or [] if not stale(result)] + new


# ------------------------------------------------------------------------------------------------------------ run
def update_card(card_path: str, result_paths: list[str], model_name: str | None = None) -> list[EvalResult]:
    path = pathlib.Path(card_path)
    card = ModelCard.load(path)
    new = [entry for item in result_paths for entry in eval_results(json.loads(pathlib.Path(item).read_text()))]
    card.data.eval_results = merge(card.data.eval_results, new)
    card.data.model_name = model_name or card.data.model_name or path.parent.name
    card.save(path)
    return card.data.eval_results


def main(argv: list[str] | None = None, subject=None) -> int:
    args = build_parser().parse_args(argv)
    entries = update_card(args.card, args.results, args.model_name)
    print(f"wrote {len(entries)} model-index results to {args.card}")
    return 0
