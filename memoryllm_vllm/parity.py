"""What parity is checked against: the package's own greedy tokens and logprobs for a memory-reading prompt."""

import torch

from modeling_memoryllm.export import reading_every_row


@torch.no_grad()
def package_greedy(model, state, ids: list[int], max_new_tokens: int, ignore_eos: bool = False):
    """Greedy tokens and their logprobs from `model.generate(ids, memory=state)` (from the raw logits, as vLLM's
    logprobs are)."""
    options = dict(min_new_tokens=max_new_tokens) if ignore_eos else {}
    with reading_every_row(model):  # what the exported (static) prefix serves
        out = model.generate(
            torch.tensor([ids], device=model.device), memory=state, max_new_tokens=max_new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True, **options,
        )  # fmt: skip
    tokens = out.sequences[0, len(ids) :].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids of a chat: the template without memory placeholders (what the package reads after them)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def reply_tokens(reply: dict) -> tuple[list[int], list[float]]:
    """Token ids and logprobs of a chat completion asked with `logprobs=True, return_token_ids=True`."""
    choice = reply["choices"][0]
    return choice["token_ids"], [item["logprob"] for item in choice["logprobs"]["content"]]


def compare(reply: dict, model, state, messages: list[dict], max_new_tokens: int) -> dict:
    """How a chat completion compares with the package's `generate` for the same memory and messages."""
    tokens, logprobs = reply_tokens(reply)
    expected, expected_logprobs = package_greedy(model, state, chat_ids(model.tokenizer, messages), max_new_tokens)
    difference = max((abs(a - b) for a, b in zip(logprobs, expected_logprobs)), default=0.0)
    return {"tokens_equal": tokens == expected, "max_logprob_diff": difference, "tokens": len(tokens)}


__all__ = ["chat_ids", "compare", "package_greedy", "reply_tokens"]
