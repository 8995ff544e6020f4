"""Knowledge editing: inject the new fact, then score efficacy, generalization and specificity.

The injected fact is the edit prompt followed by the new target ("The mother tongue of Danielle Darrieux is
English."), one fresh memory per edit. CounterFact (EasyEdit layout): success when the new target is more probable
than the old one after the prompt (efficacy) and after each rephrase (generalization), and when the true
neighbourhood answer stays more probable than the new target (specificity); probabilities are the mean (or summed)
token log-probs of the continuations. zsRE: teacher-forced token accuracy of `alt` after `src` and after
`rephrase`, and of `loc_ans` after `loc`. Baselines: no injection, and the fact written in front of each prompt.
"""

import contextlib
import logging
import random

from .. import data
from . import common
from .benchmark import Benchmark, CardEntry, Run


KINDS = ("rewrite", "paraphrase", "neighborhood")
SCORES = ("efficacy", "generalization", "specificity", "score")
CARD_DATASETS = {  # benchmark -> (dataset type on the Hub, display name)
    "editing-counterfact": ("azhx/counterfact", "CounterFact (EasyEdit layout)"),
    "editing-zsre": ("zsre", "zsRE (MEND layout)"),
}


# ------------------------------------------------------------------------------------------------------- samples
def as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def counterfact_checks(record: dict) -> tuple[str, list[dict]]:
    """The fact to inject, and comparisons `prompt: a > b` (target_new vs ground_truth, or the reverse)."""
    prompt, new, old = record["prompt"].strip(), record["target_new"].strip(), record["ground_truth"].strip()
    checks = [{"kind": "rewrite", "prompt": prompt, "targets": [new, old]}]
    checks += [{"kind": "paraphrase", "prompt": p, "targets": [new, old]} for p in as_list(record["rephrase_prompt"])]
    truths = as_list(record["locality_ground_truth"])
    for index, local in enumerate(as_list(record["locality_prompt"])):
        checks.append({"kind": "neighborhood", "prompt": local, "targets": [truths[index].strip(), new]})
    return f"{prompt} {new}.", checks


def zsre_checks(record: dict) -> tuple[str, list[dict]]:
    """The fact to inject, and teacher-forced targets: `alt` after `src` and `rephrase`, `loc_ans` after `loc`."""
    src, alt = record["src"].strip(), record["alt"].strip()
    checks = [{"kind": "rewrite", "prompt": src, "targets": [alt]}]
    checks += [{"kind": "paraphrase", "prompt": p, "targets": [alt]} for p in as_list(record["rephrase"])]
    checks.append({"kind": "neighborhood", "prompt": record["loc"], "targets": [record["loc_ans"].strip()]})
    return f"{src} {alt}", checks


def prepare(subject: common.Subject, records: list[dict], args) -> list[dict]:
    make_checks = counterfact_checks if args.dataset == "counterfact" else zsre_checks
    samples = []
    for index, record in enumerate(records):
        fact, checks = make_checks(record)
        for check in checks:
            check["prompt_ids"] = subject.encode(check["prompt"])
            check["in_context_ids"] = subject.encode(f"{fact} {check['prompt']}")
            check["target_ids"] = [subject.encode(" " + target, special=False) for target in check["targets"]]
        record_id = record.get("case_id", record.get("subject"))
        samples.append({"index": index, "id": record_id, "fact": fact, "fact_ids": subject.encode(fact, False)})
        samples[-1]["checks"] = checks
    return samples


def select(records: list[dict], args) -> list[dict]:
    order = list(range(len(records)))
    random.Random(args.seed).shuffle(order)
    return [records[i] for i in order[: args.limit]]


# --------------------------------------------------------------------------------------------------------- scoring
def score(subject, samples: list[dict], memory, args, prompt_key: str = "prompt_ids") -> list[dict]:
    """Per sample, `{kind: success in [0, 1]}` and the per-check details, reading `memory` (one state or None)."""
    rows = [(check, ids) for sample in samples for check in sample["checks"] for ids in check["target_ids"]]
    scores = common.continuation_scores(subject, [c[prompt_key] for c, _ in rows], [ids for _, ids in rows], memory)
    per_check = {}
    for (check, _), (log_probs, hits) in zip(rows, scores):
        per_check.setdefault(id(check), []).append((log_probs, hits))
    return [_sample_result(sample, per_check, args) for sample in samples]


