"""`python -m eval card RESULTS.json... --card hub_configs/<variant>/README.md`: results -> the card's model-index.

Each result JSON written by a runner becomes `EvalResult` entries (task type text-generation) in the card's YAML
metadata, through `huggingface_hub`'s `ModelCard` / `ModelCardData` (1.x and 2.x). Entries already in the card for
the same task, dataset, split and metric are replaced; others are kept. Only the memory model's own numbers go in
(baselines stay in the result files).
"""

import argparse
import json
import pathlib

from huggingface_hub import EvalResult, ModelCard


DATASETS = {  # benchmark -> (dataset type on the Hub, display name)
    "retention-squad": ("rajpurkar/squad_v2", "SQuAD v2 dev, answerable (knowledge retention)"),
    "retention-nq": ("google-research-datasets/nq_open", "NQ-open with gold passages (knowledge retention)"),
    "editing-counterfact": ("azhx/counterfact", "CounterFact (EasyEdit layout)"),
    "editing-zsre": ("zsre", "zsRE (MEND layout)"),
}
SPLITS = {"dev": "part-a", "heldout": "part-b"}  # the halves of the shared data files


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval card", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="result JSON files written by the runners")
    parser.add_argument("--card", required=True, help="model card (README.md) to update in place")
    parser.add_argument("--model-name", help="model-index name (default: the card's, else its folder name)")
    return parser


# ---------------------------------------------------------------------------------------------------- conversions
def eval_results(results: dict) -> list[EvalResult]:
    benchmark = results["benchmark"]
    memory = results["aggregates"].get("memory")
    if memory is None:
        return []  # a plain LM's baselines describe another model
    if benchmark.startswith("retention"):
        return _retention(results, memory)
    if benchmark.startswith("editing"):
        return _editing(results, memory)
    if benchmark == "longbench":
        return _longbench(results, memory)
    raise ValueError(f"unknown benchmark {benchmark!r}")


def _entry(results: dict, task_name: str, metric: tuple[str, str, float], **dataset) -> EvalResult:
    """One model-index entry; `metric` is (type, name, value)."""
    split = results["config"].get("split", "dev")
    dataset.setdefault("dataset_split", SPLITS.get(split, split))
    metric_type, metric_name, value = metric
    return EvalResult(
        task_type="text-generation",
        task_name=task_name,
        metric_type=metric_type,
        metric_name=metric_name,
        metric_value=round(float(value), 4),
        **dataset,
    )


def _dataset(results: dict) -> dict:
    dataset_type, dataset_name = DATASETS[results["benchmark"]]
    return {"dataset_type": dataset_type, "dataset_name": dataset_name}


def _retention(results: dict, memory: dict) -> list[EvalResult]:
    config = results["config"]
    args = {"max_answer_tokens": config.get("max_answer_tokens"), "samples": len(results["samples"])}
    entries = []
    for k, accuracy in memory["accuracy_by_k"].items():
        metric = ("accuracy", f"Retention accuracy after {k} unrelated injections (%)", 100 * accuracy)
        entries.append(_entry(results, "Knowledge retention", metric, metric_args=args, **_dataset(results)))
    return entries


def _editing(results: dict, memory: dict) -> list[EvalResult]:
    keys = ("efficacy", "generalization", "specificity", "score")
    metrics = [(key, f"{key.capitalize()} (%)", memory[key]) for key in keys]
    return [_entry(results, "Knowledge editing", metric, **_dataset(results)) for metric in metrics]


def _longbench(results: dict, memory: dict) -> list[EvalResult]:
    entries = []
    for task, scores in memory["tasks"].items():
        dataset = {"dataset_type": "THUDM/LongBench", "dataset_name": f"LongBench {task}", "dataset_config": task}
        dataset["dataset_split"] = "test" if not results["config"].get("data_files") else "local files"
        entries.append(_entry(results, "Long-context QA", ("f1", "QA F1 (x100)", scores["f1"]), **dataset))
    return entries


def _key(result: EvalResult) -> tuple:
    return (result.task_type, result.dataset_type, result.dataset_config, result.dataset_split, result.metric_name)


def merge(existing: list[EvalResult] | None, new: list[EvalResult]) -> list[EvalResult]:
    replaced = {_key(result) for result in new}
    return [r for r in existing or [] if _key(r) not in replaced] + new


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
