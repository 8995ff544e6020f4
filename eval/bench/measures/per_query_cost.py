"""Measure 2: per-query cost (TTFT) as the injected text grows from 1k to 1M tokens: MemoryLLM (cached prefix) vs
the same text in the prompt, which stops fitting at `max_position_embeddings`."""

from collections.abc import Callable

import torch

from ..models import random_tokens
from ..timing import ratio, summary
from .base import TEXT_SEED, Bench, Context, Measure, prefill, target
from .cells import fmt, ms, row


# The first point's state timed once more among the others: the same work twice, so the ratio of its two medians
# is what the machine's noise alone makes of a flat curve.
CONTROL = "control"


def in_context_points(points: tuple[int, ...], query_tokens: int, max_positions: int) -> list[int]:
    """Injected-text lengths for the in-context curve: every point that fits, and the longest text that fits."""
    longest = max_positions - query_tokens
    return sorted({p for p in points if p <= longest} | {longest})


def measure_cost_curve(bench: Bench, states: dict[int, dict], stream: torch.Tensor) -> dict:
    """Per-query cost (TTFT) as the injected text grows: MemoryLLM (cached prefix) vs text in the prompt."""
    model, query = bench.model, bench.query()
    points = sorted(states)
    # Cheap calls, compared with each other for flatness: twice the repeats.
    memory_fns = {str(p): _prefill_fn(model, query, states[p]["state"]) for p in points}
    memory_fns[CONTROL] = _prefill_fn(model, query, states[points[0]]["state"])  # the first point, timed again
    memory_samples = bench.time(memory_fns, 2 * bench.repeats)
    control = summary(memory_samples.pop(CONTROL))
    plain = model.new_memory_state()
    max_positions = model.config.max_position_embeddings
    context_fns = {}
    for length in in_context_points(tuple(points), bench.query_tokens, max_positions):
        text = _text_of_length(model, stream, length).to(bench.device)
        context_fns[str(length)] = _prefill_fn(model, torch.cat([text.unsqueeze(0), query], dim=1), plain)
    # Long prompts take seconds each on a CPU: fewer repeats, no warm-up (the model is warm by now).
    context_samples = bench.time(context_fns, bench.context_repeats, warmup=0)
    memory_rows = [_memory_point(p, states[p], memory_samples[str(p)]) for p in points]
    context_rows = [{"injected_tokens": int(k), "fits": True, **summary(s)} for k, s in context_samples.items()]
    context_rows += [
        {"injected_tokens": p, "fits": False, "median_s": None} for p in points if str(p) not in context_fns
    ]
    context_rows.sort(key=lambda row: row["injected_tokens"])
    return _cost_result(bench, memory_rows, context_rows, max_positions, control)


def _prefill_fn(model, ids, state) -> Callable[[], None]:
    return lambda: prefill(model, ids, state)


