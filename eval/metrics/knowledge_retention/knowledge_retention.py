"""Knowledge-retention metric following the MemoryLLM paper's injection protocol.

A context is injected into the memory pool, then ``k`` unrelated contexts are injected, then the
model is asked a question about the first context. The metric reports answer accuracy grouped by
``k`` and, optionally, the mean teacher-forced negative log-likelihood of the gold answer.
"""

import math
import re
import string

import datasets
import evaluate


_CITATION = """\
@inproceedings{wang2024memoryllm,
  title     = {{MEMORYLLM}: Towards Self-Updatable Large Language Models},
  author    = {Wang, Yu and Gao, Yifan and Chen, Xiusi and Jiang, Haoming and Li, Shiyang and Yang, Jingfeng and
               Yin, Qingyu and Li, Zheng and Li, Xian and Yin, Bing and Shang, Jingbo and McAuley, Julian},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning},
  year      = {2024}
}
"""

_DESCRIPTION = """\
Knowledge retention of a memory-augmented language model. Each example is a question asked after the
relevant context was injected and then followed by `num_unrelated` unrelated injections. A prediction is
correct when any non-empty gold answer (stripped of surrounding whitespace) occurs as a substring of the
generated text. Matching is case-sensitive unless `normalize=True`, which applies SQuAD-style normalization
(lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace) to both sides first.
Accuracy is reported overall and per number of unrelated injections; when `answer_nll` is given, the mean
negative log-likelihood of the gold answer is reported as well.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): decoded generated answers, one per question.
    references (`list` of `list` of `str`): accepted gold answers for each question.
    num_unrelated (`list` of `int`): number of unrelated injections between the relevant context and the question.
    answer_nll (`list` of `float`, optional): mean per-token negative log-likelihood of the gold answer given the
        prompt (teacher-forced). `None` or NaN entries are skipped. It is a `compute` keyword, not an
        accumulated input: pass the full list to `compute`, not to `add_batch`.
    normalize (`bool`, defaults to `False`): apply SQuAD-style normalization before the substring test.
Returns:
    accuracy (`float`): fraction of questions answered correctly, in [0, 1].
    accuracy_by_k (`dict` of `int` to `float`): accuracy for each value of `num_unrelated`.
    count_by_k (`dict` of `int` to `int`): number of questions for each value of `num_unrelated`.
    nll_by_k (`dict` of `int` to `float`): mean `answer_nll` per value of `num_unrelated` (only with `answer_nll`).
    mean_nll (`float`): mean `answer_nll` over all questions (only with `answer_nll`).
Examples:
    >>> retention = evaluate.load("eval/metrics/knowledge_retention")
    >>> results = retention.compute(
    ...     predictions=["It was Paris.", "berlin", "No idea"],
    ...     references=[["Paris"], ["Berlin"], ["Rome"]],
    ...     num_unrelated=[0, 0, 5],
    ... )
    >>> results["accuracy_by_k"]
    {0: 0.5, 5: 0.0}
"""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text):
    """Lowercase, drop ASCII punctuation and English articles, and collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def is_retained(prediction, golds, normalize=False):
    """Whether any non-empty gold answer occurs inside the prediction."""
    if normalize:
        prediction, golds = normalize_text(prediction), [normalize_text(gold) for gold in golds]
    else:
        golds = [gold.strip() for gold in golds]
    return any(gold and gold in prediction for gold in golds)


def _mean(values):
    return sum(values) / len(values) if values else float("nan")


def _group_by_k(ks, values):
    groups = {}
    for k, value in zip(ks, values):
        groups.setdefault(k, []).append(value)
    return dict(sorted(groups.items()))


def _nll_summary(ks, answer_nll):
    if len(answer_nll) != len(ks):
        raise ValueError(f"answer_nll has {len(answer_nll)} entries but there are {len(ks)} predictions")
    kept = [(k, float(v)) for k, v in zip(ks, answer_nll) if v is not None and not math.isnan(v)]
    groups = _group_by_k([k for k, _ in kept], [v for _, v in kept])
    nll_by_k = {k: _mean(values) for k, values in groups.items()}
    return {"nll_by_k": nll_by_k, "mean_nll": _mean([v for _, v in kept])}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KnowledgeRetention(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                    "num_unrelated": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2402.04624"],
        )

    def _compute(self, predictions, references, num_unrelated, answer_nll=None, normalize=False):
        hits = [float(is_retained(p, golds, normalize)) for p, golds in zip(predictions, references)]
        groups = _group_by_k(num_unrelated, hits)
        results = {
            "accuracy": _mean(hits),
            "accuracy_by_k": {k: _mean(values) for k, values in groups.items()},
            "count_by_k": {k: len(values) for k, values in groups.items()},
        }
        if answer_nll is not None:
            results.update(_nll_summary(num_unrelated, answer_nll))
        return results
