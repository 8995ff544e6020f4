"""Helpers of the vLLM serving tests: the package's own greedy tokens and logprobs, to compare vLLM's with."""

import json

import torch

from tests.conftest import ROOT


SQUAD = ROOT / "tests" / "data" / "eval_data" / "squad_v2" / "dev-v2.0.part-a.json"


@torch.no_grad()
def package_greedy(model, state, ids: list[int], max_new_tokens: int, ignore_eos: bool = False):
    """Greedy tokens and their logprobs from `model.generate(ids, memory=state)` (raw logits, as vLLM's)."""
    options = dict(min_new_tokens=max_new_tokens) if ignore_eos else {}
    out = model.generate(
        torch.tensor([ids]), memory=state, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **options,
    )  # fmt: skip
    tokens = out.sequences[0, len(ids) :].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids of a chat (the template without memory placeholders)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def squad_contexts(count: int) -> list[str]:
    """`count` distinct SQuAD 2.0 dev contexts (part-a, the development split)."""
    data = json.loads(SQUAD.read_text(encoding="utf-8"))["data"]
    contexts = [p["context"] for article in data for p in article["paragraphs"]]
    return contexts[:count]
