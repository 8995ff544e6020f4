"""Hand-checked cases for the evaluate metrics under eval/metrics (CPU only, no model)."""

import math
import os
import pathlib
import re
import string
from collections import Counter


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_EVALUATE_OFFLINE"] = "1"

import pytest  # noqa: E402


evaluate = pytest.importorskip("evaluate")

METRICS = pathlib.Path(__file__).resolve().parents[1] / "eval" / "metrics"


def _load(name):
    return evaluate.load(str(METRICS / name))


@pytest.fixture(scope="module")
def retention():
    return _load("knowledge_retention")


@pytest.fixture(scope="module")
def qa_f1():
    return _load("qa_f1")


@pytest.fixture(scope="module")
def editing():
    return _load("knowledge_editing")


def _retain(metric, predictions, references, ks=None, **kwargs):
    ks = [0] * len(predictions) if ks is None else ks
    return metric.compute(predictions=predictions, references=references, num_unrelated=ks, **kwargs)


# --- knowledge_retention -------------------------------------------------------------------------------------


def test_retention_default_is_case_sensitive_and_strips_gold(retention):
    predictions = ["It is Zürich.", "zürich", "東京です", "Answer: Tokyo"]
    references = [["Zürich"], ["Zürich"], ["東京"], ["tokyo", " Tokyo "]]
    result = _retain(retention, predictions, references, ks=[0, 0, 1, 1])
    assert result == {"accuracy": 0.75, "accuracy_by_k": {0: 0.5, 1: 1.0}, "count_by_k": {0: 2, 1: 2}}


def test_retention_normalize_ignores_case_and_punctuation(retention):
    predictions = ["zürich", "It's the U.S.A.!", "Answer: Tokyo"]
    references = [["Zürich"], ["USA"], ["tokyo"]]
    assert _retain(retention, predictions, references)["accuracy"] == pytest.approx(0.0)
    assert _retain(retention, predictions, references, normalize=True)["accuracy"] == 1.0


def test_retention_empty_gold_never_counts(retention):
    predictions = ["anything at all", "", "the answer", "the answer"]
    references = [["", "   "], [""], ["The"], ["the"]]
    assert _retain(retention, predictions, references)["accuracy"] == 0.25
    assert _retain(retention, predictions, references, normalize=True)["accuracy"] == 0.0


def test_retention_empty_prediction_and_several_golds(retention):
    predictions = ["", "The capital is Bern", "I think Geneva"]
    references = [["Bern"], ["Zurich", "Bern"], ["Zurich", "Bern"]]
    assert _retain(retention, predictions, references, ks=[2, 2, 2])["accuracy_by_k"] == {2: pytest.approx(1 / 3)}


def test_retention_groups_by_k(retention):
    predictions = ["yes", "yes", "no", "no", "yes", "no"]
    ks = [5, 0, 5, 2, 5, 0]
    result = _retain(retention, predictions, [["yes"]] * 6, ks=ks)
    assert result["accuracy"] == 0.5
    assert result["accuracy_by_k"] == {0: 0.5, 2: 0.0, 5: pytest.approx(2 / 3)}
    assert list(result["accuracy_by_k"]) == [0, 2, 5]
    assert result["count_by_k"] == {0: 2, 2: 1, 5: 3}


def test_retention_nll_summary_skips_missing(retention):
    nll = [1.0, 3.0, 5.0, None, float("nan")]
    result = _retain(retention, ["x"] * 5, [["x"]] * 5, ks=[0, 0, 1, 2, 2], answer_nll=nll)
    assert result["nll_by_k"] == {0: 2.0, 1: 5.0}
    assert result["mean_nll"] == 3.0
    plain = _retain(retention, ["x"], [["x"]])
    assert "nll_by_k" not in plain and "mean_nll" not in plain


def test_retention_nll_length_mismatch_raises(retention):
    with pytest.raises(ValueError, match="answer_nll"):
        _retain(retention, ["x", "y"], [["x"], ["y"]], answer_nll=[1.0])


