"""Measure 7 (`--soak N`): N injections into a tiny config, batched into several independent memories. Every so often
records max |value|, RMS norm, NaN/Inf, process RSS and seconds per injection; checks that none is NaN/Inf, the
norm stays bounded, RSS stays flat and the time per injection stays flat."""

import math
import time
from collections.abc import Callable

import torch

from modeling_memoryllm.testing_utils import SOAK_OVERRIDES, tiny_model

from ..timing import rss_bytes
from .base import Context, Measure, log
from .cells import fmt


# The tiny soak model: the `"soak"` preset of `modeling_memoryllm.testing_utils` (sizes and why there).
NORM_BOUND = 4.0  # the RMS norm may not exceed this multiple of its first recorded value
RSS_GROWTH = 0.10  # RSS may grow by at most this fraction (after the first tenth of the run)
TIME_GROWTH = 1.5  # the median time per injection in the last tenth vs the first tenth


def soak(
    total: int,
    memories: int = 16,
    text_tokens: int = 16,
    points: int = 200,
    seed: int = 0,
    on_record: Callable[[dict], None] | None = None,
) -> dict:
    """`total` injections (rounded up to whole batches of `memories`), `points` records along the way, each also
    passed to `on_record` (e.g. to report progress)."""
    model = tiny_model(seed, preset="soak")
    states = [model.new_memory_state() for _ in range(memories)]
    generator = torch.Generator().manual_seed(seed)
    every = max(memories, math.ceil(total / points / memories) * memories)
    records, done, window_start, window_done = [], 0, time.perf_counter(), 0
    with torch.inference_mode():
        while done < total:
            tokens = torch.randint(3, model.config.vocab_size, (memories, text_tokens), generator=generator)
            model.inject(tokens, memory=states, show_progress=False)
            done += memories
            if done % every == 0 or done >= total:
                now = time.perf_counter()
                records.append(_record(states, done, (now - window_start) / (done - window_done)))
                if on_record is not None:
                    on_record(records[-1])
                window_start, window_done = now, done
    return _soak_result(records, total, memories, text_tokens, model.config)


def _record(states, done: int, seconds_per_injection: float) -> dict:
    memory = torch.stack([s.memory for s in states])
    finite = bool(torch.isfinite(memory).all())
    return {
        "injections": done,
        "max_abs": float(memory.abs().max()),
        "rms": float(memory.float().pow(2).mean().sqrt()),
        "finite": finite,
        "rss_bytes": rss_bytes(),
        "seconds_per_injection": seconds_per_injection,
    }


def _tenth_median(records: list[dict], key: str, last: bool) -> float:
    size = max(1, len(records) // 10)
    values = sorted(r[key] for r in (records[-size:] if last else records[:size]))
    return values[len(values) // 2]


def _soak_result(records: list[dict], total: int, memories: int, text_tokens: int, config) -> dict:
    steady = records[max(1, len(records) // 10) :] or records  # after the first tenth (allocator warm-up)
    first_rms = records[0]["rms"]
    norm_ratio = max(r["rms"] for r in records) / first_rms if first_rms else None
    rss_ratio = max(r["rss_bytes"] for r in steady) / steady[0]["rss_bytes"]
    time_ratio = _tenth_median(records, "seconds_per_injection", True) / _tenth_median(
        records, "seconds_per_injection", False
    )
    all_finite = all(r["finite"] for r in records)
    seconds = sum(r["seconds_per_injection"] for r in records) / len(records)
    return {
        "description": "injections into a tiny config, batched into independent memories",
        "config": {k: v for k, v in SOAK_OVERRIDES.items() if k != "lora_config"},
        "requested_injections": total,
        "injections": records[-1]["injections"],
        "memories": memories,
        "text_tokens": text_tokens,
        "mean_seconds_per_injection": seconds,
        "estimated_seconds_for_1m": seconds * 1_000_000,
        "records": records,
        "ratios": {
            "max_rms_vs_first": norm_ratio,
            "rss_max_vs_steady_start": rss_ratio,
            "time_last_vs_first": time_ratio,
        },
        "checks": {
            "finite": all_finite,
            "norm_bounded": norm_ratio is not None and norm_ratio <= NORM_BOUND,
            "rss_flat": rss_ratio <= 1 + RSS_GROWTH,
            "time_flat": time_ratio <= TIME_GROWTH,
        },
        "thresholds": {"norm_bound": NORM_BOUND, "rss_growth": RSS_GROWTH, "time_growth": TIME_GROWTH},
    }


def progress(total: int, every: float = 0.1) -> Callable[[dict], None]:
    """A `soak(on_record=...)` callback that logs each further tenth of the run."""
    reported = [0.0]

    def report(record: dict) -> None:
        if record["injections"] >= total * (reported[0] + every) or record["injections"] >= total:
            reported[0] = record["injections"] / total
            log(
                f"soak: {record['injections']:,} / {total:,} injections, RMS {record['rms']:.4f}, "
                f"{record['seconds_per_injection'] * 1e3:.3f} ms each, finite {record['finite']}"
            )

    return report


def run(context: Context) -> dict:
    args = context.args
    log(f"soak: {args.soak:,} injections into {args.soak_memories} tiny memories")
    return soak(args.soak, memories=args.soak_memories, on_record=progress(args.soak))


# ------------------------------------------------------------------------------------------------- table, plot
def rows(soak: dict) -> list[list[str]]:
    checks, ratios = soak["checks"], soak["ratios"]
    ok = all(checks.values())
    each = fmt(soak["mean_seconds_per_injection"] * 1e3, 3)
    text = (
        f"soak: {soak['injections']:,} injections ({each} ms each): finite {checks['finite']}, RMS max/first "
        f"{fmt(ratios['max_rms_vs_first'])}, RSS max/start {fmt(ratios['rss_max_vs_steady_start'], 3)}, "
        f"time per injection last/first tenth {fmt(ratios['time_last_vs_first'])}"
    )
    return [["7", text, "", "", "", "–", "finite, bounded, flat", "yes" if ok else "**no**"]]


def plot(plt, result: dict):
    records = result["records"]
    steps = [r["injections"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    axes[0].plot(steps, [r["rms"] for r in records], label="RMS")
    axes[0].plot(steps, [r["max_abs"] for r in records], label="max |x|")
    axes[0].set_title("memory values", fontsize=9)
    axes[0].legend(fontsize=8)
    rss = [r["rss_bytes"] / 2**20 for r in records]
    axes[1].plot(steps, rss)
    axes[1].ticklabel_format(axis="y", useOffset=False, style="plain")
    axes[1].set_ylim(0.9 * min(rss), 1.1 * max(rss))  # growth shown at its real size, not magnified
    axes[1].set_title("process RSS (MiB)", fontsize=9)
    axes[2].plot(steps, [r["seconds_per_injection"] * 1000 for r in records])
    axes[2].set_title("ms per injection", fontsize=9)
    axes[2].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("injections")
    fig.suptitle(f"soak: {result['injections']:,} injections into {result['memories']} memories", fontsize=9)
    return fig


MEASURE = Measure("soak", 7, "soak", run, rows, figure="soak.png", plot=plot, source="soak", uses_model=False)
