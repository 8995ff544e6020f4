"""The measures of `python -m eval bench`, one module each (its measurement, its table rows, its plot), in the one
registry below: `run.py` runs them in this order, `report.py` writes their rows and figures in this order.

1 `ttft`, 2 `per_query_cost`, 3 `injection`, 4 `decode`, 5 `size` (on the model under test), 6 `gpu_8b` (the 8B
shape, GPU only) and 8 `read` (a query's choice of chunk; the default only) make `bench.json`; 7 `soak` (`--soak N`)
makes `soak.json`.
"""

from . import decode, gpu_8b, injection, per_query_cost, read, size, soak, ttft
from .base import COST_POINTS, Bench, Context, Measure, log


MEASURES: tuple[Measure, ...] = (
    ttft.MEASURE,
    per_query_cost.MEASURE,
    injection.MEASURE,
    decode.MEASURE,
    size.MEASURE,
    read.MEASURE,
    gpu_8b.MEASURE,
    soak.MEASURE,
)


def of(source: str) -> tuple[Measure, ...]:
    """The measures of `bench.json` (`"bench"`) or of `soak.json` (`"soak"`), in order."""
    return tuple(measure for measure in MEASURES if measure.source == source)


__all__ = ["COST_POINTS", "MEASURES", "Bench", "Context", "Measure", "log", "of"]
