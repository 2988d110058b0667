"""Rates with their uncertainty: every reported share carries a Wilson score interval."""

from __future__ import annotations

import math
from dataclasses import dataclass


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) for k successes in n trials; nan when n is 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """k of n, with its Wilson 95% interval (serialised with all five numbers so readers need no maths)."""

    k: int
    n: int
    rate: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")

    def __post_init__(self) -> None:
        low, high = wilson(self.k, self.n)
        object.__setattr__(self, "rate", self.k / self.n if self.n else float("nan"))
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @property
    def interval(self) -> str:
        """The Wilson interval in percent, as every table and log line prints it: "36.1-48.0%"."""
        return f"{100 * self.low:.1f}-{100 * self.high:.1f}%" if self.n else "-"
