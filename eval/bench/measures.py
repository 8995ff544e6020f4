"""Measures 1-5: query latency, per-query cost vs injected tokens, injection throughput, decode speed, state size.

Every measure times its variants against their baselines in the same process, round-robin (see `timing.py`), and
reports medians and ratios. Time to first token (TTFT) is one forward over the prompt with a fresh
`MemoryPrefixCache` and logits for the last position only: exactly `generate`'s prefill step, without the
generation bookkeeping, which is the same for every variant.
"""

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from modeling_memoryllm import MemoryLLMForCausalLM, MemoryState
from modeling_memoryllm.cache_memoryllm import MemoryPrefixCache
from modeling_memoryllm.modeling_memoryllm import CACHE_KWARG

from .models import random_tokens
from .timing import interleaved, ratio, rss_bytes, summary


QUERY_SEED, TEXT_SEED, CHUNK_SEED = 1, 2, 3
# Injected-token points of the per-query cost curve (1k .. 1M).
COST_POINTS = (1024, 2048, 4096, 8192, 16_384, 65_536, 262_144, 1_048_576)


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


# ------------------------------------------------------------------------------------------------------ calls
def prefill(model: MemoryLLMForCausalLM, ids: torch.Tensor, state: MemoryState) -> None:
    """Generate's first step: one forward over the prompt into a fresh prefix cache, last-position logits only."""
    with torch.inference_mode():
        model(ids, memory=state, logits_to_keep=1, **{CACHE_KWARG: MemoryPrefixCache()})


def recompute_prefill(model: MemoryLLMForCausalLM, ids: torch.Tensor, state: MemoryState) -> None:
    """As the original model: the memory's keys/values are computed again on every call."""
    state.mark_changed()
    prefill(model, ids, state)


def plain_forward(model: MemoryLLMForCausalLM, ids: torch.Tensor, plain: MemoryState) -> None:
    """A forward over `ids` without memory and without a cache (what an injection pass costs at least)."""
    with torch.inference_mode():
        model(ids, memory=plain, logits_to_keep=1, use_cache=False)


def inject(model: MemoryLLMForCausalLM, tokens, memory) -> None:
    with torch.inference_mode():
        model.inject(tokens, memory=memory, show_progress=False)


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


# ------------------------------------------------------------------------------------------------- measure 1
def measure_ttft(bench: Bench, state: MemoryState, stream: torch.Tensor, injected: int) -> dict:
    """TTFT with the memory prefix cached, vs the plain backbone, the prefix recomputed per call, and the injected
    text in the prompt instead."""
    model, query = bench.model, bench.query()
    plain = model.new_memory_state()
    context = torch.cat([stream[:injected].to(bench.device).unsqueeze(0), query], dim=1)
    samples = bench.time(
        {
            "plain": lambda: prefill(model, query, plain),
            "cached": lambda: prefill(model, query, state),
            "recompute": lambda: recompute_prefill(model, query, state),
            "in_context": lambda: prefill(model, context, plain),
        }
    )
    ratios = _ttft_ratios(samples)
    ratios["in_context_vs_cached"] = ratio(_median(samples["in_context"]), _median(samples["cached"]))
    return {
        "description": "time to first token (prefill forward, last-position logits) after injection",
        "query_tokens": bench.query_tokens,
        "injected_tokens": injected,
        "in_context_prompt_tokens": int(context.shape[1]),
        "variants": {name: summary(s) for name, s in samples.items()},
        "ratios": ratios,
        "by_query_tokens": [_ttft_at(bench, state, tokens) for tokens in bench.sweep_query_tokens],
        "targets": [
            target("cached TTFT / plain backbone TTFT", ratios["cached_vs_plain"], "<=", 1.3),
            target("recomputed-per-call TTFT / cached TTFT", ratios["recompute_vs_cached"], ">=", 3.0),
        ],
    }


def _median(samples: list[float]) -> float:
    return summary(samples)["median_s"]


def _ttft_ratios(samples: dict[str, list[float]]) -> dict:
    med = {name: _median(s) for name, s in samples.items()}
    return {
        "cached_vs_plain": ratio(med["cached"], med["plain"]),
        "recompute_vs_cached": ratio(med["recompute"], med["cached"]),
    }


