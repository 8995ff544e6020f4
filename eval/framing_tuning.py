"""Tuning the chat framing on part-a: run a benchmark with a candidate framing in place of the shipped one.

A candidate is a chat framing (`serving.Framing`) built from the tokenizer's template with its own system turn (or
the template's) and its own labels around the text and the question (`serving.chat_framing`). `system` is the shipped
`"chat"` framing, chosen here on part-a; `template` is the one shipped before it. The result JSON records the exact
strings (`config.framing_strings`). A question with no memory is the plain chat turn for every candidate (the part-a
runs in `eval/results/issue17/framing-part-a/` asked it under the candidate's own system turn, which is recorded
there as `plain_head`).

    python -m eval.framing_tuning --candidate bare retention --model default --dataset squad --split dev \
        --limit 150 --max-answer-tokens 6 --ks 0 --baselines in_context,no_injection --out bare-squad.json
"""

import argparse
from dataclasses import dataclass

from modeling_memoryllm import serving

from .__main__ import main as eval_main
from .runners import retention


@dataclass(frozen=True)
class Candidate:
    context_label: str = serving.CONTEXT_LABEL  # opens the injected text in the user turn
    question_label: str = serving.QUESTION_LABEL  # between the text and the question
    system: str | None = None  # None: the template's own system turn


CANDIDATES = {
    "template": Candidate(),  # the template's own system turn (shipped until the part-a runs below)
    "bare": Candidate(context_label="", question_label="\n\n"),  # the passage, a blank line, the question
    "sysbare": Candidate(context_label="", question_label="\n\n", system=serving.CONTEXT_QA_SYSTEM),
    "system": Candidate(system=serving.CONTEXT_QA_SYSTEM),  # the winner on part-a: shipped
}


def candidate_framing(tokenizer, candidate: Candidate) -> serving.Framing:
    """`candidate` as a chat framing for `tokenizer` (`serving.chat_framing`)."""
    return serving.chat_framing(tokenizer, candidate.system, candidate.context_label, candidate.question_label)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidate", choices=sorted(CANDIDATES), required=True)
    args, rest = parser.parse_known_args(argv)
    candidate = CANDIDATES[args.candidate]
    retention.framing_for = lambda tokenizer, name=None: candidate_framing(tokenizer, candidate)
    return eval_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
