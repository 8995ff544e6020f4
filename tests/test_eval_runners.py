"""The `python -m eval` runners end to end on golden A (with a byte-level tokenizer built here) and the default model.

CPU only, tiny `--limit`s: output schema, PNG plots, determinism under a fixed seed, batched == unbatched memories,
the in-context-only path for a plain causal LM, the offline LongBench fixtures and the model-card writer.
"""

import json
import math
import os
import pathlib
import sys

import pytest
import torch

from tests.conftest import GOLDEN_A


pytest.importorskip("evaluate")
pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # these runs are many small ops

from eval import __main__ as eval_main  # noqa: E402
from eval import data  # noqa: E402
from eval.runners import common, longbench  # noqa: E402


ROOT = pathlib.Path(__file__).resolve().parents[1]
LONGBENCH_FILES = ROOT / "tests" / "data" / "longbench"
LONGBENCH_KEYS = {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}
CHECKPOINT = str(GOLDEN_A / "checkpoint")
if not data.data_dir().exists():  # no shared data folder: the small subsets in the same schemas shipped here
    os.environ["MEMORYLLM_DATA"] = str(ROOT / "tests" / "data" / "eval_data")
needs_data = pytest.mark.skipif(not data.data_dir().exists(), reason="no evaluation data")


def byte_tokenizer(vocab_size: int = 512):
    """Bytes as tokens 1..256 (no merges), `<s>` = 0, `<pad>` = 257, `</s>` = vocab_size - 1: golden A's ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, **{char: i + 1 for i, char in enumerate(alphabet)}, "<pad>": 257}
    vocab |= {f"<unused{i}>": i for i in range(258, vocab_size - 1)} | {"</s>": vocab_size - 1}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("byte_tokenizer")
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def golden_args(tokenizer_dir: str, out: pathlib.Path) -> list[str]:
    return ["--model", CHECKPOINT, "--tokenizer", tokenizer_dir, "--limit", "2", "--out", str(out), "--no-progress"]


def run_cli(argv: list[str], out: pathlib.Path) -> dict:
    assert eval_main.main(argv) == 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(out.read_text())


def without_timings(results: dict) -> dict:
    return {key: value for key, value in results.items() if key != "timings"}


def check_top_level(results: dict, benchmark: str) -> None:
    assert set(results) == {"benchmark", "config", "aggregates", "samples", "timings"}
    assert results["benchmark"] == benchmark
    assert results["config"]["seed"] == 0 and results["config"]["limit"] == 2
    assert results["timings"]["total_s"] >= 0


def check_output(output: dict) -> None:
    assert set(output) == {"prediction", "correct", "answer_nll"}
    assert isinstance(output["prediction"], str) and isinstance(output["correct"], bool)
    assert math.isfinite(output["answer_nll"]) and output["answer_nll"] > 0


# ------------------------------------------------------------------------------------------------------- retention
@needs_data
def test_retention_golden_schema_and_determinism(tokenizer_dir, tmp_path):
    results = []
    for run in ("a", "b"):
        out = tmp_path / f"retention-{run}.json"
        argv = ["retention", *golden_args(tokenizer_dir, out), "--ks", "0,1", "--max-answer-tokens", "12"]
        results.append(run_cli(argv, out))
    first = results[0]
    check_top_level(first, "retention-squad")
    assert without_timings(first) == without_timings(results[1])
    memory = first["aggregates"]["memory"]
    assert set(memory["accuracy_by_k"]) == set(memory["nll_by_k"]) == {"0", "1"}
    assert memory["count_by_k"] == {"0": 2, "1": 2}
    assert {"no_injection", "in_context"} <= set(first["aggregates"])
    assert len(first["samples"]) == 2
    for sample in first["samples"]:
        assert set(sample["memory"]) == {"0", "1"} and sample["context_tokens"] <= 512
        for output in [*sample["memory"].values(), sample["no_injection"], sample["in_context"]]:
            check_output(output)
    assert len(first["config"]["unrelated_context_tokens"]) == 1


@needs_data
def test_retention_batched_memories_match_one_at_a_time(tokenizer_dir, tmp_path):
    """Batched, the questions of one context share one memory of it (with the random drop of golden A's rule):
    the same outputs as one question at a time."""
    outputs = []
    for size in ("40", "1"):
        out = tmp_path / f"retention-batch{size}.json"
        argv = golden_args(tokenizer_dir, out) + ["--ks", "0,2", "--max-answer-tokens", "12", "--batch-size", size]
        outputs.append(run_cli(["retention", *argv, "--baselines", "none", "--limit", "40"], out)["samples"])
    contexts = [sample["context_index"] for sample in outputs[0]]
    assert len(set(contexts)) < len(contexts) and contexts == sorted(contexts)  # shared contexts, side by side
    for batched, single in zip(*outputs):
        for k in ("0", "2"):
            assert batched["memory"][k]["prediction"] == single["memory"][k]["prediction"]
            assert batched["memory"][k]["answer_nll"] == pytest.approx(single["memory"][k]["answer_nll"], abs=1e-4)


@needs_data
def test_retention_shared_unrelated_contexts_equal_injecting_them(tokenizer_dir, tmp_path, monkeypatch):
    """With a variant that writes each text on its own, the unrelated contexts are computed once: the same outputs
    as injecting them into every memory. (Contexts of 61 tokens: not a whole number of golden A's 8-token chunks,
    which would make every text continue the one before.)"""
    from eval.runners import retention, shared

    class Unshared(shared.SharedTexts):
        def _compute(self) -> None:
            self.enabled = False

    outputs = []
    for name, texts in (("shared", shared.SharedTexts), ("unshared", Unshared)):
        monkeypatch.setattr(retention, "SharedTexts", texts)
        out = tmp_path / f"retention-{name}.json"
        argv = golden_args(tokenizer_dir, out) + ["--ks", "0,1,3", "--max-answer-tokens", "12", "--baselines", "none"]
        options = '{"memory_variant": "training-free-ranked", "text_context": "own"}'
        argv += ["--memory-options", options, "--context-tokens", "61"]
        outputs.append(run_cli(["retention", *argv], out))
    assert outputs[0]["config"]["unrelated_chunk_writes"]["shared"] > 0
    assert outputs[1]["config"]["unrelated_chunk_writes"]["shared"] == 0
    for fast, slow in zip(outputs[0]["samples"], outputs[1]["samples"]):
        for k in ("0", "1", "3"):
            assert fast["memory"][k]["prediction"] == slow["memory"][k]["prediction"]
            assert fast["memory"][k]["answer_nll"] == pytest.approx(slow["memory"][k]["answer_nll"], abs=1e-4)


@needs_data
def test_retention_plain_causal_lm_runs_the_baselines_only(tokenizer_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0, eos_token_id=511, pad_token_id=257,
    )  # fmt: skip
    folder = tmp_path / "plain-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out = tmp_path / "plain.json"
    argv = ["--model", str(folder), "--limit", "2", "--ks", "0,1", "--max-answer-tokens", "12", "--out", str(out)]
    results = run_cli(["retention", *argv, "--no-progress"], out)
    assert results["config"]["memory_model"] is False and results["config"]["model_name"] == "plain-llama"
    assert set(results["aggregates"]) == {"no_injection", "in_context"}
    assert all("memory" not in sample for sample in results["samples"])


@pytest.fixture(scope="module")
def default_model_cache(tmp_path_factory):
    from modeling_memoryllm import default

    try:
        default.default_gguf_path()
    except default.DefaultModelMissing as error:
        pytest.skip(str(error))
    if not os.environ.get("MEMORYLLM_CACHE"):  # first load converts the GGUF (~40 s), then reads the copy
        os.environ["MEMORYLLM_CACHE"] = str(tmp_path_factory.mktemp("memoryllm_cache"))
    return os.environ["MEMORYLLM_CACHE"]


@needs_data
def test_retention_default_model(default_model_cache, tmp_path):
    out = tmp_path / "retention-default.json"
    argv = ["retention", "--model", "default", "--limit", "2", "--ks", "0,1", "--out", str(out), "--no-progress"]
    results = run_cli(argv, out)
    check_top_level(results, "retention-squad")
    config = results["config"]
    assert config["model_name"] == common.DEFAULT_NAME and config["memory_model"] and config["max_answer_tokens"] == 3
    for sample in results["samples"]:
        for output in [*sample["memory"].values(), sample["no_injection"], sample["in_context"]]:
            check_output(output)
    assert set(results["aggregates"]["memory"]["accuracy_by_k"]) == {"0", "1"}


# --------------------------------------------------------------------------------------------------------- editing
@needs_data
@pytest.mark.parametrize("dataset", ["counterfact", "zsre"])
def test_editing_golden_schema_and_determinism(dataset, tokenizer_dir, tmp_path):
    results = []
    for run in ("a", "b"):
        out = tmp_path / f"editing-{run}.json"
        results.append(run_cli(["editing", *golden_args(tokenizer_dir, out), "--dataset", dataset], out))
    first = results[0]
    check_top_level(first, f"editing-{dataset}")
    assert without_timings(first) == without_timings(results[1])
    assert set(first["aggregates"]) == {"memory", "no_injection", "in_context"}
    for scores in first["aggregates"].values():
        assert set(scores) == {"efficacy", "generalization", "specificity", "score"}
        assert all(0 <= value <= 100 for value in scores.values())
    for sample in first["samples"]:
        assert sample["fact"] and {c["kind"] for c in sample["checks"]} == {"rewrite", "paraphrase", "neighborhood"}
        for name in ("memory", "no_injection", "in_context"):
            assert all(0 <= sample[name][kind] <= 1 for kind in ("rewrite", "paraphrase", "neighborhood"))


# ------------------------------------------------------------------------------------------------------- longbench
def test_longbench_fixtures_follow_the_schema():
    for task in data.LONGBENCH_TASKS:
        records = data.longbench_records(task, str(LONGBENCH_FILES))
        assert len(records) == 2
        for record in records:
            assert set(record) == LONGBENCH_KEYS and record["dataset"] == task and record["language"] == "en"
            assert record["answers"] and record["length"] == len(record["context"].split())


def test_chunks_are_counted_from_the_end():
    ids = list(range(1100))
    chunks = longbench.chunks_from_end(ids, 512)
    assert [len(chunk) for chunk in chunks] == [76, 512, 512] and sum(chunks, []) == ids
    assert longbench.chunks_from_end(ids[:512], 512) == [ids[:512]]
    assert longbench.chunks_from_end(ids[:3], 512) == [ids[:3]]


def test_longbench_golden_offline_schema_and_determinism(tokenizer_dir, tmp_path):
    results = []
    for run in ("a", "b"):
        out = tmp_path / f"longbench-{run}.json"
        argv = golden_args(tokenizer_dir, out) + ["--data-files", str(LONGBENCH_FILES), "--max-length", "1100"]
        results.append(run_cli(["longbench", *argv], out))
    first = results[0]
    check_top_level(first, "longbench")
    assert without_timings(first) == without_timings(results[1])
    for name in ("memory", "no_injection", "in_context"):
        assert set(first["aggregates"][name]["tasks"]) == set(data.LONGBENCH_TASKS)
        assert all(scores["count"] == 2 for scores in first["aggregates"][name]["tasks"].values())
    assert len(first["samples"]) == 12
    for sample in first["samples"]:
        assert sample["kept_tokens"] <= 1100 - longbench.MAX_GEN[sample["task"]]
        assert sample["injected_chunks"] >= 1
        assert all(isinstance(sample[name], str) for name in ("memory", "no_injection", "in_context"))


# ------------------------------------------------------------------------------------------------------ card, main
def test_card_writes_the_model_index(tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    source = ROOT / "hub_configs" / "smollm2-135m-memoryllm" / "README.md"
    card_path = tmp_path / "smollm2-135m-memoryllm" / "README.md"
    card_path.parent.mkdir()
    card_path.write_text(source.read_text())
    retention = {
        "benchmark": "retention-squad",
        "config": {"split": "dev", "max_answer_tokens": 3},
        "aggregates": {
            "memory": {"accuracy_by_k": {"0": 0.25, "1": 0.125}, "nll_by_k": {"0": 4.5, "1": 5.25}},
            "no_injection": {"accuracy": 0.0},
        },
        "samples": [{}] * 8,
    }
    editing = {
        "benchmark": "editing-zsre",
        "config": {"split": "heldout"},
        "aggregates": {"memory": {"efficacy": 50.0, "generalization": 40.0, "specificity": 90.0, "score": 52.0}},
    }
    paths = []
    for name, results in (("retention", retention), ("editing", editing)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(results))
    for _ in range(2):  # a second run replaces the entries instead of adding more
        assert eval_main.main(["card", *map(str, paths), "--card", str(card_path)]) == 0
    card = huggingface_hub.ModelCard.load(card_path)
    index = card.data.to_dict()["model-index"]
    assert index[0]["name"] == "smollm2-135m-memoryllm"
    published = len(huggingface_hub.ModelCard.load(source).data.eval_results or [])  # the card's own part-b results
    entries = card.data.eval_results[published:]  # kept first; the new ones (other splits or datasets) after them
    assert len(card.data.eval_results) == published + 8
    assert {entry.task_type for entry in entries} == {"text-generation"}
    nll = [entry for entry in entries if entry.metric_type == "nll"]
    assert [(entry.metric_value, entry.dataset_split) for entry in nll] == [(4.5, "part-a"), (5.25, "part-a")]
    first = entries[0]
    assert (first.dataset_type, first.dataset_split, first.metric_type, first.metric_value) == (
        "rajpurkar/squad_v2",
        "part-a",
        "accuracy",
        25.0,
    )
    assert entries[-1].dataset_split == "part-b" and entries[-1].metric_value == 52.0
    assert first.dataset_args == {"max_answer_tokens": 3} and first.metric_args == {"samples": 8}
    assert card.text == huggingface_hub.ModelCard.load(source).text
    longer = {**retention, "config": {"split": "dev", "max_answer_tokens": 6}}  # other questions replace them all
    paths[0].write_text(json.dumps({**longer, "aggregates": {"memory": {"accuracy_by_k": {"0": 0.5}}}}))
    assert eval_main.main(["card", str(paths[0]), "--card", str(card_path)]) == 0
    results = huggingface_hub.ModelCard.load(card_path).data.eval_results
    part_a = [(e.dataset_args, e.metric_value) for e in results if e.dataset_split == "part-a"]
    assert part_a == [({"max_answer_tokens": 6}, 50.0)] and len(results) == published + 4 + 1


def test_the_published_model_index_is_what_the_committed_part_b_results_give():
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from eval.runners import card

    results = ROOT / "eval" / "results" / "issue17"
    files = [results / f"retention-{name}-default-heldout-answers6.json" for name in ("squad", "nq")]
    expected = [entry for path in files for entry in card.eval_results(json.loads(path.read_text()))]
    source = ROOT / "hub_configs" / "smollm2-135m-memoryllm" / "README.md"
    published = huggingface_hub.ModelCard.load(source).data.eval_results

    def entry(result) -> str:
        fields = ("dataset_type", "dataset_split", "dataset_args", "metric_name", "metric_value", "metric_args")
        return repr([getattr(result, field) for field in fields])

    assert len(expected) == 24 and sorted(map(entry, published)) == sorted(map(entry, expected))


def test_main_dispatch(monkeypatch, capsys):
    assert eval_main.main(["--help"]) == 0
    assert eval_main.main(["nonsense"]) == 2
    seen = []

    class FakeBench:
        @staticmethod
        def main(argv):
            seen.append(argv)
            return 0

    monkeypatch.setitem(sys.modules, "eval.bench", FakeBench)
    monkeypatch.setitem(sys.modules, "eval.bench.run", FakeBench)
    assert eval_main.main(["bench", "--quick"]) == 0
    assert seen == [["--quick"]]


@needs_data
def test_retention_shards_merge_into_the_whole_run(tokenizer_dir, tmp_path):
    """`--offset` shards of one run, merged by `eval merge`: the samples and aggregates of the run in one go."""
    argv = ["--ks", "0,1", "--max-answer-tokens", "12", "--batch-size", "3"]
    whole = run_cli(
        ["retention", *golden_args(tokenizer_dir, tmp_path / "whole.json"), *argv, "--limit", "5"],
        tmp_path / "whole.json",
    )
    shards = []
    for offset, limit in ((0, 2), (2, 3)):
        out = tmp_path / f"shard{offset}.json"
        shard_argv = [*golden_args(tokenizer_dir, out), *argv, "--offset", str(offset), "--limit", str(limit)]
        shards.append(run_cli(["retention", *shard_argv], out))
        assert len(shards[-1]["samples"]) == limit
    out = tmp_path / "merged.json"
    assert (
        eval_main.main(["merge", str(tmp_path / "shard0.json"), str(tmp_path / "shard2.json"), "--out", str(out)]) == 0
    )
    merged = json.loads(out.read_text())
    assert out.with_suffix(".png").exists()
    merged_samples = sorted(merged["samples"], key=lambda sample: sample["id"])
    assert [s["id"] for s in merged_samples] == sorted(s["id"] for s in whole["samples"])
    for got, want in zip(merged_samples, sorted(whole["samples"], key=lambda sample: sample["id"])):
        for k in ("0", "1"):  # other batches: the same tokens, scores equal up to padding's rounding
            assert got["memory"][k]["prediction"] == want["memory"][k]["prediction"]
            assert got["memory"][k]["answer_nll"] == pytest.approx(want["memory"][k]["answer_nll"], abs=1e-5)
    for condition in ("memory", "no_injection", "in_context"):
        got, want = merged["aggregates"][condition], whole["aggregates"][condition]
        assert got["accuracy_by_k"] == want["accuracy_by_k"] and got["count_by_k"] == want["count_by_k"]
        assert got["nll_by_k"] == pytest.approx(want["nll_by_k"], abs=1e-5)
    assert merged["config"]["limit"] == 5 and merged["config"]["shard_limits"] == [2, 3]
    with pytest.raises(ValueError, match="overlap"):
        eval_main.main(["merge", str(tmp_path / "shard0.json"), str(tmp_path / "shard0.json"), "--out", str(out)])


def test_retention_subset_of_shorter_answers_is_the_run_with_that_limit(tokenizer_dir, tmp_path):
    """`eval subset --max-answer-tokens 8` of a whole run at 14 gives the questions, outputs and aggregates of the run
    at 8 (the fixture data: every eligible question fits in the limit)."""
    argv = ["--data-dir", str(ROOT / "tests" / "data" / "eval_data"), "--ks", "0,1", "--batch-size", "4"]
    runs = {}
    for tokens in (14, 8):
        out = tmp_path / f"run{tokens}.json"
        runs[tokens] = run_cli(["retention", *golden_args(tokenizer_dir, out), *argv, "--limit", "1000",
                                "--max-answer-tokens", str(tokens)], out)  # fmt: skip
    out = tmp_path / "subset.json"
    assert eval_main.main(["subset", str(tmp_path / "run14.json"), "--max-answer-tokens", "8", "--out", str(out)]) == 0
    cut, direct = json.loads(out.read_text()), runs[8]
    assert 0 < len(direct["samples"]) < len(runs[14]["samples"])  # the limit leaves some questions out
    assert sorted(s["id"] for s in cut["samples"]) == sorted(s["id"] for s in direct["samples"])
    by_id = {s["id"]: s for s in direct["samples"]}
    for sample in cut["samples"]:
        assert sample["memory"]["1"]["prediction"] == by_id[sample["id"]]["memory"]["1"]["prediction"]
    for condition in ("memory", "no_injection", "in_context"):
        got, want = cut["aggregates"][condition], direct["aggregates"][condition]
        assert got["accuracy_by_k"] == want["accuracy_by_k"] and got["count_by_k"] == want["count_by_k"]
        assert got["nll_by_k"] == pytest.approx(want["nll_by_k"], abs=1e-5)
    assert cut["config"]["max_answer_tokens"] == 8 and cut["config"]["subset_of"]["max_answer_tokens"] == 14
    assert out.with_suffix(".png").exists()
    with pytest.raises(ValueError, match="not 20"):
        eval_main.main(["subset", str(tmp_path / "run14.json"), "--max-answer-tokens", "20", "--out", str(out)])
    limited = tmp_path / "limited.json"
    run_cli(["retention", *golden_args(tokenizer_dir, limited), *argv, "--max-answer-tokens", "14"], limited)
    with pytest.raises(ValueError, match="left questions out"):
        eval_main.main(["subset", str(limited), "--max-answer-tokens", "8", "--out", str(out)])


@needs_data
def test_retention_texts_in_prompt_baseline_holds_the_k_texts(tokenizer_dir, tmp_path, monkeypatch):
    """`texts_in_prompt`: at every k, the context, the first k unrelated contexts and the question in one prompt."""
    from eval.runners import retention

    asked = []
    real_ask = retention.ask

    def recording_ask(subject, batch, memory, args, prompt_key="prompt_ids"):
        if prompt_key == "k_prompt_ids":
            asked.append([sample[prompt_key] for sample in batch])
        return real_ask(subject, batch, memory, args, prompt_key)

    monkeypatch.setattr(retention, "ask", recording_ask)
    out = tmp_path / "texts.json"
    argv = [*golden_args(tokenizer_dir, out), "--ks", "0,2", "--max-answer-tokens", "12"]
    results = run_cli(["retention", *argv, "--baselines", "texts_in_prompt,in_context"], out)
    texts = results["aggregates"]["texts_in_prompt"]
    assert texts["count_by_k"] == {"0": 2, "2": 2}
    assert all(math.isfinite(nll) for nll in texts["nll_by_k"].values())
    lengths = [[len(row) for row in rows] for rows in asked]  # per k, per sample
    extra = sum(
        results["config"]["unrelated_context_tokens"][:2]
    )  # the two unrelated contexts' framed tokens, at least
    assert all(with_texts - alone >= extra for alone, with_texts in zip(lengths[0], lengths[1]))
    for sample in results["samples"]:
        check_output(sample["texts_in_prompt"]["2"])
