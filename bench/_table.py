"""A result row and the table printer shared by the suites."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One measured figure, with its target and the baseline it is compared against."""

    suite: str
    metric: str
    value: float
    unit: str
    target: str = ""
    baseline: str = ""
    ratio: float | None = None


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (0..1) of ``samples``."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def render(rows: list[Row]) -> str:
    """A plain-text table."""
    header = ("suite", "metric", "value", "target", "baseline (same run)", "ratio")
    body = [
        (
            row.suite,
            row.metric,
            f"{_fmt(row.value)} {row.unit}",
            row.target,
            row.baseline,
            f"{row.ratio:.2f}x" if row.ratio is not None else "",
        )
        for row in rows
    ]
    widths = [max(len(str(cells[i])) for cells in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in body]
    return "\n".join(lines)


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def best_of(repeats: int, actions: dict[str, Callable[[], object]]) -> dict[str, float]:
    """The best time of each action, the actions interleaved so that noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            start = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - start)
    return {name: min(samples) for name, samples in times.items()}