def test_retention_add_batch_then_compute(retention):
    retention.add_batch(predictions=["Paris", "Rome"], references=[["Paris"], ["Paris"]], num_unrelated=[0, 1])
    retention.add_batch(predictions=["Rome"], references=[["Rome"]], num_unrelated=[1])
    result = retention.compute(answer_nll=[0.5, 2.5, 1.5])
    assert result["accuracy_by_k"] == {0: 1.0, 1: 0.5}
    assert result["nll_by_k"] == {0: 0.5, 1: 2.0}
    assert result["mean_nll"] == 1.5


# --- qa_f1 ---------------------------------------------------------------------------------------------------


def _qa(metric, prediction, golds, **options):
    return metric.compute(predictions=[prediction], references=[golds], **options)


def longbench_qa_f1_score(prediction, ground_truth):
    """LongBench's `qa_f1_score` (THUDM/LongBench, metrics.py), written again here from its definition."""

    def normalize_answer(text):
        text = text.lower()
        text = "".join(ch for ch in text if ch not in set(string.punctuation))
        text = re.sub(r"\b(a|an|the)\b", " ", text)
        return " ".join(text.split())

    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


TRICKY_QA = [
    ("", ""),
    ("", "The"),
    ("the", "a"),
    ("...", "!!!"),
    ("An  a THE", ""),
    ("", "Rome"),
    ("Rome", ""),
    ("Rome", "the"),
    ("The Eiffel Tower.", "Eiffel Tower"),
    ("the cat cat sat", "A cat sat on the mat"),
    ("cat cat cat", "cat"),
    ("theatre", "the atre"),
    ("U.S.A.", "USA"),
    ("don't", "dont"),
    ("anthem", "an them"),
    ("Zürich", "zürich"),
    ("ZÜRICH", "zürich"),
    ("東京 タワー", "東京"),
    ("東京。", "東京"),
    ("tab\tand\nnewline", "tab and newline"),
    ("\u00a0Paris\u00a0", "Paris"),
    ("Paris, France", "paris"),
    ("1,000", "1000"),
    ("yes", "Yes."),
    ("a-b c", "ab c"),
    ("The The the", "the"),
    ("İstanbul", "istanbul"),
]


def test_qa_exact_after_normalization(qa_f1):
    assert _qa(qa_f1, "The Eiffel Tower.", ["Eiffel Tower"]) == {"f1": 100.0, "exact_match": 100.0}
    assert _qa(qa_f1, "PARIS!!!", ["paris"]) == {"f1": 100.0, "exact_match": 100.0}


def test_qa_max_over_several_golds(qa_f1):
    result = _qa(qa_f1, "Paris France", ["Lyon", "Paris", "Lyon France"])
    assert result["f1"] == pytest.approx(200 / 3)
    assert result["exact_match"] == 0.0


def test_qa_token_multiplicity(qa_f1):
    # "cat cat sat" vs "cat sat on mat": overlap 2, precision 2/3, recall 1/2, F1 4/7.
    result = _qa(qa_f1, "the cat cat sat", ["A cat sat on the mat"])
    assert result["f1"] == pytest.approx(400 / 7)


def test_qa_empty_prediction(qa_f1):
    assert _qa(qa_f1, "", ["Rome"]) == {"f1": 0.0, "exact_match": 0.0}
    assert _qa(qa_f1, "...", ["Rome"]) == {"f1": 0.0, "exact_match": 0.0}
    assert _qa(qa_f1, "", ["The", "Rome"], empty_match=True) == {"f1": 100.0, "exact_match": 100.0}
    assert _qa(qa_f1, "Rome", ["the"]) == {"f1": 0.0, "exact_match": 0.0}
    assert _qa(qa_f1, "Rome", ["the"], empty_match=True) == {"f1": 0.0, "exact_match": 0.0}


