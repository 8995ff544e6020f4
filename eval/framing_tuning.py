"""Tuning the chat framing on part-a: run a benchmark with a candidate framing in place of the shipped one.

A candidate is a chat framing (`serving.Framing`) built from the tokenizer's template with its own system turn (or
the template's) and its own labels around the text and the question. `current` is the shipped `"chat"` framing,
built the same way, so the candidates differ from it only in what they name. The result JSON records the exact
strings (`config.framing_strings`).

    python -m eval.framing_tuning --candidate bare retention --model default --dataset squad --split dev \
        --limit 150 --max-answer-tokens 6 --ks 0 --baselines in_context,no_injection --out bare-squad.json
"""

import argparse
from dataclasses import dataclass

from modeling_memoryllm import serving

from .__main__ import main as eval_main
from .runners import retention


CONTEXT_QA_SYSTEM = "You answer questions about a text. Answer briefly, using the text's own words."


@dataclass(frozen=True)
class Candidate:
    context_label: str = serving.CONTEXT_LABEL  # opens the injected text in the user turn
    question_label: str = serving.QUESTION_LABEL  # between the text and the question
    system: str | None = None  # None: the template's own system turn


CANDIDATES = {
    "current": Candidate(),
    "bare": Candidate(context_label="", question_label="\n\n"),  # the passage, a blank line, the question
    "sysbare": Candidate(context_label="", question_label="\n\n", system=CONTEXT_QA_SYSTEM),
    "system": Candidate(system=CONTEXT_QA_SYSTEM),
}


def user_turn_around(tokenizer, system: str | None) -> tuple[str, str]:
    """The prompt before and after a user message's content: `(<system turn><user opener>, <end of turn><assistant
    opener>)`."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": serving._SLOT})
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return serving._split_around_slot(prompt)


def candidate_framing(tokenizer, candidate: Candidate) -> serving.Framing:
    """`candidate` as a chat framing for `tokenizer` (laid out as `serving.framing_for` lays out `"chat"`)."""
    head, tail = user_turn_around(tokenizer, candidate.system)
    return serving.Framing(
        "chat",
        head + candidate.context_label,
        candidate.question_label,
        tail,
        head,
        tail,
        later_text_head=serving.TEXT_SEPARATOR,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidate", choices=sorted(CANDIDATES), required=True)
    args, rest = parser.parse_known_args(argv)
    candidate = CANDIDATES[args.candidate]
    retention.framing_for = lambda tokenizer, name=None: candidate_framing(tokenizer, candidate)
    return eval_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
