"""Measure 4: greedy decode speed (tokens/s) with the memory prefix vs the plain backbone, after the same prefill."""

import time

import torch

from modeling_memoryllm import MemoryState
from modeling_memoryllm.cache_memoryllm import MemoryPrefixCache
from modeling_memoryllm.modeling_memoryllm import CACHE_KWARG

from ..floors import Shape, decode_floor
from ..timing import ratio, summary
from .base import Bench, Context, Measure, rows_read, target
from .cells import fmt, row


def decode_seconds(bench: Bench, ids: torch.Tensor, state: MemoryState) -> float:
    """Seconds of `decode_tokens` greedy steps after an (untimed) prefill, with the model's prefix cache."""
    model, cache = bench.model, MemoryPrefixCache()
    with torch.inference_mode():
        logits = model(ids, memory=state, logits_to_keep=1, **{CACHE_KWARG: cache}).logits
        token = logits[:, -1:].argmax(-1)
        bench.sync()
        start = time.perf_counter()
        for _ in range(bench.decode_tokens):
            logits = model(token, memory=state, logits_to_keep=1, **{CACHE_KWARG: cache}).logits
            token = logits[:, -1:].argmax(-1)
        bench.sync()
    return time.perf_counter() - start


def measure_decode(bench: Bench, full: MemoryState) -> dict:
    """Greedy decode speed (tokens/s) with the memory prefix vs the plain backbone, after the same prefill."""
    model, query = bench.model, bench.query()
    plain = model.new_memory_state()
    samples = bench.time(
        {"memory": lambda: decode_seconds(bench, query, full), "plain": lambda: decode_seconds(bench, query, plain)}
    )
    speed = {name: bench.decode_tokens / summary(s)["median_s"] for name, s in samples.items()}
    time_ratio = ratio(speed["plain"], speed["memory"])
    past = bench.query_tokens + bench.decode_tokens // 2  # text rows a step attends to, on average
    floor = decode_floor(Shape.of(model), past, rows_read(model, query, full))
    return {
        "description": "greedy decode steps (one token each, KV cache) after the prefill of the query",
        "decode_tokens": bench.decode_tokens,
        "query_tokens": bench.query_tokens,
        "variants": {name: {**summary(s), "tokens_per_s": speed[name]} for name, s in samples.items()},
        "ratios": {
            "memory_vs_plain_tokens_per_s": ratio(speed["memory"], speed["plain"]),
            "memory_vs_plain_step_time": time_ratio,
            "step_time_vs_floor": ratio(time_ratio, floor["ratio"]),
        },
        "floor": floor,
        "targets": [target("decode step time with memory / plain backbone", time_ratio, "<=", 1.25)],
    }


def run(context: Context) -> dict:
    return measure_decode(context.bench, context.full)


# ------------------------------------------------------------------------------------------------- table, plot
def rows(decode: dict) -> list[list[str]]:
    v, r = decode["variants"], decode["ratios"]
    memory, plain = f"{v['memory']['tokens_per_s']:.1f} tok/s", f"{v['plain']['tokens_per_s']:.1f} tok/s"
    text = f"decode step time with memory vs plain backbone ({decode['decode_tokens']} greedy steps)"
    return [row(4, text, memory, plain, fmt(r["memory_vs_plain_step_time"]), decode["targets"][0], decode["floor"])]


def draw_speed(ax, decode: dict) -> None:
    """The decode panel of `throughput.png` (drawn with measure 3's panels)."""
    speeds = decode["variants"]
    bars = ax.bar(list(speeds), [v["tokens_per_s"] for v in speeds.values()], color=["#2a7", "#888"])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylabel("decoded tokens/s")
    ax.set_title(f"greedy decode, {decode['decode_tokens']} tokens", fontsize=9)


MEASURE = Measure("decode", 4, "decode speed", run, rows)
