"""Outputs: the JSON, the PNG plots (matplotlib, Agg, imported only here) and the markdown table, all made from the
JSON by going through the registry of measures (`measures/__init__.py`): each measure draws its own figure and
writes its own rows."""

import json
import os

from .measures import Measure, of


TABLE_HEADER = (
    "| # | Measure | Measured (median) | Baseline (median) | Ratio | Floor | Target | Met |",
    "|---|---|---|---|---|---|---|---|",
)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
        handle.write("\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(measure: Measure, data: dict, out_dir: str, title: str | None = None) -> str:
    """`measure`'s figure from `data` (bench.json's measures, or the soak's result), titled `title` if given."""
    plt = _pyplot()
    fig = measure.plot(plt, data)
    if title is not None:
        fig.suptitle(title, fontsize=8)
    path = os.path.join(out_dir, measure.figure)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bench(result: dict, out_dir: str) -> list[str]:
    """The figures of `bench.json`'s measures (`ttft.png`, `per_query_cost.png`, `throughput.png`); their paths."""
    machine, model = result["machine"], result["settings"]["model"]
    title = f"{model['name']} | {machine['device_name']} | {machine['torch_threads']} threads"
    present = result["measures"]
    return [_draw(m, present, out_dir, title) for m in of("bench") if m.plot and m.key in present]


def plot_soak(soak: dict, out_dir: str) -> list[str]:
    """`soak.png`; its path, in a list."""
    return [_draw(measure, soak, out_dir) for measure in of("soak") if measure.plot]


def table(result: dict | None, soak: dict | None = None) -> str:
    """The README table: one row per ratio, with its target and whether it is met; after a header line about the
    run when there is a `bench.json` (`result`), and with the soak's row when there is a `soak.json`."""
    lines = []
    if result is not None:
        machine, settings = result["machine"], result["settings"]
        lines += [
            f"Model: {settings['model']['name']} ({settings['model']['dtype']}); device: {machine['device_name']}; "
            f"torch {machine['torch']} ({machine['torch_threads']} threads), transformers {machine['transformers']}; "
            f"mode: {result['mode']}; medians of {settings['repeats']} repeats after {settings['warmup']} warm-up.",
            "",
        ]
    lines += TABLE_HEADER
    present = result["measures"] if result is not None else {}
    rows = [row for m in of("bench") if m.key in present for row in m.rows(present[m.key])]
    rows += [row for m in of("soak") if soak is not None for row in m.rows(soak)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
