"""Cells of the markdown table (`bench_table.md`): `| # | Measure | Measured | Baseline | Ratio | Target | Met |`."""


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
    if target is None:
        return "–"
    if target["op"] == "within":
        return f"1 ± {target['threshold']:.2f}"
    return f"{target['op']} {target['threshold']:g}"


def row(number: int, text: str, measured: str, baseline: str, ratio: str, target: dict | None = None) -> list[str]:
    """One table row; without a target, Target is "–" and Met is "report"."""
    return [str(number), text, measured, baseline, ratio, goal(target), met(target)]
