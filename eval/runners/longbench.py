"""LongBench QA with the memory, as the MemoryLLM paper's code runs it.

The prompt (context, then question) is cut to its last `max_length - max_gen` tokens and split into
`--chunk-size`-token chunks counted from the end; all chunks but the final one are injected in order, and the answer
is generated greedily from the final chunk, which holds the question. Scored with `qa_f1` (max over the answers,
mean x 100) per task. Baselines: no injection (the final chunk alone), and the cut prompt in context.
Data: `THUDM/LongBench` through `datasets` when online, or `--data-files DIR` with `<task>.jsonl` files.
"""

import random

from ..data import LONGBENCH_TASKS, longbench_records
from . import common
from .benchmark import Benchmark, CardEntry, Run


MAX_GEN = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32}
STORY = "Below is a story, then a question about it. Answer in a few words.\n\nStory:\n{context}\n\n"
ARTICLE = (
    'Below is a scientific article, then a question about it. Answer in a few words; write "unanswerable" when '
    'the article does not say, or "yes"/"no" for a yes/no question.\n\nArticle:\n{context}\n\n'
)
DOCUMENT = "Below is a document, then a question about it. Answer in a few words.\n\nDocument:\n{context}\n\n"
PASSAGES = "Below are some passages, then a question that needs several of them. Give only the answer.\n\n{context}\n\n"
TEMPLATES = {
    "narrativeqa": STORY,
    "qasper": ARTICLE,
    "multifieldqa_en": DOCUMENT,
    "hotpotqa": PASSAGES,
    "2wikimqa": PASSAGES,
    "musique": PASSAGES,
}


# ------------------------------------------------------------------------------------------------------- samples
def prompt_text(tokenizer, task: str, record: dict) -> str:
    """The task's template as a chat turn with "Answer:" opening the reply, or as plain text ending in "Answer:"."""
    body = TEMPLATES[task].format(context=record["context"]) + f"Question: {record['input']}"
    if common.has_chat_template(tokenizer):
        return common.chat_turn(tokenizer, body) + "Answer:"
    return f"{body}\nAnswer:"


