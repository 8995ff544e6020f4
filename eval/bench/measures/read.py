"""Measure 8: what a query's choice of chunk costs (`memory_read: "relevant"`, `training-free-ranked`): time to first
token of a query that reads its chunk in place, one that reads it whole from the archive (`archive_rows`) for the
first time in this memory version (its keys/values projected) and again (kept on the prefix, `SharedPrefix.tails`),
the whole memory (`reading_every_row`) and the plain backbone. The memory holds 21 texts of 200 random tokens, so
the first text has lost rows to the drop (the archive holds it whole) and the last one is intact."""

import torch

from modeling_memoryllm.export import reading_every_row

from ..floors import Shape, ttft_floor
from ..models import random_tokens
from ..timing import ratio, summary
from .base import Bench, Context, Measure, inject, median, prefill, rows_read, target
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


def restore_floor(shape: Shape, tokens: int, restored: int, in_place: int, projected: int = 0) -> dict:
    """Reading a chunk restored from the archive vs one in place: prefills attending to `restored` and `in_place`
    prefix rows, plus (the first time) the key/value projections of the `projected` restored rows in every layer
    (FLOPs)."""
    in_place_flops = ttft_floor(shape, tokens, in_place)["memory_flops"]
    projections = shape.layers * shape.key_value_flops(projected)
    restored_flops = ttft_floor(shape, tokens, restored)["memory_flops"] + projections
    return {
        "bound": "compute",
        "prefix_rows_read": restored,
        "in_place_flops": in_place_flops,
        "restored_flops": restored_flops,
        "ratio": restored_flops / in_place_flops,
    }


def forget_restored(state) -> None:
    """Drop the restored chunks' keys/values kept on `state`'s cached prefix (the next restore projects again)."""
    if state.prefix is not None:
        state.prefix.tails.clear()


def restores(model, state, query: torch.Tensor) -> bool:
    """Whether `query` reads its chunk whole from the archive (`QueryRead.tail_rows`)."""
    with torch.inference_mode():
        read = model.variant.query_read(model, [state], query, None, None)
    return read is not None and read.tail_rows is not None


def measure_at(bench: Bench, state, texts: torch.Tensor, tokens: int) -> dict:
    """TTFT at a `tokens`-token query: plain, in place (the last text), restored (the first) for the first time and
    again, the whole memory."""
    model = bench.model
    about_first, about_last = query_about(bench, texts[0], tokens), query_about(bench, texts[-1], tokens)

    def whole():
        with reading_every_row(model):
            prefill(model, about_first, state)

    def first_restore():
        forget_restored(state)
        prefill(model, about_first, state)

    samples = bench.time(
        {
            "plain": lambda: prefill(model, about_first, model.new_memory_state()),
            "in_place": lambda: prefill(model, about_last, state),
            "restored_first": first_restore,
            "restored_again": lambda: prefill(model, about_first, state),
            "whole_memory": whole,
        }
    )
    med = {name: median(s) for name, s in samples.items()}
    shape, chunk = Shape.of(model), min(TEXT_TOKENS, model.config.max_inject_length)
    restored, in_place = rows_read(model, about_first, state), rows_read(model, about_last, state)
    floors = {
        "first": restore_floor(shape, tokens, restored, in_place, projected=chunk),
        "again": restore_floor(shape, tokens, restored, in_place),
    }
    ratios = {}
    for kind, floor in floors.items():
        ratios[f"restored_{kind}_vs_in_place"] = ratio(med[f"restored_{kind}"], med["in_place"])
        ratios[f"restored_{kind}_vs_in_place_vs_floor"] = ratio(ratios[f"restored_{kind}_vs_in_place"], floor["ratio"])
    return {
        "query_tokens": tokens,
        "restores": {"first": restores(model, state, about_first), "last": restores(model, state, about_last)},
        "prefix_rows_read": {"restored": restored, "in_place": in_place},
        "variants": {name: summary(s) for name, s in samples.items()},
        "ratios": {
            **ratios,
            "in_place_vs_whole_memory": ratio(med["in_place"], med["whole_memory"]),
            "in_place_vs_plain": ratio(med["in_place"], med["plain"]),
            "floors": floors,
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
                f"{p['query_tokens']}-token query: restored ({kind}) / in-place TTFT, over its FLOP floor",
                p["ratios"][f"restored_{kind}_vs_in_place_vs_floor"],
                "<=",
                1.1,
            )
            for p in points
            for kind in ("first", "again")
        ],
    }


def rows(read: dict) -> list[list[str]]:
    if "skipped" in read:
        return [row(8, f"relevant read: skipped ({read['skipped']})", "–", "–", "–")]
    table, targets = [], iter(read["targets"])
    for point in read["by_query_tokens"]:
        v, r, tokens = point["variants"], point["ratios"], point["query_tokens"]
        for kind, when in (("first", "first time in this memory version"), ("again", "again, keys/values kept")):
            text = (
                f"TTFT, {tokens}-token query: chunk read whole from the archive ({when}) vs in place (whole memory "
                f"{ms(v['whole_memory']['median_s'])}, plain {ms(v['plain']['median_s'])})"
            )
            times = ms(v[f"restored_{kind}"]["median_s"]), ms(v["in_place"]["median_s"])
            ratio_text = fmt(r[f"restored_{kind}_vs_in_place"])
            table.append(row(8, text, *times, ratio_text, next(targets), r["floors"][kind]))
    return table


MEASURE = Measure("read", 8, "relevant read", run, rows, grows=False)
