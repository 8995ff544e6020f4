"""LongBench-style QA-F1 and exact match for free-form question answering."""

import functools
import re
import string
from collections import Counter

import datasets
import evaluate


_CITATION = """\
@inproceedings{bai2024longbench,
  title     = {{LongBench}: A Bilingual, Multitask Benchmark for Long Context Understanding},
  author    = {Bai, Yushi and Lv, Xin and Zhang, Jiajie and Lyu, Hongchang and Tang, Jiankai and Huang, Zhidian and
               Du, Zhengxiao and Liu, Xiao and Zeng, Aohan and Hou, Lei and Dong, Yuxiao and Tang, Jie and Li, Juanzi},
  booktitle = {Proceedings of the 62nd Annual Meeting of the Association for Computational Linguistics},
  year      = {2024}
}
@inproceedings{rajpurkar2016squad,
  title     = {{SQuAD}: 100,000+ Questions for Machine Comprehension of Text},
  author    = {Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle = {Proceedings of the 2016 Conference on Empirical Methods in Natural Language Processing},
  year      = {2016}
}
"""

_DESCRIPTION = """\
Token-level F1 and exact match between a generated answer and a set of gold answers, as used for the
English QA tasks of LongBench. Both strings are normalized (lowercase, drop ASCII punctuation, drop the
articles a/an/the, collapse whitespace) and split on whitespace. Each prediction takes the best score over
its gold answers; the corpus score is the mean over predictions, multiplied by 100. F1 equals LongBench's
`qa_f1_score` on every pair: a pair with no common token scores 0, also when both normalize to nothing (and
such a pair is no exact match either). `empty_match=True` instead scores a pair whose normalized prediction or
gold is empty 1 if both are empty and 0 otherwise, in both scores (SQuAD v2 convention).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated answers, one per question.
    references (`list` of `list` of `str`): accepted gold answers for each question.
    empty_match (`bool`, defaults to `False`): score a pair that both normalize to nothing 1 (SQuAD v2)
        instead of 0 (LongBench), in F1 and exact match. A `compute` keyword.
Returns:
    f1 (`float`): mean over questions of the best token-level F1 against any gold answer, in [0, 100].
    exact_match (`float`): percentage of questions whose normalized prediction equals a normalized gold answer.
Examples:
    >>> qa_f1 = evaluate.load("eval/metrics/qa_f1")
    >>> results = qa_f1.compute(predictions=["The Eiffel Tower."], references=[["Eiffel Tower", "tower"]])
    >>> results
    {'f1': 100.0, 'exact_match': 100.0}
"""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text):
    """Lowercase, drop ASCII punctuation and English articles, and collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction, gold, empty_match=False):
    """Token-level F1 between two answers after normalization: LongBench's `qa_f1_score` (0 without a common
    token, even when both are empty); with `empty_match`, 1 when both are empty (SQuAD v2)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if empty_match and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction, gold, empty_match=False):
    """Whether two answers are equal after normalization; two that normalize to nothing only with `empty_match`."""
    normalized = normalize_answer(prediction)
    return float(normalized == normalize_answer(gold) and (bool(normalized) or empty_match))


def _best(score_fn, prediction, golds):
    return max((score_fn(prediction, gold) for gold in golds), default=0.0)


def _percent_mean(values):
    return 100.0 * sum(values) / len(values) if values else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class QaF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/THUDM/LongBench", "https://arxiv.org/abs/2308.14508"],
        )

    def _compute(self, predictions, references, empty_match=False):
        pairs = list(zip(predictions, references))
        f1 = functools.partial(token_f1, empty_match=empty_match)
        em = functools.partial(exact_match, empty_match=empty_match)
        return {
            "f1": _percent_mean([_best(f1, p, golds) for p, golds in pairs]),
            "exact_match": _percent_mean([_best(em, p, golds) for p, golds in pairs]),
        }
