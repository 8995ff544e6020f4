"""`python -m eval subset RESULT.json --max-answer-tokens N --out SUBSET.json`: a retention run's questions with
shorter answers, as the run with `--max-answer-tokens N` gives them.

Each question of a retention run is answered on its own (a fresh memory of its context, then the same fixed unrelated
contexts), so the questions of a run whose first gold answer has at most N tokens are the run at N, question for
question, when the run held every question it could (fewer samples than its `--limit`). The aggregates are computed
again by the benchmark's own `aggregate`, and the plot is written beside the result. The answers are counted with the
run's own tokenizer (`config.model` / `config.tokenizer`), as `retention.select` counts them.
"""

import argparse
import json
import pathlib

from ..paths import COMMAND
from . import common
from .card import benchmark_of
from .merge import aggregates
from .retention import answer_ids


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{COMMAND} subset", description=__doc__.splitlines()[0])
    parser.add_argument("result", help="a retention result JSON that held every question it could")
    parser.add_argument("--max-answer-tokens", type=int, required=True, help="keep answers of at most this many tokens")
    parser.add_argument("--out", required=True, help="result JSON of the subset (a PNG plot is written beside it)")
    return parser


def subset(results: dict, max_answer_tokens: int, count_tokens) -> dict:
    """`results` (a retention result) cut to the questions whose first gold answer has at most `max_answer_tokens`
    tokens (`count_tokens(answer)`)."""
    config = results["config"]
    if not results["benchmark"].startswith("retention-"):
        raise ValueError(f"only retention results have answer lengths to select by, not {results['benchmark']}")
    if max_answer_tokens > config["max_answer_tokens"]:
        raise ValueError(
            f"the run kept answers of at most {config['max_answer_tokens']} tokens, not {max_answer_tokens}"
        )
    if config.get("offset") or (config.get("limit") is not None and len(results["samples"]) >= config["limit"]):
        raise ValueError("the run may have left questions out (an --offset, or its --limit reached): run it whole")
    samples = [s for s in results["samples"] if count_tokens(s["answers"][0]) <= max_answer_tokens]
    source = {"max_answer_tokens": config["max_answer_tokens"], "samples": len(results["samples"])}
    new_config = {**config, "max_answer_tokens": max_answer_tokens, "limit": len(samples), "subset_of": source}
    return {**results, "config": new_config, "aggregates": aggregates(results, samples), "samples": samples}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = json.loads(pathlib.Path(args.result).read_text())
    config = results["config"]
    subject = common.load_subject(config["model"], config.get("tokenizer"), "cpu", "float32")
    cut = subset(results, args.max_answer_tokens, lambda answer: len(answer_ids(subject, answer)))
    path, png = benchmark_of(cut).write(cut, pathlib.Path(args.out))
    print(f"wrote {path} and {png} ({len(cut['samples'])} of the {len(results['samples'])} samples of {args.result})")
    return 0
