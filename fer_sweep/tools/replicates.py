"""Replicates: runs that differ only in their seeds, summarised as mean ± sd with a 95 %
confidence interval, and differences between two groups with Welch's interval.

Why: Table 2's conclusions rest on differences of 1-3 points, about the spread of one network
trained from different seeds; a single run per row cannot say whether a difference is real.
MLflow has no aggregate over runs, so the report computes them here from the runs' metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from scipy import stats

T = TypeVar("T")

# Settings whose values make replicates of one configuration rather than different ones.
# trainer.seed: initial weights, batch order, augmentation draws; data.split_seed: which images
# are held out for validation (the test split never changes).
SEED_KEYS = ("trainer.seed", "data.split_seed")
LEVEL = 0.95


@dataclass(frozen=True)
class Summary:
    """n values: mean, sample sd and the Student-t 95 % interval (None where n < 2: one run
    says nothing about its own spread, so nothing is shown rather than a zero)."""

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None

    def contains(self, value: float) -> bool | None:
        if self.low is None or self.high is None:
            return None
        return self.low <= value <= self.high


def summarize(values: Sequence[float]) -> Summary | None:
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Summary(n, mean, None, None, None)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    """b − a with Welch's 95 % interval (unequal variances; Welch-Satterthwaite df)."""

    delta: float
    low: float | None
    high: float | None
    df: float | None

    @property
    def excludes_zero(self) -> bool | None:
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0


def welch(a: Summary, b: Summary) -> Difference:
    delta = b.mean - a.mean
    if a.std is None or b.std is None:  # n = 1 on a side: no interval
        return Difference(delta, None, None, None)
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical replicates on both sides: the difference is exact
        return Difference(delta, delta, delta, math.inf)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    half = float(stats.t.ppf(0.5 + LEVEL / 2, df)) * se
    return Difference(delta, delta - half, delta + half, df)


def group(items: Sequence[T], key: Callable[[T], Hashable]) -> list[list[T]]:
    """Items with equal keys, in the order each key first appears."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())
