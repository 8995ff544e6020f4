"""What the measures share: the registry entry (`Measure`), what a run hands each measure (`Context`), the model
under test and how to time it (`Bench`), targets, the timed calls, and the memory grown once for measures 1-5.

Every measure times its variants against their baselines in the same process, round-robin (see `timing.py`), and
reports medians and ratios. Time to first token (TTFT) is one forward over the prompt with a fresh
`MemoryPrefixCache` and logits for the last position only: exactly `generate`'s prefill step, without the
generation bookkeeping, which is the same for every variant.
"""

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from modeling_memoryllm import MemoryLLMForCausalLM, MemoryState
from modeling_memoryllm.cache_memoryllm import MemoryPrefixCache
from modeling_memoryllm.modeling_memoryllm import CACHE_KWARG

from ..models import random_tokens
from ..timing import interleaved, summary


QUERY_SEED, TEXT_SEED, CHUNK_SEED = 1, 2, 3
# Injected-token points of the per-query cost curve (1k .. 1M).
COST_POINTS = (1024, 2048, 4096, 8192, 16_384, 65_536, 262_144, 1_048_576)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Measure:
    """One measure of the registry (`measures/__init__.py`): how it runs, its table rows and its plot.

    `run(context)` returns the measure's JSON; `rows(result)` its rows of the markdown table; `plot(plt, data)`, if
    any, draws `figure` (PNG), from all of `bench.json`'s measures (a figure may show more than one) or from the
    soak's result. `source`: `"bench"` (a measure of `bench.json`, run by the default and `--quick` modes) or
    `"soak"` (`soak.json`, run by `--soak N`). `uses_states`: reads the memories grown for measures 1-2 (dropped
    after the last one that does); `uses_model`: runs on the model under test (else after it is freed); `grows`:
    needs that memory grown (`--measures` without such a measure skips growing it).
    """

    key: str
    number: int
    title: str
    run: Callable[["Context"], dict]
    rows: Callable[[dict], list[list[str]]]
    figure: str | None = None
    plot: Callable | None = None
    source: str = "bench"
    uses_states: bool = False
    uses_model: bool = True
    grows: bool = True  # reads the memory grown once for measures 1-5 (`Context.grow`)


@dataclass
class Bench:
    """The model under test and how to time it."""

    model: MemoryLLMForCausalLM
    sync: Callable[[], None]
    repeats: int
    warmup: int
    query_tokens: int
    decode_tokens: int
    batch_sizes: tuple[int, ...]
    batch_repeats: int
    context_repeats: int
    sweep_query_tokens: tuple[int, ...] = ()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def query(self, tokens: int | None = None) -> torch.Tensor:
        return random_tokens(self.model, tokens or self.query_tokens, QUERY_SEED, rows=1).to(self.device)

    def time(
        self, fns: dict[str, Callable[[], object]], repeats: int | None = None, warmup: int | None = None
    ) -> dict[str, list[float]]:
        return interleaved(fns, repeats or self.repeats, self.warmup if warmup is None else warmup, self.sync)


@dataclass
class Context:
    """What a run hands each measure: the parsed arguments, the device, the output folder and, for the measures
    on the model under test, the bench and the memory grown once (`grow`)."""

    args: argparse.Namespace
    device: torch.device
    out_dir: str
    bench: Bench | None = None
    states: dict[int, dict] | None = None  # injected tokens -> {"state", "injected", "inject_s"} (`grow_memory`)
    stream: torch.Tensor | None = None  # the injected token stream
    fill: int | None = None  # the first point at which the memory is full
    full: MemoryState | None = None  # the state after the most injected tokens

    def grow(self, max_injected: int) -> None:
        log(f"injecting up to {max_injected:,} tokens (points {', '.join(f'{p:,}' for p in COST_POINTS)})")
        self.states, self.stream = grow_memory(self.bench, COST_POINTS, max_injected)
        rows = self.bench.model.config.memory_rows
        self.fill = min((p for p in COST_POINTS if p >= rows), default=COST_POINTS[-1])
        self.full = self.states[max(self.states)]["state"]


def target(name: str, value: float | None, op: str, threshold: float, applies: bool = True, note: str = "") -> dict:
    """One target: `value op threshold` (`<=`, `>=`, or `within`: |value - 1| <= threshold)."""
    checks = {
        "<=": lambda v: v <= threshold,
        ">=": lambda v: v >= threshold,
        "within": lambda v: abs(v - 1) <= threshold,
    }
    met = bool(checks[op](value)) if applies and value is not None else None
    return {
        "name": name,
        "value": value,
        "op": op,
        "threshold": threshold,
        "applies": applies,
        "met": met,
        "note": note,
    }


def median(samples: list[float]) -> float:
    return summary(samples)["median_s"]


# ------------------------------------------------------------------------------------------------------ calls
def prefilled_cache(model: MemoryLLMForCausalLM, ids: torch.Tensor, state: MemoryState) -> MemoryPrefixCache:
    """Generate's first step: one forward over the prompt into a fresh prefix cache, last-position logits only;
    returns the cache."""
    cache = MemoryPrefixCache()
    with torch.inference_mode():
        model(ids, memory=state, logits_to_keep=1, **{CACHE_KWARG: cache})
    return cache


def prefill(model: MemoryLLMForCausalLM, ids: torch.Tensor, state: MemoryState) -> None:
    """`prefilled_cache` as a timed call: the cache is freed inside the call, as `generate` frees it."""
    prefilled_cache(model, ids, state)


def rows_read(model: MemoryLLMForCausalLM, ids: torch.Tensor, state: MemoryState) -> int:
    """The prefix rows that the prefill of `ids` (its first batch row) attends to: every written row, or with
    `memory_read: relevant` bos and its chunk (0 for a memory that is not read)."""
    cache = prefilled_cache(model, ids, state)
    written = cache.prefix_written
    return int(written[0].sum()) if written is not None else int(cache.prefix_length)


def recompute_prefill(model: MemoryLLMForCausalLM, ids: torch.Tensor, state: MemoryState) -> None:
    """As the original model: the memory's keys/values are computed again on every call."""
    state.mark_changed()
    prefill(model, ids, state)


def inject(model: MemoryLLMForCausalLM, tokens, memory) -> None:
    with torch.inference_mode():
        model.inject(tokens, memory=memory, show_progress=False)


# -------------------------------------------------------------------------------------------- memory growth
def grow_memory(bench: Bench, points: tuple[int, ...], max_injected: int) -> tuple[dict[int, dict], torch.Tensor]:
    """Inject one random token stream into one memory and keep a copy of the state at every point up to
    `max_injected` (measured). Larger points reuse the state of the last measured point (`"simulated"`): the
    memory has a fixed size, so after the memory is full only its contents depend on how much was injected."""
    model = bench.model
    measured = [p for p in points if p <= max_injected] or [min(points)]
    stream = random_tokens(model, max(measured), TEXT_SEED)
    state, done, states = model.new_memory_state(), 0, {}
    for point in measured:
        start = time.perf_counter()
        inject(model, stream[done:point], state)
        states[point] = {"state": state.clone(), "injected": "measured", "inject_s": time.perf_counter() - start}
        done = point
    for point in points:
        if point not in states:
            states[point] = {"state": state.clone(), "injected": "simulated", "inject_s": None}
    return states, stream