def _text_of_length(model, stream: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of the injected stream (extended with more random text if it is shorter)."""
    if length <= stream.numel():
        return stream[:length]
    return torch.cat([stream, random_tokens(model, length - stream.numel(), TEXT_SEED + 1)])


def _memory_point(point: int, entry: dict, samples: list[float]) -> dict:
    return {"injected_tokens": point, "injected": entry["injected"], "inject_s": entry["inject_s"], **summary(samples)}


def _cost_result(
    bench: Bench, memory_rows: list[dict], context_rows: list[dict], max_positions: int, control: dict
) -> dict:
    medians = [row["median_s"] for row in memory_rows]
    first_twice = [medians[0], control["median_s"]]
    first, last = medians[0], medians[-1]
    flat = ratio(last, first)
    spread = ratio(max(medians), min(medians))
    measured = [row["injected_tokens"] for row in memory_rows if row["injected"] == "measured"]
    return {
        "description": "per-query cost (TTFT) vs injected tokens; in-context = injected text in the prompt",
        "query_tokens": bench.query_tokens,
        "max_position_embeddings": max_positions,
        "max_measured_injected_tokens": max(measured),
        "simulation": (
            "points marked 'simulated' query a copy of the memory after the largest measured injection: the memory "
            "has a fixed size [L, M, d], full once M rows were written, so its query cost does not depend on how "
            "many more tokens were injected; only its contents would differ"
        ),
        "memoryllm": memory_rows,
        "in_context": context_rows,
        "control": {
            "description": "the first point's state timed again among the others (the same work twice)",
            **control,
        },
        "ratios": {
            "last_vs_first": flat,
            "max_vs_min": spread,
            "control_max_vs_min": ratio(max(first_twice), min(first_twice)),
        },
        "targets": [
            target(
                f"TTFT at {memory_rows[-1]['injected_tokens']:,} / at {memory_rows[0]['injected_tokens']:,} tokens",
                flat,
                "within",
                0.05,
            ),
            target("max / min TTFT over all points", spread, "<=", 1.05),
        ],
    }


def run(context: Context) -> dict:
    return measure_cost_curve(context.bench, context.states, context.stream)


# ------------------------------------------------------------------------------------------------- table, plot
def rows(cost: dict) -> list[list[str]]:
    points, t = cost["memoryllm"], cost["targets"]
    first, last = points[0], points[-1]
    fits = [r for r in cost["in_context"] if r["fits"]]
    text = (
        f"per-query cost at {last['injected_tokens']:,} ({last['injected']}) vs {first['injected_tokens']:,} "
        f"injected tokens (measured up to {cost['max_measured_injected_tokens']:,})"
    )
    table = [
        row(2, text, ms(last["median_s"]), ms(first["median_s"]), fmt(cost["ratios"]["last_vs_first"], 3), t[0]),
        row(2, "per-query cost, max / min over all points", "", "", fmt(cost["ratios"]["max_vs_min"], 3), t[1]),
    ]
    if "control" in cost:
        text = f"noise: the {first['injected_tokens']:,}-token point timed twice, max / min of its two medians"
        control = fmt(cost["ratios"]["control_max_vs_min"], 3)
        table.append(row(2, text, ms(cost["control"]["median_s"]), ms(first["median_s"]), control))
    if fits:
        longest = fits[-1]
        text = f"in-context, {longest['injected_tokens']:,} tokens in the prompt (longest that fits) vs MemoryLLM"
        ratio_text = fmt(longest["median_s"] / last["median_s"])
        table.append(row(2, text, ms(longest["median_s"]), ms(last["median_s"]), ratio_text))
    return table


def plot(plt, measures: dict):
    cost = measures["per_query_cost"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    memory = cost["memoryllm"]
    for kind, marker in (("measured", "o"), ("simulated", "x")):
        points = [(r["injected_tokens"], r["median_s"] * 1000) for r in memory if r["injected"] == kind]
        if points:
            ax.plot(*zip(*points), marker, color="#2a7", label=f"MemoryLLM, cached prefix ({kind} injection)")
    ax.plot(
        [r["injected_tokens"] for r in memory], [r["median_s"] * 1000 for r in memory], "-", color="#2a7", alpha=0.5
    )
    fits = [(r["injected_tokens"], r["median_s"] * 1000) for r in cost["in_context"] if r["fits"]]
    if fits:
        ax.plot(*zip(*fits), "s-", color="#36c", label="backbone, injected text in the prompt")
    ax.axvline(
        cost["max_position_embeddings"], color="#c53", ls="--", lw=1, label="context limit (does not fit beyond)"
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("injected tokens")
    ax.set_ylabel("per-query cost: TTFT (ms, median)")
    ax.legend(fontsize=7)
    return fig


MEASURE = Measure(
    "per_query_cost",
    2,
    "per-query cost vs injected tokens",
    run,
    rows,
    figure="per_query_cost.png",
    plot=plot,
    uses_states=True,
)
