"""Helpers of the vLLM serving tests."""

import json

from memoryllm_vllm.parity import chat_ids, package_greedy, reply_tokens
from tests.conftest import ROOT


__all__ = ["chat_ids", "package_greedy", "reply_tokens", "squad_contexts"]
SQUAD = ROOT / "tests" / "data" / "eval_data" / "squad_v2" / "dev-v2.0.part-a.json"


def squad_contexts(count: int) -> list[str]:
    """`count` distinct SQuAD 2.0 dev contexts (part-a, the development split)."""
    data = json.loads(SQUAD.read_text(encoding="utf-8"))["data"]
    contexts = [p["context"] for article in data for p in article["paragraphs"]]
    return contexts[:count]