def chunks_from_end(ids: list[int], size: int) -> list[list[int]]:
    """`ids` in chunks of `size` counted from the end: the first chunk holds the remainder."""
    starts = list(range(len(ids) - size, 0, -size))[::-1]
    bounds = [0, *starts, len(ids)] if starts else [0, len(ids)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def prepare(subject, task: str, records: list[dict], args, offset: int) -> list[dict]:
    samples = []
    for index, record in enumerate(records):
        ids = subject.encode(prompt_text(subject.tokenizer, task, record))
        kept = ids[-(args.max_length - MAX_GEN[task]) :]
        sample = {"index": offset + index, "task": task, "id": record.get("_id", str(index))}
        sample |= {"answers": list(record["answers"]), "prompt_tokens": len(ids), "kept_tokens": len(kept)}
        sample |= {"chunks": chunks_from_end(kept, args.chunk_size), "kept": kept}
        samples.append(sample)
    return samples


def load_samples(subject, args) -> list[dict]:
    samples = []
    for task in args.tasks.split(","):
        if task not in MAX_GEN:
            raise ValueError(f"unknown LongBench task {task!r}; choose from {', '.join(LONGBENCH_TASKS)}")
        records = longbench_records(task, args.data_files)
        order = list(range(len(records)))
        random.Random(args.seed).shuffle(order)
        chosen = [records[i] for i in sorted(order[: args.limit])]
        samples += prepare(subject, task, chosen, args, len(samples))
    return samples


# ------------------------------------------------------------------------------------------------------ generating
def answer(subject, batch: list[dict], prompts: list[list[int]], states, name: str) -> None:
    """Greedy answers, grouped so that one generate call sees memories that are all read or all unread."""
    groups: dict[tuple, list[int]] = {}
    for row, sample in enumerate(batch):
        read = states is not None and states[row].initialized
        groups.setdefault((read, MAX_GEN[sample["task"]]), []).append(row)
    for (read, max_gen), rows in groups.items():
        memory = [states[row] for row in rows] if read else None
        outputs = common.generate(subject, [prompts[row] for row in rows], memory, max_gen)
        for row, output in zip(rows, outputs):
            batch[row][name] = output


# ---------------------------------------------------------------------------------------------------- benchmark
class LongBench(Benchmark):
    name = "longbench"
    default_batch = 2

    def add_arguments(self, parser) -> None:
        parser.add_argument("--tasks", default=",".join(LONGBENCH_TASKS), help="comma list of LongBench tasks")
        parser.add_argument("--data-files", help="folder of <task>.jsonl files in LongBench's schema (offline)")
        parser.add_argument("--max-length", type=int, default=4096, help="prompt tokens kept: max_length - max_gen")
        parser.add_argument("--chunk-size", type=int, default=512)

    def load(self, run: Run) -> list[dict]:
        return load_samples(run.subject, run.args)

    def run_memory(self, run: Run, batch: list[dict]) -> None:
        """Inject every chunk but the last into a fresh memory per sample (round r: chunk r of each), then answer."""
        subject = run.subject
        states, generators = run.new_memories(batch)
        rounds = max(len(sample["chunks"]) - 1 for sample in batch)
        for round_index in range(rounds):
            rows = [i for i, sample in enumerate(batch) if round_index < len(sample["chunks"]) - 1]
            ids = [batch[i]["chunks"][round_index] for i in rows]
            subject.inject(ids, [states[i] for i in rows], [generators[i] for i in rows])
        answer(subject, batch, [s["chunks"][-1] for s in batch], states, "memory")

    def run_baselines(self, run: Run, batch: list[dict]) -> None:
        subject = run.subject
        if "no_injection" in run.baselines:
            answer(subject, batch, [sample["chunks"][-1] for sample in batch], None, "no_injection")
        if "in_context" in run.baselines:
            budget = [subject.max_positions - MAX_GEN[s["task"]] for s in batch]
            answer(subject, batch, [s["kept"][-limit:] for s, limit in zip(batch, budget)], None, "in_context")

    def aggregate(self, run: Run, samples: list[dict]) -> dict:
        metric = common.load_metric("qa_f1")
        results = {}
        for name in run.conditions:
            tasks = {}
            for task in dict.fromkeys(sample["task"] for sample in samples):
                rows = [s for s in samples if s["task"] == task]
                scores = metric.compute(predictions=[s[name] for s in rows], references=[s["answers"] for s in rows])
                tasks[task] = {**scores, "count": len(rows)}
            results[name] = {"tasks": tasks, "average_f1": common.mean(t["f1"] for t in tasks.values())}
        return results

    def public(self, run: Run, sample: dict) -> dict:
        visible = {key: value for key, value in sample.items() if key not in ("chunks", "kept")}
        return {**visible, "injected_chunks": len(sample["chunks"]) - 1}

    def config_extra(self, run: Run) -> dict:
        return {"max_gen": MAX_GEN}

    def summary(self, results: dict) -> None:
        for name, values in results["aggregates"].items():
            tasks = ", ".join(f"{task} {scores['f1']:.1f}" for task, scores in values["tasks"].items())
            print(f"{name}: average F1 {values['average_f1']:.1f} ({tasks})")

    def card_entries(self, results: dict, memory: dict) -> list[CardEntry]:
        split = "test" if not results["config"].get("data_files") else "local files"
        entries = []
        for task, scores in memory["tasks"].items():
            fields = {"dataset_type": "THUDM/LongBench", "dataset_name": f"LongBench {task}", "dataset_config": task}
            fields["dataset_split"] = split
            entries.append(CardEntry("Long-context QA", "f1", "QA F1 (x100)", scores["f1"], fields))
        return entries

    def plot(self, results: dict, path, title: str):
        aggregates = results["aggregates"]
        tasks = list(next(iter(aggregates.values()))["tasks"]) if aggregates else []
        series = {name: [values["tasks"][task]["f1"] for task in tasks] for name, values in aggregates.items()}
        return common.grouped_bars(tasks, series, "QA F1 (x100)", title, path)


BENCHMARK = LongBench()
main = BENCHMARK.main
