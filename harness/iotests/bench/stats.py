"""Summaries that say how much a figure moves, not only where it sits."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Spread:
    n: int
    median: float
    low: float  # min
    high: float  # max
    q1: float
    q3: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            raise ValueError("no samples")
        v = sorted(values)
        if len(v) == 1:
            q1 = q3 = v[0]
        else:
            q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
        return cls(len(v), statistics.median(v), v[0], v[-1], q1, q3)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_ratios(num: list[float], den: list[float]) -> list[float]:
    """num[k]/den[k] for each repetition k (a 0 denominator gives inf)."""
    if len(num) != len(den):
        raise ValueError(f"unpaired: {len(num)} vs {len(den)} samples")
    return [n / d if d else float("inf") for n, d in zip(num, den, strict=True)]


def rotate(items: list[Any], k: int) -> list[Any]:
    """Repetition k's order: each exporter goes first equally often, so
    whatever drifts during a repetition does not always favour one."""
    if not items:
        return []
    k %= len(items)
    return items[k:] + items[:k]