def _ttft_at(bench: Bench, state: MemoryState, tokens: int) -> dict:
    """Plain, cached and recomputed TTFT for a query of `tokens` tokens (the ratios depend on the query length)."""
    model, query = bench.model, bench.query(tokens)
    plain = model.new_memory_state()
    samples = bench.time(
        {
            "plain": lambda: prefill(model, query, plain),
            "cached": lambda: prefill(model, query, state),
            "recompute": lambda: recompute_prefill(model, query, state),
        }
    )
    return {"query_tokens": tokens, "variants": {k: summary(s) for k, s in samples.items()}, **_ttft_ratios(samples)}


# ------------------------------------------------------------------------------------------------- measure 2
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
    memory_samples = bench.time(memory_fns, 2 * bench.repeats)
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
    return _cost_result(bench, memory_rows, context_rows, max_positions)


def _prefill_fn(model, ids, state) -> Callable[[], None]:
    return lambda: prefill(model, ids, state)


def _text_of_length(model, stream: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of the injected stream (extended with more random text if it is shorter)."""
    if length <= stream.numel():
        return stream[:length]
    return torch.cat([stream, random_tokens(model, length - stream.numel(), TEXT_SEED + 1)])


def _memory_point(point: int, entry: dict, samples: list[float]) -> dict:
    return {"injected_tokens": point, "injected": entry["injected"], "inject_s": entry["inject_s"], **summary(samples)}


def _cost_result(bench: Bench, memory_rows: list[dict], context_rows: list[dict], max_positions: int) -> dict:
    medians = [row["median_s"] for row in memory_rows]
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
        "ratios": {"last_vs_first": flat, "max_vs_min": spread},
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


# ------------------------------------------------------------------------------------------------- measure 3
def measure_injection(bench: Bench, full: MemoryState) -> dict:
    """Injection throughput into a full memory vs a plain forward over the same chunk; batched vs sequential."""
    model = bench.model
    length = model.config.max_inject_length
    chunk = random_tokens(model, length, CHUNK_SEED, rows=1).to(bench.device)
    state, plain = full.clone(), model.new_memory_state()
    samples = bench.time(
        {
            "inject": lambda: inject(model, chunk, state),
            "delta_only": lambda: _delta(model, chunk, state),
            "plain_forward": lambda: plain_forward(model, chunk, plain),
        }
    )
    med = {name: summary(s)["median_s"] for name, s in samples.items()}
    single = {
        "chunk_tokens": length,
        "variants": {
            name: {**summary(s), "tokens_per_s": length / summary(s)["median_s"]} for name, s in samples.items()
        },
        "inject_vs_forward": ratio(med["inject"], med["plain_forward"]),
        "delta_only_vs_forward": ratio(med["delta_only"], med["plain_forward"]),
        "state_update_share": ratio(med["inject"] - med["delta_only"], med["inject"]),
    }
    batched = [_batched_point(bench, full, n, chunk.shape[1]) for n in bench.batch_sizes]
    return _injection_result(bench, single, batched)


def _delta(model: MemoryLLMForCausalLM, chunk: torch.Tensor, state: MemoryState) -> None:
    """The injection pass alone (the rows an injection would write), no state update."""
    with torch.inference_mode():
        model.compute_delta(chunk, memory=state)


def _batched_point(bench: Bench, full: MemoryState, n: int, length: int) -> dict:
    """`n` independent memories: one batched `inject` vs `n` injections one after another."""
    model = bench.model
    chunks = random_tokens(model, length, CHUNK_SEED + n, rows=n).to(bench.device)
    states = [full.clone() for _ in range(n)]

    def sequential() -> None:
        for row, state in enumerate(states):
            inject(model, chunks[row : row + 1], state)

    samples = bench.time(
        {"batched": lambda: inject(model, chunks, states), "sequential": sequential},
        bench.batch_repeats,
        warmup=0,  # injection is warm from the single-chunk measure; a warm-up here would cost 2n injections
    )
    med = {name: summary(s)["median_s"] for name, s in samples.items()}
    return {
        "memories": n,
        "tokens": n * length,
        "batched": {**summary(samples["batched"]), "tokens_per_s": n * length / med["batched"]},
        "sequential": {**summary(samples["sequential"]), "tokens_per_s": n * length / med["sequential"]},
        "batched_throughput_vs_sequential": ratio(med["sequential"], med["batched"]),
    }


def _injection_result(bench: Bench, single: dict, batched: list[dict]) -> dict:
    on_gpu = bench.device.type == "cuda"
    eight = next((b["batched_throughput_vs_sequential"] for b in batched if b["memories"] == 8), None)
    return {
        "description": "injection of one chunk into a full memory vs a plain forward over the same tokens; "
        "batched injection into independent memories vs the same injections one after another",
        "single": single,
        "batched": batched,
        "ratios": {
            "inject_vs_forward": single["inject_vs_forward"],
            **{f"batched_{b['memories']}_vs_sequential": b["batched_throughput_vs_sequential"] for b in batched},
        },
        "targets": [
            target("injection time / plain forward time", single["inject_vs_forward"], "<=", 1.2),
            target(
                "throughput, 8 batched / 8 sequential injections",
                eight,
                ">=",
                4.0,
                applies=on_gpu and eight is not None,
                note="" if on_gpu else "target is for GPU; on CPU the ratio is reported",
            ),
        ],
    }


# ------------------------------------------------------------------------------------------------- measure 4
def measure_decode(bench: Bench, full: MemoryState) -> dict:
    """Greedy decode speed (tokens/s) with the memory prefix vs the plain backbone, after the same prefill."""
    model, query = bench.model, bench.query()
    plain = model.new_memory_state()
    samples = bench.time(
        {"memory": lambda: decode_seconds(bench, query, full), "plain": lambda: decode_seconds(bench, query, plain)}
    )
    speed = {name: bench.decode_tokens / summary(s)["median_s"] for name, s in samples.items()}
    return {
        "description": "greedy decode steps (one token each, KV cache) after the prefill of the query",
        "decode_tokens": bench.decode_tokens,
        "query_tokens": bench.query_tokens,
        "variants": {name: {**summary(s), "tokens_per_s": speed[name]} for name, s in samples.items()},
        "ratios": {"memory_vs_plain_tokens_per_s": ratio(speed["memory"], speed["plain"])},
        "targets": [],
    }


# ------------------------------------------------------------------------------------------------- measure 5
def measure_size(bench: Bench, full: MemoryState, out_dir: str) -> dict:
    """The state's bytes in RAM and on disk vs L*M*d*bytes; save and load times; the cached prefix's bytes."""
    config = bench.model.config
    layers, rows, hidden = full.memory.shape
    formula = layers * rows * hidden * full.memory.element_size()
    before = rss_bytes()
    copy = full.to(device="cpu")
    rss_delta = rss_bytes() - before
    with tempfile.TemporaryDirectory(dir=out_dir) as folder:
        path = os.path.join(folder, "memory.safetensors")
        saves = bench.time({"save": lambda: copy.save(path, config=config)})["save"]
        file_bytes = os.path.getsize(path)
        loads = bench.time({"load": lambda: MemoryState.load(path, config=config)})["load"]
    prefix = _prefix_bytes(bench, full)
    return {
        "description": "memory state size vs L*M*d*bytes; safetensors file; save/load; cached prefix keys/values",
        "shape": [layers, rows, hidden],
        "dtype": str(full.memory.dtype).removeprefix("torch."),
        "formula_bytes": formula,
        "state_nbytes": full.nbytes,
        "provenance_bytes": full.provenance.numel() * full.provenance.element_size(),
        "rss_increase_bytes_on_copy": rss_delta,
        "file_bytes": file_bytes,
        "prefix_cache_bytes": prefix,
        "save": summary(saves),
        "load": summary(loads),
        "ratios": {
            "nbytes_vs_formula": ratio(full.nbytes, formula),
            "file_vs_formula": ratio(file_bytes, formula),
            "rss_increase_vs_formula": ratio(rss_delta, formula),
        },
        "targets": [
            target("state.nbytes / L*M*d*bytes", ratio(full.nbytes, formula), "within", 0.01),
            target("file size / L*M*d*bytes", ratio(file_bytes, formula), "within", 0.01),
        ],
    }


def _prefix_bytes(bench: Bench, state: MemoryState) -> int | None:
    """Bytes of the cached prefix buffers of `state` (keys and values of every layer, spare rows included)."""
    prefill(bench.model, bench.query(), state)
    prefix = state.prefix
    if prefix is None:
        return None
    return sum(t.numel() * t.element_size() for t in (*prefix.key_buffers, *prefix.value_buffers))