def _sample_result(sample: dict, per_check: dict, args) -> dict:
    details, successes = [], {kind: [] for kind in KINDS}
    for check in sample["checks"]:
        outcome = _check_outcome(per_check[id(check)], args)
        successes[check["kind"]].append(outcome["success"])
        details.append({"kind": check["kind"], **outcome})
    return {**{kind: common.mean(values) for kind, values in successes.items()}, "checks": details}


def _check_outcome(target_scores: list[tuple], args) -> dict:
    if args.dataset == "zsre":
        hits = target_scores[0][1]
        return {"success": sum(hits) / len(hits), "token_hits": hits}
    reduce = common.mean if args.logprob == "mean" else sum
    first, second = (reduce(log_probs) for log_probs, _ in target_scores)
    return {"success": float(first > second), "logprobs": [first, second]}


# ---------------------------------------------------------------------------------------------------- benchmark
class Editing(Benchmark):
    name = "editing"

    def add_arguments(self, parser) -> None:
        parser.add_argument("--dataset", choices=("counterfact", "zsre"), default="counterfact")
        parser.add_argument("--logprob", choices=("mean", "sum"), default="mean", help="CounterFact: compare mean/sum")

    def benchmark_id(self, args) -> str:
        return f"editing-{args.dataset}"

    def load(self, run: Run) -> list[dict]:
        args = run.args
        return prepare(run.subject, select(data.editing_records(args.dataset, args.split, args.data_dir), args), args)

    @contextlib.contextmanager
    def scoring(self):
        quiet = logging.getLogger("modeling_memoryllm.modeling_memoryllm")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # facts are shorter than the 16 tokens the model warns about
        try:
            yield
        finally:
            quiet.setLevel(level)

    def run_memory(self, run: Run, batch: list[dict]) -> None:
        subject, args = run.subject, run.args
        states, generators = run.new_memories(batch)
        subject.inject([sample["fact_ids"] for sample in batch], states, generators)
        for sample, state in zip(batch, states):  # one memory per forward: its prefix is shared by the rows
            sample["memory"] = score(subject, [sample], state, args)[0]

    def run_baselines(self, run: Run, batch: list[dict]) -> None:
        for name in run.baselines:
            key = "prompt_ids" if name == "no_injection" else "in_context_ids"
            for sample, result in zip(batch, score(run.subject, batch, None, run.args, key)):
                sample[name] = result

    def aggregate(self, run: Run, samples: list[dict]) -> dict:
        metric = common.load_metric("knowledge_editing")
        results = {}
        for name in run.conditions:
            outputs = [sample[name] for sample in samples]
            results[name] = metric.compute(
                rewrite_success=[o["rewrite"] for o in outputs],
                paraphrase_success=[o["paraphrase"] if o["paraphrase"] is not None else 0.0 for o in outputs],
                neighborhood_success=[o["neighborhood"] if o["neighborhood"] is not None else 0.0 for o in outputs],
            )
        return results

    def public(self, run: Run, sample: dict) -> dict:
        checks = [{"kind": c["kind"], "prompt": c["prompt"], "targets": c["targets"]} for c in sample["checks"]]
        return {"index": sample["index"], "id": sample["id"], "fact": sample["fact"], "checks": checks} | {
            name: sample[name] for name in run.conditions
        }

    def config_extra(self, run: Run) -> dict:
        args = run.args
        return {"data_file": str(data.data_file(args.dataset, args.split, args.data_dir))}

    def summary(self, results: dict) -> None:
        for name, values in results["aggregates"].items():
            print(f"{name}: " + ", ".join(f"{key} {value:.1f}" for key, value in values.items()))

    def card_entries(self, results: dict, memory: dict) -> list[CardEntry]:
        dataset_type, dataset_name = CARD_DATASETS[results["benchmark"]]
        fields = {"dataset_type": dataset_type, "dataset_name": dataset_name}
        return [CardEntry("Knowledge editing", key, f"{key.capitalize()} (%)", memory[key], fields) for key in SCORES]

    def plot(self, results: dict, path, title: str):
        series = {name: [values[label] for label in SCORES] for name, values in results["aggregates"].items()}
        return common.grouped_bars(list(SCORES), series, "%", title, path, ylim=(0, 100))


BENCHMARK = Editing()
main = BENCHMARK.main
