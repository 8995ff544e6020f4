"""Cells of the markdown table (`bench_table.md`):
`| # | Measure | Measured | Baseline | Ratio | Floor | Target | Met |`."""


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def ms(seconds) -> str:
    return "–" if seconds is None else f"{seconds * 1000:,.1f} ms"


def met(target: dict | None) -> str:
    if target is None or not target["applies"]:
        return "report"
    return "yes" if target["met"] else "**no**"


def goal(target: dict | None) -> str:
    """The Target cell; a target on the ratio over its floor (its name says "floor") reads "<= 1.1 × floor"."""
    if target is None:
        return "–"
    if target["op"] == "within":
        return f"1 ± {target['threshold']:.2f}"
    text = f"{target['op']} {target['threshold']:g}"
    return f"{text} × floor" if "floor" in target["name"] else text


def floor(value: dict | None) -> str:
    """The floor of a ratio (`floors.py`) and what bounds it: FLOPs (compute) or bytes (bandwidth)."""
    if value is None:
        return "–"
    kind = "bytes" if value["bound"] == "bandwidth" else "FLOPs"
    rows = f", {value['prefix_rows_read']:,} prefix rows" if value.get("prefix_rows_read") is not None else ""
    return f"{value['ratio']:.2f} ({kind}{rows})"


def row(
    number: int,
    text: str,
    measured: str,
    baseline: str,
    ratio: str,
    target: dict | None = None,
    floor_value: dict | None = None,
) -> list[str]:
    """One table row; without a target, Target is "–" and Met is "report"; without a floor, Floor is "–"."""
    return [str(number), text, measured, baseline, ratio, floor(floor_value), goal(target), met(target)]
