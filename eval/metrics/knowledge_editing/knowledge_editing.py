"""ROME-style knowledge-editing scores: efficacy, generalization, specificity and their harmonic mean."""

import datasets
import evaluate


_CITATION = """\
@inproceedings{meng2022locating,
  title     = {Locating and Editing Factual Associations in {GPT}},
  author    = {Meng, Kevin and Bau, David and Andonian, Alex and Belinkov, Yonatan},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {35},
  year      = {2022}
}
"""

_DESCRIPTION = """\
Aggregates per-edit success indicators into the scores reported by ROME (and MemoryLLM's editing
experiments). Efficacy is the mean success on the edit prompt itself, generalization the mean success on
paraphrased prompts, and specificity the mean success on neighbourhood prompts, where success means the
original (true) fact is still preferred. All three are percentages; the overall score is their harmonic
mean, which is 0 as soon as any component is 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    rewrite_success (`list` of `float`): per edit, 1/0 whether the new target is more probable than the old one
        on the edit prompt (CounterFact), or the teacher-forced token accuracy of the new target in [0, 1] (zsRE).
    paraphrase_success (`list` of `float`): per edit, the fraction of paraphrase prompts where the new target is
        more probable than the old one (CounterFact), or the rephrase token accuracy (zsRE), in [0, 1].
    neighborhood_success (`list` of `float`): per edit, the fraction of neighbourhood prompts where the old (true)
        target stays more probable than the new one (CounterFact), or the locality accuracy (zsRE), in [0, 1].
Returns:
    efficacy (`float`): mean of `rewrite_success` times 100.
    generalization (`float`): mean of `paraphrase_success` times 100.
    specificity (`float`): mean of `neighborhood_success` times 100.
    score (`float`): harmonic mean of the three percentages, 0 if any of them is 0.
Examples:
    >>> editing = evaluate.load("eval/metrics/knowledge_editing")
    >>> results = editing.compute(
    ...     rewrite_success=[1, 1], paraphrase_success=[1.0, 0.5], neighborhood_success=[0.5, 0.5]
    ... )
    >>> {name: round(value, 2) for name, value in results.items()}
    {'efficacy': 100.0, 'generalization': 75.0, 'specificity': 50.0, 'score': 69.23}
"""

_COLUMNS = ("rewrite_success", "paraphrase_success", "neighborhood_success")


def _percent_mean(name, values):
    values = [float(v) for v in values]
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{name} values must lie in [0, 1]")
    return 100.0 * sum(values) / len(values) if values else 0.0


def harmonic_mean(values):
    """Harmonic mean of non-negative numbers; 0 when any of them is 0."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KnowledgeEditing(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({name: datasets.Value("float64") for name in _COLUMNS}),
            reference_urls=["https://arxiv.org/abs/2202.05262", "https://rome.baulab.info/"],
        )

    def _compute(self, rewrite_success, paraphrase_success, neighborhood_success):
        efficacy = _percent_mean("rewrite_success", rewrite_success)
        generalization = _percent_mean("paraphrase_success", paraphrase_success)
        specificity = _percent_mean("neighborhood_success", neighborhood_success)
        return {
            "efficacy": efficacy,
            "generalization": generalization,
            "specificity": specificity,
            "score": harmonic_mean([efficacy, generalization, specificity]),
        }
