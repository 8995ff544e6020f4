"""What the page shows: a memory's `serving.memory_stats` as Markdown, its provenance as an SVG chart, the limits."""

import pathlib

import torch

from modeling_memoryllm import MemoryLLMForCausalLM, MemoryState
from modeling_memoryllm.memory_state import EMPTY_ROWS, INITIAL_ROWS
from modeling_memoryllm.serving import memory_stats

from .settings import Settings


CHART_COLORS = {"injection": "#4f6df5", "never written": "#c9cbd3", "initial": "#f59f4f"}
SOURCES = {EMPTY_ROWS: ("empty", "never written"), INITIAL_ROWS: ("initial", "initial")}  # else: an injection


def memory_view(state: MemoryState) -> tuple[str, str]:
    """The memory's stats (Markdown) and provenance chart (HTML)."""
    stats = memory_stats(state)
    return stats_markdown(stats), provenance_chart(stats)


def stats_markdown(stats: dict) -> str:
    """A few lines of Markdown: shape and size, injections absorbed, rows per layer by injection."""
    rows, initial = stats["rows"], stats["initial_rows"]
    by_injection = ", ".join(f"#{k}: {v:.4g}" for k, v in stats["rows_by_injection"].items())
    lines = [
        f"**{stats['layers']} layers × {rows:,} rows** of width {stats['width']} ({stats['megabytes']:.3g} MB, "
        f"{stats['dtype']})",
        f"**Injections absorbed:** {stats['injections']} · **rows written:** {stats['rows_written']:,} of {rows:,} "
        "per layer",
        f"**Rows per layer by injection:** {by_injection or 'none yet'}"
        + (f" · rows it started with: {initial:,}" if initial else ""),
    ]
    if stats.get("archived_chunks"):
        lines.append(
            f"**Archive:** {stats['archived_chunks']} chunks kept whole ({stats['archived_rows']:,} rows per layer), "
            "read whole when a question's chunk lost rows"
        )
    return "  \n".join(lines)


def provenance_rows(stats: dict) -> list[tuple[str, float, str]]:
    """`(source, rows per layer, kind)` by where rows came from: one per injection, never-written and initial rows."""
    records = []
    for key, value in stats["rows_by_source"].items():
        source, kind = SOURCES.get(key, (f"#{key}", "injection"))
        records.append((source, value, kind))
    return records


def provenance_chart(stats: dict) -> str:
    """`provenance_rows` as an inline SVG bar chart (no script, no outside request), y from 0 to the rows per
    layer, so that the share of each injection shows. Labels thin out when there are many bars."""
    bars, rows = provenance_rows(stats), stats["rows"]
    width, height, left, bottom, top = 640, 230, 48, 36, 14
    plot_w, plot_h = width - left - 8, height - bottom - top
    slot = plot_w / max(len(bars), 8)  # bars no wider than an eighth
    step = max(1, -(-len(bars) // 16))  # at most 16 labels
    parts = [f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 8}" y2="{top + plot_h}" stroke="#888"/>']
    for tick in (0, rows // 2, rows):
        y = top + plot_h * (1 - tick / rows)
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="12">{tick:,}</text>')
    for index, (source, value, kind) in enumerate(bars):
        bar_h, x = plot_h * value / rows, left + index * slot
        parts.append(
            f'<rect x="{x + slot * 0.1:.1f}" y="{top + plot_h - bar_h:.1f}" width="{slot * 0.8:.1f}" '
            f'height="{bar_h:.1f}" fill="{CHART_COLORS[kind]}"><title>{source}: {value:.4g} rows</title></rect>'
        )
        if index % step == 0:
            label_y = top + plot_h + 15
            parts.append(
                f'<text x="{x + slot / 2:.1f}" y="{label_y}" text-anchor="middle" font-size="12">{source}</text>'
            )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle" font-size="12">'
        "injection that wrote the rows (empty: never written)</text>"
    )
    svg = f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" xmlns="http://www.w3.org/2000/svg">'
    title = "<b>Where the memory rows came from</b> (rows per layer)"
    caption = "<small>Once the memory is full, each injection drops old rows at random: older injections fade.</small>"
    return f'<div id="provenance">{title}{svg}{"".join(parts)}</svg>{caption}</div>'


def chat_message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def limits_note(settings: Settings, model: MemoryLLMForCausalLM, memory_dtype: torch.dtype, embedded: bool) -> str:
    """The page's footnote: the limits, a session memory's size, how long it lives, and the model (`embedded`: the
    embedded default)."""
    config = model.config
    state_mb = config.num_hidden_layers * config.memory_rows * config.hidden_size * memory_dtype.itemsize / 1e6
    named = settings.model or pathlib.Path(model.name_or_path or "MemoryLLM").name
    model_name = "the embedded SmolLM2-135M-Instruct" if embedded else named
    return (
        f"<small>Limits: {settings.max_inject_chars:,} characters per injection, {settings.max_question_chars:,} per "
        f"question, {settings.max_new_tokens} answer tokens. A memory takes {state_mb:.1f} MB "
        f"({settings.memory_dtype}); it is dropped after {settings.session_ttl / 60:.0f} minutes without activity. "
        f"Model: {model_name}.</small>"
    )
