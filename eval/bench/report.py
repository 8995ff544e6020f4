"""Outputs: the JSON, PNG plots (matplotlib, Agg, imported only here) and a markdown table made from the JSON."""

import json
import os


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
        handle.write("\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------------------------------------- plots
def plot_bench(result: dict, out_dir: str) -> list[str]:
    """`ttft.png`, `per_query_cost.png`, `throughput.png`; returns the paths written."""
    plt = _pyplot()
    measures, title = result["measures"], _title(result)
    paths = []
    for name, draw in (("ttft.png", _plot_ttft), ("per_query_cost.png", _plot_cost), ("throughput.png", _plot_tput)):
        fig = draw(plt, measures)
        fig.suptitle(title, fontsize=8)
        paths.append(_save(fig, out_dir, name))
        plt.close(fig)
    return paths


def _title(result: dict) -> str:
    machine, model = result["machine"], result["settings"]["model"]
    return f"{model['name']} | {machine['device_name']} | {machine['torch_threads']} threads"


def _plot_ttft(plt, measures: dict):
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


def _plot_cost(plt, measures: dict):
    cost = measures["per_query_cost"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    rows = cost["memoryllm"]
    for kind, marker in (("measured", "o"), ("simulated", "x")):
        points = [(r["injected_tokens"], r["median_s"] * 1000) for r in rows if r["injected"] == kind]
        if points:
            ax.plot(*zip(*points), marker, color="#2a7", label=f"MemoryLLM, cached prefix ({kind} injection)")
    ax.plot([r["injected_tokens"] for r in rows], [r["median_s"] * 1000 for r in rows], "-", color="#2a7", alpha=0.5)
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


def _plot_tput(plt, measures: dict):
    injection, decode = measures["injection"], measures["decode"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    single = injection["single"]["variants"]
    bars = axes[0].bar(list(single), [v["tokens_per_s"] for v in single.values()], color=["#2a7", "#7c9", "#888"])
    axes[0].bar_label(bars, fmt="%.0f", fontsize=8)
    axes[0].set_ylabel("tokens/s")
    axes[0].set_title(f"one chunk of {injection['single']['chunk_tokens']} tokens", fontsize=9)
    batched = injection["batched"]
    counts = [b["memories"] for b in batched]
    axes[1].plot(counts, [b["batched"]["tokens_per_s"] for b in batched], "o-", label="batched", color="#2a7")
    axes[1].plot(counts, [b["sequential"]["tokens_per_s"] for b in batched], "s-", label="sequential", color="#888")
    axes[1].set_xlabel("independent memories")
    axes[1].set_ylabel("injected tokens/s")
    axes[1].legend(fontsize=8)
    axes[1].set_title("batched injection", fontsize=9)
    speeds = decode["variants"]
    bars = axes[2].bar(list(speeds), [v["tokens_per_s"] for v in speeds.values()], color=["#2a7", "#888"])
    axes[2].bar_label(bars, fmt="%.1f", fontsize=8)
    axes[2].set_ylabel("decoded tokens/s")
    axes[2].set_title(f"greedy decode, {decode['decode_tokens']} tokens", fontsize=9)
    return fig


def plot_soak(result: dict, out_dir: str) -> str:
    plt = _pyplot()
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
    path = _save(fig, out_dir, "soak.png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------- table
def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def _ms(seconds) -> str:
    return "–" if seconds is None else f"{seconds * 1000:,.1f} ms"


def _met(target: dict | None) -> str:
    if target is None or not target["applies"]:
        return "report"
    return "yes" if target["met"] else "**no**"


def _goal(target: dict | None) -> str:
    if target is None:
        return "–"
    if target["op"] == "within":
        return f"1 ± {target['threshold']:.2f}"
    return f"{target['op']} {target['threshold']:g}"


TABLE_HEADER = (
    "| # | Measure | Measured (median) | Baseline (median) | Ratio | Target | Met |",
    "|---|---|---|---|---|---|---|",
)


def soak_table(soak: dict) -> str:
    return "\n".join([*TABLE_HEADER, "| " + " | ".join(_soak_row(soak)) + " |"]) + "\n"


def table(result: dict, soak: dict | None = None) -> str:
    """The README table: one row per ratio, with its target and whether it is met."""
    machine, settings = result["machine"], result["settings"]
    lines = [
        f"Model: {settings['model']['name']} ({settings['model']['dtype']}); device: {machine['device_name']}; "
        f"torch {machine['torch']} ({machine['torch_threads']} threads), transformers {machine['transformers']}; "
        f"mode: {result['mode']}; medians of {settings['repeats']} repeats after {settings['warmup']} warm-up.",
        "",
        *TABLE_HEADER,
    ]
    for row in _rows(result["measures"]):
        lines.append("| " + " | ".join(row) + " |")
    if soak is not None:
        lines.append("| " + " | ".join(_soak_row(soak)) + " |")
    return "\n".join(lines) + "\n"


def _rows(measures: dict) -> list[list[str]]:
    return [
        *_ttft_rows(measures["ttft"]),
        *_sweep_rows(measures["ttft"]),
        *_cost_rows(measures["per_query_cost"]),
        *_injection_rows(measures["injection"]),
        *_decode_rows(measures["decode"]),
        *_size_rows(measures["size"]),
        *_gpu_rows(measures["gpu_8b"]),
    ]


def _ttft_rows(ttft: dict) -> list[list[str]]:
    v, r, t = ttft["variants"], ttft["ratios"], ttft["targets"]
    name = f"TTFT, {ttft['query_tokens']}-token query"
    return [
        [
            "1",
            f"{name}, memory KV cached vs plain backbone",
            _ms(v["cached"]["median_s"]),
            _ms(v["plain"]["median_s"]),
            _fmt(r["cached_vs_plain"]),
            _goal(t[0]),
            _met(t[0]),
        ],
        [
            "1",
            f"{name}, memory recomputed per call vs cached",
            _ms(v["recompute"]["median_s"]),
            _ms(v["cached"]["median_s"]),
            _fmt(r["recompute_vs_cached"]),
            _goal(t[1]),
            _met(t[1]),
        ],
        [
            "1",
            f"{name}, {ttft['injected_tokens']:,} injected tokens in the prompt vs cached",
            _ms(v["in_context"]["median_s"]),
            _ms(v["cached"]["median_s"]),
            _fmt(r["in_context_vs_cached"]),
            "–",
            "report",
        ],
    ]


def _sweep_rows(ttft: dict) -> list[list[str]]:
    rows = []
    for point in ttft.get("by_query_tokens", []):
        v = point["variants"]
        rows.append(
            [
                "1",
                f"TTFT, {point['query_tokens']}-token query: cached vs plain; recomputed per call vs cached "
                f"{_fmt(point['recompute_vs_cached'])}x ({_ms(v['recompute']['median_s'])})",
                _ms(v["cached"]["median_s"]),
                _ms(v["plain"]["median_s"]),
                _fmt(point["cached_vs_plain"]),
                "–",
                "report",
            ]
        )
    return rows


def _cost_rows(cost: dict) -> list[list[str]]:
    rows, t = cost["memoryllm"], cost["targets"]
    first, last = rows[0], rows[-1]
    fits = [r for r in cost["in_context"] if r["fits"]]
    longest = fits[-1] if fits else None
    out = [
        [
            "2",
            f"per-query cost at {last['injected_tokens']:,} ({last['injected']}) vs {first['injected_tokens']:,} "
            f"injected tokens (measured up to {cost['max_measured_injected_tokens']:,})",
            _ms(last["median_s"]),
            _ms(first["median_s"]),
            _fmt(cost["ratios"]["last_vs_first"], 3),
            _goal(t[0]),
            _met(t[0]),
        ],
        [
            "2",
            "per-query cost, max / min over all points",
            "",
            "",
            _fmt(cost["ratios"]["max_vs_min"], 3),
            _goal(t[1]),
            _met(t[1]),
        ],
    ]
    if longest is not None:
        out.append(
            [
                "2",
                f"in-context, {longest['injected_tokens']:,} tokens in the prompt (longest that fits) vs MemoryLLM",
                _ms(longest["median_s"]),
                _ms(last["median_s"]),
                _fmt(longest["median_s"] / last["median_s"]),
                "–",
                "report",
            ]
        )
    return out


def _injection_rows(injection: dict) -> list[list[str]]:
    single, t = injection["single"], injection["targets"]
    v = single["variants"]
    rows = [
        [
            "3",
            f"injection of {single['chunk_tokens']} tokens into a full memory vs plain forward (tokens/s: "
            f"{v['inject']['tokens_per_s']:,.0f} vs {v['plain_forward']['tokens_per_s']:,.0f}); state update "
            f"{single['state_update_share'] * 100:.0f}% of it",
            _ms(v["inject"]["median_s"]),
            _ms(v["plain_forward"]["median_s"]),
            _fmt(single["inject_vs_forward"]),
            _goal(t[0]),
            _met(t[0]),
        ],
    ]
    for b in injection["batched"]:
        applies = t[1] if b["memories"] == 8 else None
        rows.append(
            [
                "3",
                f"{b['memories']} memories: batched vs sequential injection (throughput ratio)",
                _ms(b["batched"]["median_s"]),
                _ms(b["sequential"]["median_s"]),
                _fmt(b["batched_throughput_vs_sequential"]),
                _goal(applies),
                _met(applies),
            ]
        )
    return rows


def _decode_rows(decode: dict) -> list[list[str]]:
    v = decode["variants"]
    return [
        [
            "4",
            "decode tokens/s with memory vs plain backbone",
            f"{v['memory']['tokens_per_s']:.1f} tok/s",
            f"{v['plain']['tokens_per_s']:.1f} tok/s",
            _fmt(decode["ratios"]["memory_vs_plain_tokens_per_s"]),
            "–",
            "report",
        ],
    ]


def _size_rows(size: dict) -> list[list[str]]:
    t, formula = size["targets"], size["formula_bytes"]
    shape = "·".join(str(x) for x in size["shape"])
    return [
        [
            "5",
            f"state in RAM ({shape}, {size['dtype']}) vs L·M·d·bytes",
            f"{size['state_nbytes']:,} B",
            f"{formula:,} B",
            _fmt(size["ratios"]["nbytes_vs_formula"], 4),
            _goal(t[0]),
            _met(t[0]),
        ],
        [
            "5",
            f"file on disk vs L·M·d·bytes (save {_ms(size['save']['median_s'])}, load "
            f"{_ms(size['load']['median_s'])}; cached prefix K/V {_fmt(size['prefix_cache_bytes'])} B)",
            f"{size['file_bytes']:,} B",
            f"{formula:,} B",
            _fmt(size["ratios"]["file_vs_formula"], 4),
            _goal(t[1]),
            _met(t[1]),
        ],
    ]


def _gpu_rows(gpu: dict) -> list[list[str]]:
    if gpu.get("skipped"):
        return [["6", "8B shape on GPU: peak memory, 2k-token query", "skipped", "", "", "< 18,000 MB", gpu["reason"]]]
    off, on, t = gpu["memory_offloaded"], gpu["memory_on_gpu"], gpu["targets"][0]
    return [
        [
            "6",
            f"8B shape, memory on GPU: peak MiB (paper {gpu['paper_mb']['memory_on_gpu']:,}); TTFT "
            f"{_ms(on['cached']['median_s'])}",
            _fmt(on["peak_allocated_mb"], 0),
            "",
            _fmt(gpu["ratios"]["peak_on_gpu_vs_paper"]),
            "–",
            "report",
        ],
        [
            "6",
            f"8B shape, memory offloaded: peak MiB vs 18,000 (paper {gpu['paper_mb']['memory_offloaded']:,}); TTFT "
            f"{_ms(off['cached']['median_s'])}",
            _fmt(off["peak_allocated_mb"], 0),
            "18,000",
            _fmt(t["value"]),
            _goal(t),
            _met(t),
        ],
    ]


def _soak_row(soak: dict) -> list[str]:
    checks, ratios = soak["checks"], soak["ratios"]
    ok = all(checks.values())
    each = _fmt(soak["mean_seconds_per_injection"] * 1e3, 3)
    text = (
        f"soak: {soak['injections']:,} injections ({each} ms each): finite {checks['finite']}, RMS max/first "
        f"{_fmt(ratios['max_rms_vs_first'])}, RSS max/start {_fmt(ratios['rss_max_vs_steady_start'], 3)}, "
        f"time per injection last/first tenth {_fmt(ratios['time_last_vs_first'])}"
    )
    return ["7", text, "", "", "", "finite, bounded, flat", "yes" if ok else "**no**"]
