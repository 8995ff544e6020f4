"""Measure 1: time to first token with the memory prefix cached, vs the plain backbone, the prefix recomputed per
call, and the injected text in the prompt instead; the same ratios at more query lengths (`--sweep-query-tokens`)."""

import torch

from modeling_memoryllm import MemoryState

from ..floors import Shape, recompute_expectation, ttft_floor
from ..timing import ratio, summary
from .base import Bench, Context, Measure, median, prefill, recompute_prefill, rows_read, target
from .cells import fmt, ms, row


def measure_ttft(bench: Bench, state: MemoryState, stream: torch.Tensor, injected: int) -> dict:
    """TTFT with the memory prefix cached, vs the plain backbone, the prefix recomputed per call, and the injected
    text in the prompt instead."""
    model, query = bench.model, bench.query()
    plain = model.new_memory_state()
    context = torch.cat([stream[:injected].to(bench.device).unsqueeze(0), query], dim=1)
    samples = bench.time(
        {**_variants(model, query, state, plain), "in_context": lambda: prefill(model, context, plain)}
    )
    ratios = _ttft_ratios(samples, Shape.of(model), bench.query_tokens, rows_read(model, query, state))
    ratios["in_context_vs_cached"] = ratio(median(samples["in_context"]), median(samples["cached"]))
    sweep = [_ttft_at(bench, state, tokens) for tokens in bench.sweep_query_tokens]
    return {
        "description": "time to first token (prefill forward, last-position logits) after injection",
        "query_tokens": bench.query_tokens,
        "injected_tokens": injected,
        "in_context_prompt_tokens": int(context.shape[1]),
        "variants": {name: summary(s) for name, s in samples.items()},
        "ratios": ratios,
        "floor": ratios["floor"],
        "by_query_tokens": sweep,
        "targets": [
            _floor_target(bench.query_tokens, ratios),
            *(_floor_target(point["query_tokens"], point) for point in sweep),
            target("recomputed-per-call TTFT / cached TTFT", ratios["recompute_vs_cached"], ">=", 3.0),
        ],
    }


def _floor_target(tokens: int, ratios: dict) -> dict:
    """Cached / plain TTFT within 1.1x of its floor (the FLOPs of attention over the prefix rows)."""
    name = f"{tokens}-token query: (cached / plain TTFT) / its FLOP floor {ratios['floor']['ratio']:.2f}"
    return target(name, ratios["cached_vs_plain_vs_floor"], "<=", 1.1)


def _variants(model, query: torch.Tensor, state: MemoryState, plain: MemoryState) -> dict:
    """The plain backbone (`plain`: an empty memory), the memory prefix cached, and the prefix recomputed per call."""
    return {
        "plain": lambda: prefill(model, query, plain),
        "cached": lambda: prefill(model, query, state),
        "recompute": lambda: recompute_prefill(model, query, state),
    }


def _ttft_ratios(samples: dict[str, list[float]], shape: Shape, tokens: int, read: int) -> dict:
    """The measured ratios of a query of `tokens` tokens that attends to `read` prefix rows, with the floor of
    cached / plain and the FLOP expectation of recomputed / cached (`floors.recompute_expectation`)."""
    med = {name: median(s) for name, s in samples.items()}
    cached_vs_plain = ratio(med["cached"], med["plain"])
    floor = ttft_floor(shape, tokens, read)
    return {
        "cached_vs_plain": cached_vs_plain,
        "recompute_vs_cached": ratio(med["recompute"], med["cached"]),
        "recompute_expected": recompute_expectation(shape, tokens, read),
        "floor": floor,
        "cached_vs_plain_vs_floor": ratio(cached_vs_plain, floor["ratio"]),
    }


def _ttft_at(bench: Bench, state: MemoryState, tokens: int) -> dict:
    """Plain, cached and recomputed TTFT for a query of `tokens` tokens (the ratios depend on the query length)."""
    model = bench.model
    query = bench.query(tokens)
    samples = bench.time(_variants(model, query, state, model.new_memory_state()))
    ratios = _ttft_ratios(samples, Shape.of(model), tokens, rows_read(model, query, state))
    return {"query_tokens": tokens, "variants": {k: summary(s) for k, s in samples.items()}, **ratios}


def run(context: Context) -> dict:
    return measure_ttft(context.bench, context.states[context.fill]["state"], context.stream, context.fill)


# ------------------------------------------------------------------------------------------------- table, plot
def rows(ttft: dict) -> list[list[str]]:
    v, r, t = ttft["variants"], ttft["ratios"], ttft["targets"]
    name = f"TTFT, {ttft['query_tokens']}-token query"
    plain, cached, recompute, in_context = (
        ms(v[k]["median_s"]) for k in ("plain", "cached", "recompute", "in_context")
    )
    injected = f"{ttft['injected_tokens']:,} injected tokens in the prompt"
    table = [
        row(
            1, f"{name}, memory KV cached vs plain backbone", cached, plain, fmt(r["cached_vs_plain"]), t[0], r["floor"]
        ),
        row(
            1,
            f"{name}, memory recomputed per call vs cached (Floor: what the prefix's FLOPs predict)",
            recompute,
            cached,
            fmt(r["recompute_vs_cached"]),
            t[-1],
            r.get("recompute_expected"),
        ),
        row(1, f"{name}, {injected} vs cached", in_context, cached, fmt(r["in_context_vs_cached"])),
    ]
    for point, point_target in zip(ttft.get("by_query_tokens", []), t[1:-1]):
        v = point["variants"]
        text = (
            f"TTFT, {point['query_tokens']}-token query: cached vs plain; recomputed per call vs cached "
            f"{fmt(point['recompute_vs_cached'])}x ({ms(v['recompute']['median_s'])}, FLOPs predict "
            f"{fmt(point['recompute_expected']['ratio']) if 'recompute_expected' in point else '–'}x)"
        )
        times = ms(v["cached"]["median_s"]), ms(v["plain"]["median_s"])
        table.append(row(1, text, *times, fmt(point["cached_vs_plain"]), point_target, point["floor"]))
    return table


def plot(plt, measures: dict):
    ttft = measures["ttft"]
    names = list(ttft["variants"])
    values = [ttft["variants"][n]["median_s"] * 1000 for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bars = ax.bar(names, values, color=["#888", "#2a7", "#c53", "#36c"][: len(names)])
    ax.bar_label(bars, fmt="%.1f ms", fontsize=8)
    ax.set_yscale("log")  # in-context prompts are orders of magnitude slower
    ax.set_ylabel("time to first token (ms, median, log scale)")
    ax.set_title(f"Query of {ttft['query_tokens']} tokens after {ttft['injected_tokens']:,} injected", fontsize=9)
    return fig


MEASURE = Measure("ttft", 1, "TTFT", run, rows, figure="ttft.png", plot=plot, uses_states=True)