def test_qa_both_empty_after_normalization_score_zero_as_in_longbench(qa_f1):
    for prediction, gold in [("", ""), ("", "The"), ("the", "a"), ("...", "!!!"), ("An  a THE", "")]:
        assert longbench_qa_f1_score(prediction, gold) == 0
        assert _qa(qa_f1, prediction, [gold]) == {"f1": 0.0, "exact_match": 0.0}
        assert _qa(qa_f1, prediction, [gold], empty_match=True) == {"f1": 100.0, "exact_match": 100.0}
    assert _qa(qa_f1, "", ["The", "Rome"]) == {"f1": 0.0, "exact_match": 0.0}


@pytest.mark.parametrize(("prediction", "gold"), TRICKY_QA)
def test_qa_f1_equals_longbench_qa_f1_score(qa_f1, prediction, gold):
    expected = 100.0 * longbench_qa_f1_score(prediction, gold)
    assert _qa(qa_f1, prediction, [gold])["f1"] == pytest.approx(expected, abs=1e-12)


def test_qa_f1_corpus_equals_longbench_scoring(qa_f1):
    """LongBench's scorer: per prediction the max over its golds (from 0), then the mean x 100."""
    predictions = [prediction for prediction, _ in TRICKY_QA]
    references = [[gold, "Rome"] for _, gold in TRICKY_QA[::-1]]
    expected = [max([0.0] + [longbench_qa_f1_score(p, g) for g in golds]) for p, golds in zip(predictions, references)]
    result = qa_f1.compute(predictions=predictions, references=references)
    assert result["f1"] == pytest.approx(100 * sum(expected) / len(expected), abs=1e-12)


def test_qa_unicode(qa_f1):
    assert _qa(qa_f1, "Zürich", ["zürich"]) == {"f1": 100.0, "exact_match": 100.0}
    assert _qa(qa_f1, "東京", ["東京都"]) == {"f1": 0.0, "exact_match": 0.0}
    assert _qa(qa_f1, "東京 タワー", ["東京"])["f1"] == pytest.approx(200 / 3)


def test_qa_corpus_mean(qa_f1):
    predictions = ["The Eiffel Tower.", "Paris France", ""]
    references = [["Eiffel Tower"], ["Paris", "Lyon"], ["Rome"]]
    result = qa_f1.compute(predictions=predictions, references=references)
    assert result["f1"] == pytest.approx(500 / 9)
    assert result["exact_match"] == pytest.approx(100 / 3)


# --- knowledge_editing ---------------------------------------------------------------------------------------


def _edit(metric, rewrite, paraphrase, neighborhood):
    return metric.compute(rewrite_success=rewrite, paraphrase_success=paraphrase, neighborhood_success=neighborhood)


def test_editing_counterfact_scores(editing):
    result = _edit(editing, [1, 1], [1.0, 0.5], [0.5, 0.5])
    assert result["efficacy"] == 100.0
    assert result["generalization"] == 75.0
    assert result["specificity"] == 50.0
    assert result["score"] == pytest.approx(900 / 13)


def test_editing_zero_component_gives_zero_score(editing):
    result = _edit(editing, [1, 0], [0.0, 0.0], [1.0, 1.0])
    assert result == {"efficacy": 50.0, "generalization": 0.0, "specificity": 100.0, "score": 0.0}


def test_editing_zsre_accuracies_and_bools(editing):
    result = _edit(editing, [0.5, 0.25], [0.2, 0.4], [1.0, 0.8])
    assert result["efficacy"] == pytest.approx(37.5)
    assert result["generalization"] == pytest.approx(30.0)
    assert result["specificity"] == pytest.approx(90.0)
    assert result["score"] == pytest.approx(2700 / 64)
    booleans = _edit(editing, [True, False, True, True], [1, 1, 1, 1], [1, 1, 1, 1])
    assert booleans["efficacy"] == 75.0
    assert booleans["score"] == pytest.approx(3 / (1 / 75 + 2 / 100))


def test_editing_equal_components(editing):
    result = _edit(editing, [0.6], [0.6], [0.6])
    assert result["score"] == pytest.approx(60.0)
    assert not math.isnan(result["score"])


def test_editing_rejects_out_of_range(editing):
    with pytest.raises(ValueError, match="rewrite_success"):
        _edit(editing, [1.5], [0.5], [0.5])
