"""Speed of retention's shared unrelated texts (`runners.shared.SharedTexts`) against injecting them into every memory.

One process, the same model, texts and memories for both ways: `--memories` fresh memories each get their own
SQuAD part-a context, then the same `--texts` unrelated contexts in order, and are read once at the end (what
retention does before asking at the largest k). Wall-clock and CPU seconds of each way, their ratio, and whether the
memories came out equal.

    python -m eval.shared_speed --model default --memories 4 --texts 5 --out eval/results/shared-texts-speed.json
"""

import argparse
import json
import pathlib
import time

import torch
from transformers.utils import logging

from modeling_memoryllm.serving import framing_for

from . import data
from .runners import common
from .runners.shared import SharedTexts


logger = logging.get_logger(__name__)


def framed_contexts(subject: common.Subject, count: int, tokens: int) -> list[list[int]]:
    """The first `count` distinct part-a SQuAD contexts, cut to `tokens` tokens, framed for injection (token ids)."""
    frame = framing_for(subject.tokenizer)
    records = data.retention_records("squad", "dev", None)
    contexts = list(dict.fromkeys(record["context"] for record in records))[:count]
    cut = [subject.decode(subject.encode(text, special=False)[:tokens]) for text in contexts]
    return [subject.encode(frame.text(text), special=False) for text in cut]


def timed_run(subject: common.Subject, own: list[list[int]], texts: list[list[int]], share: bool) -> dict:
    """Own contexts into fresh memories, then every text, then one read; seconds and the final memories `[L, M, d]`."""
    wall, cpu = time.perf_counter(), time.process_time()
    states = subject.new_states(len(own))
    generators = [torch.Generator().manual_seed(index) for index in range(len(own))]
    subject.inject(own, states, generators)
    shared = SharedTexts(subject.model, texts, share=share)
    tracks = [shared.track(state) for state in states]
    for index in range(len(texts)):
        tracks, states = shared.inject(index, tracks, states, generators)
    memories = [state.memory.clone() for state in shared.states(tracks, states)]
    return {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "chunk_writes": dict(shared.counts),
        "memories": memories,
    }


def measure(args) -> dict:
    subject = common.load_subject(args.model, args.tokenizer)
    contexts = framed_contexts(subject, args.memories + args.texts, args.context_tokens)
    own, texts = contexts[: args.memories], contexts[args.memories :]
    runs = {name: timed_run(subject, own, texts, share) for name, share in (("shared", True), ("each", False))}
    equal = all(
        torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(runs["shared"]["memories"], runs["each"]["memories"])
    )
    result = {name: {k: v for k, v in run.items() if k != "memories"} for name, run in runs.items()}
    result["speedup_wall"] = runs["each"]["wall_s"] / runs["shared"]["wall_s"]
    result["speedup_cpu"] = runs["each"]["cpu_s"] / runs["shared"]["cpu_s"]
    result["memories_equal"] = equal
    result["config"] = {"memories": args.memories, "texts": args.texts, "context_tokens": args.context_tokens}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokenizer")
    parser.add_argument("--memories", type=int, default=4)
    parser.add_argument("--texts", type=int, default=5)
    parser.add_argument("--context-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", default="eval/results/shared-texts-speed.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    logger.warning("shared texts: %.2fx faster (wall), %.2fx (CPU)", result["speedup_wall"], result["speedup_cpu"])


if __name__ == "__main__":
    main()
