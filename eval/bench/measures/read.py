"""Measure 8: what a query's choice of chunk costs (`memory_read: "relevant"`, `training-free-ranked`): time to first
token of a query that reads its chunk in place, one that reads it whole from the archive (`archive_rows`), the whole
memory (`reading_every_row`) and the plain backbone. The memory holds 21 texts of 200 random tokens, so the first
text has lost rows to the drop (the archive holds it whole) and the last one is intact."""

import torch

from modeling_memoryllm.export import reading_every_row

from ..floors import Shape, ttft_floor
from ..models import random_tokens
from ..timing import ratio, summary
from .base import Bench, Context, Measure, inject, median, prefill, target
from .cells import fmt, ms, row


TEXTS, TEXT_TOKENS, SHARED_TOKENS, READ_SEED = 21, 200, 8, 4


def reads_chunks(model) -> bool:
    """Whether the model under test chooses a chunk per query and keeps an archive (else the measure is skipped)."""
    return model.variant.reads_per_query and int(getattr(model.config, "archive_rows", 0)) > 0


def memory_of_texts(bench: Bench):
    """A memory holding `TEXTS` random texts of `TEXT_TOKENS` tokens each, injected one by one; and the texts."""
    model = bench.model
    texts = random_tokens(model, TEXT_TOKENS, READ_SEED, rows=TEXTS)
    state = model.new_memory_state()
    for text in texts:
        inject(model, text.tolist(), state)
    return state, texts


def query_about(bench: Bench, text: torch.Tensor, tokens: int) -> torch.Tensor:
    """`[1, tokens]`: random tokens, the last `SHARED_TOKENS` of them (half, for a short query) the last tokens of
    `text` (so it reads `text`'s last chunk)."""
    query, shared = bench.query(tokens).clone(), min(SHARED_TOKENS, max(1, tokens // 2))
    query[0, -shared:] = text[-shared:].to(query.device)
    return query


def restore_floor(shape: Shape, tokens: int, rows: int) -> dict:
    """Restoring a chunk of `rows` rows vs reading it in place: the prefill plus the chunk's key/value projections
    in every layer (FLOPs; the default cache appends the chunk after the prefix, with no copy of it)."""
    cached = ttft_floor(shape, tokens)["memory_flops"]
    restored = cached + shape.layers * shape.key_value_flops(rows)
    return {"bound": "compute", "in_place_flops": cached, "restored_flops": restored, "ratio": restored / cached}


def restores(model, state, query: torch.Tensor) -> bool:
    """Whether `query` reads its chunk whole from the archive (`QueryRead.tail_rows`)."""
    with torch.inference_mode():
        read = model.variant.query_read(model, [state], query, None, None)
    return read is not None and read.tail_rows is not None


def measure_at(bench: Bench, state, texts: torch.Tensor, tokens: int) -> dict:
    """TTFT at a `tokens`-token query: plain, in place (the last text), restored (the first), the whole memory."""
    model = bench.model
    about_first, about_last = query_about(bench, texts[0], tokens), query_about(bench, texts[-1], tokens)

    def whole():
        with reading_every_row(model):
            prefill(model, about_first, state)

    samples = bench.time(
        {
            "plain": lambda: prefill(model, about_first, model.new_memory_state()),
            "in_place": lambda: prefill(model, about_last, state),
            "restored": lambda: prefill(model, about_first, state),
            "whole_memory": whole,
        }
    )
    med = {name: median(s) for name, s in samples.items()}
    floor = restore_floor(Shape.of(model), tokens, min(TEXT_TOKENS, model.config.max_inject_length))
    restored_vs_in_place = ratio(med["restored"], med["in_place"])
    return {
        "query_tokens": tokens,
        "restores": {"first": restores(model, state, about_first), "last": restores(model, state, about_last)},
        "variants": {name: summary(s) for name, s in samples.items()},
        "ratios": {
            "restored_vs_in_place": restored_vs_in_place,
            "in_place_vs_whole_memory": ratio(med["in_place"], med["whole_memory"]),
            "in_place_vs_plain": ratio(med["in_place"], med["plain"]),
            "floor": floor,
            "restored_vs_in_place_vs_floor": ratio(restored_vs_in_place, floor["ratio"]),
        },
    }


def run(context: Context) -> dict:
    bench = context.bench
    if not reads_chunks(bench.model):
        return {"skipped": "the model under test reads its whole memory (no memory_read: relevant with an archive)"}
    state, texts = memory_of_texts(bench)
    first_rows = int((state.provenance[0] == 1).sum())
    points = [measure_at(bench, state, texts, tokens) for tokens in (bench.query_tokens, *bench.sweep_query_tokens)]
    return {
        "description": "TTFT of the relevant read: chunk in place, restored from the archive, whole memory, plain",
        "texts": TEXTS,
        "text_tokens": TEXT_TOKENS,
        "first_text_rows_in_memory": first_rows,
        "archive_chunks": len(state.archive),
        "by_query_tokens": points,
        "targets": [
            target(
                f"{p['query_tokens']}-token query: restored / in-place TTFT, over its FLOP floor",
                p["ratios"]["restored_vs_in_place_vs_floor"],
                "<=",
                1.1,
            )
            for p in points
        ],
    }


def rows(read: dict) -> list[list[str]]:
    if "skipped" in read:
        return [row(8, f"relevant read: skipped ({read['skipped']})", "–", "–", "–")]
    table = []
    for point, point_target in zip(read["by_query_tokens"], read["targets"]):
        v, r, tokens = point["variants"], point["ratios"], point["query_tokens"]
        text = (
            f"TTFT, {tokens}-token query: chunk read whole from the archive vs in place (whole memory "
            f"{ms(v['whole_memory']['median_s'])}, plain {ms(v['plain']['median_s'])})"
        )
        times = ms(v["restored"]["median_s"]), ms(v["in_place"]["median_s"])
        table.append(row(8, text, *times, fmt(r["restored_vs_in_place"]), point_target, r["floor"]))
    return table


MEASURE = Measure("read", 8, "relevant read", run, rows, grows=False)
