"""Benchmark data: SQuAD v2 and NQ (retention), CounterFact and zsRE (editing), LongBench (long-context QA).

Files come from the shared data folder (`--data-dir`, else `$MEMORYLLM_DATA`, else `data` in `$MEMORYLLM_SHARED`,
else `../shared/data`: see `paths.py`). Development uses part-a; `split="heldout"` uses the held-out part-b files.
"""

import gzip
import json
import pathlib

from .paths import data_dir


SPLITS = ("dev", "heldout")
FILES = {
    ("squad", "dev"): "squad_v2/dev-v2.0.part-a.json",
    ("squad", "heldout"): "squad_v2/dev-v2.0.part-b.json",
    ("nq", "dev"): "nq/nq-open-oracle.part-a.jsonl.gz",
    ("nq", "heldout"): "nq/nq-open-oracle.part-b.jsonl.gz",
    ("counterfact", "dev"): "counterfact/counterfact-train.json.gz",
    ("counterfact", "heldout"): "counterfact/counterfact-val.json.gz",
    ("zsre", "dev"): "zsre/zsre-mend-train.part-a.json",
    ("zsre", "heldout"): "zsre/zsre-mend-train.part-b.json",
}
LONGBENCH_TASKS = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique")


def data_file(dataset: str, split: str, directory: str | None = None) -> pathlib.Path:
    path = data_dir(directory) / FILES[dataset, split]
    if not path.exists():
        settings = "--data-dir, MEMORYLLM_DATA or MEMORYLLM_SHARED"
        raise FileNotFoundError(f"no {dataset} {split} data at {path} (set {settings})")
    return path


def read_json(path: pathlib.Path):
    """A `.json`, `.json.gz`, `.jsonl` or `.jsonl.gz` file (JSON lines as a list)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        if ".jsonl" in path.suffixes:
            return [json.loads(line) for line in handle if line.strip()]
        return json.load(handle)


# ------------------------------------------------------------------------------------------------------ retention
def squad_records(path: pathlib.Path) -> list[dict]:
    """Answerable SQuAD v2 questions: `{"id", "question", "context", "answers"}` (answers deduplicated, in order)."""
    records = []
    for article in read_json(path)["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = _unique(a["text"] for a in qa["answers"])
                if qa.get("is_impossible") or not answers:
                    continue
                records.append(
                    {"id": qa["id"], "question": qa["question"], "context": paragraph["context"], "answers": answers}
                )
    return records


def nq_records(path: pathlib.Path) -> list[dict]:
    """NQ-open questions with their gold passage: `{"id", "question", "context", "answers"}`."""
    records = []
    for index, row in enumerate(read_json(path)):
        gold = [ctx for ctx in row["ctxs"] if ctx.get("isgold")]
        answers = _unique(row["answers"])
        if gold and answers:
            record = {"question": row["question"], "context": gold[0]["text"], "answers": answers}
            records.append({"id": f"nq-{index}", **record})
    return records


def retention_records(dataset: str, split: str, directory: str | None = None) -> list[dict]:
    path = data_file(dataset, split, directory)
    return squad_records(path) if dataset == "squad" else nq_records(path)


def _unique(texts) -> list[str]:
    seen = []
    for text in texts:
        text = text.strip()
        if text and text not in seen:
            seen.append(text)
    return seen


# -------------------------------------------------------------------------------------------------------- editing
def editing_records(dataset: str, split: str, directory: str | None = None) -> list[dict]:
    """CounterFact (EasyEdit layout) or zsRE (MEND layout) records, as stored."""
    return list(read_json(data_file(dataset, split, directory)))


# ------------------------------------------------------------------------------------------------------ longbench
def longbench_records(task: str, data_files: str | None = None) -> list[dict]:
    """One LongBench task: from `data_files/<task>.jsonl` when given, else `THUDM/LongBench` through `datasets`."""
    if data_files:
        path = pathlib.Path(data_files) / f"{task}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"no LongBench file {path}")
        return read_json(path)
    try:  # online only: LongBench is not stored offline
        import datasets

        return list(datasets.load_dataset("THUDM/LongBench", task, split="test"))
    except Exception as error:  # any loading failure: point to local files
        raise FileNotFoundError(
            f"could not load LongBench {task} through `datasets` ({error}); pass --data-files DIR with {task}.jsonl"
        ) from error
