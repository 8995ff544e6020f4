"""Measure 5: the state's bytes in RAM and on disk vs L*M*d*bytes (plus L*A*d*bytes for an archive of A rows,
`archive_rows`); save and load times; the cached prefix's bytes."""

import os
import tempfile

from modeling_memoryllm import MemoryState

from ..timing import ratio, rss_bytes, summary
from .base import Bench, Context, Measure, prefill, target
from .cells import fmt, ms, row


def measure_size(bench: Bench, full: MemoryState, out_dir: str) -> dict:
    """The state's bytes in RAM and on disk vs L*M*d*bytes; save and load times; the cached prefix's bytes."""
    config = bench.model.config
    layers, rows, hidden = full.memory.shape
    archive = getattr(full, "archive", [])
    archive_rows = sum(chunk.shape[1] for _, chunk in archive)
    archive_bytes = sum(chunk.numel() * chunk.element_size() for _, chunk in archive)
    formula = layers * rows * hidden * full.memory.element_size() + archive_bytes
    before = rss_bytes()
    copy = full.to(device="cpu")
    rss_delta = rss_bytes() - before
    with tempfile.TemporaryDirectory(dir=out_dir) as folder:
        path = os.path.join(folder, "memory.safetensors")
        saves = bench.time({"save": lambda: copy.save(path, config=config)})["save"]
        file_bytes = os.path.getsize(path)
        loads = bench.time({"load": lambda: bench.model.load_memory_state(path)})["load"]  # the variant's class
    prefix = _prefix_bytes(bench, full)
    return {
        "description": "memory state size vs L*M*d*bytes; safetensors file; save/load; cached prefix keys/values",
        "shape": [layers, rows, hidden],
        "archive_rows": archive_rows,
        "archive_bytes": archive_bytes,
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
            target("state.nbytes / (L*M*d + L*A*d)*bytes", ratio(full.nbytes, formula), "within", 0.01),
            target("file size / (L*M*d + L*A*d)*bytes", ratio(file_bytes, formula), "within", 0.01),
        ],
    }


def _prefix_bytes(bench: Bench, state: MemoryState) -> int | None:
    """Bytes of the cached prefix buffers of `state` (keys and values of every layer, spare rows included)."""
    prefill(bench.model, bench.query(), state)
    prefix = state.prefix
    if prefix is None:
        return None
    return sum(t.numel() * t.element_size() for t in (*prefix.key_buffers, *prefix.value_buffers))


def run(context: Context) -> dict:
    return measure_size(context.bench, context.full, context.out_dir)


def rows(size: dict) -> list[list[str]]:
    t, formula = size["targets"], f"{size['formula_bytes']:,} B"
    shape = "·".join(str(x) for x in size["shape"])
    if size.get("archive_rows"):
        shape += f", archive of {size['archive_rows']:,} rows"
    text = (
        f"file on disk vs L·M·d·bytes (save {ms(size['save']['median_s'])}, load "
        f"{ms(size['load']['median_s'])}; cached prefix K/V {fmt(size['prefix_cache_bytes'])} B)"
    )
    ram = f"state in RAM ({shape}, {size['dtype']}) vs L·M·d·bytes"
    return [
        row(5, ram, f"{size['state_nbytes']:,} B", formula, fmt(size["ratios"]["nbytes_vs_formula"], 4), t[0]),
        row(5, text, f"{size['file_bytes']:,} B", formula, fmt(size["ratios"]["file_vs_formula"], 4), t[1]),
    ]


MEASURE = Measure("size", 5, "state size, save, load", run, rows)
