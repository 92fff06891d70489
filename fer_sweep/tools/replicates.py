"""Replicates: runs that differ only in their seeds, summarised as mean ± sd with a 95 %
confidence interval, and differences between two groups with Welch's interval — or, where a
side has a single run, with the seed-to-seed sd pooled over every replicated group (and any
outside estimate), as a classic two-sample t interval.

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
    """b − a with its 95 % interval: Welch's (unequal variances; Welch-Satterthwaite df), or
    from a pooled sd (``method`` says which; None: no interval)."""

    delta: float
    low: float | None
    high: float | None
    df: float | None
    method: str | None = None

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
        return Difference(delta, delta, delta, math.inf, "Welch")
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    half = float(stats.t.ppf(0.5 + LEVEL / 2, df)) * se
    return Difference(delta, delta - half, delta + half, df, "Welch")


@dataclass(frozen=True)
class PooledSd:
    """One seed-to-seed sd for every configuration, from the replicates of several (and an
    outside estimate, e.g. other rows of the same study): what lets two single runs be
    compared at all, on the assumption that their spreads are alike."""

    sd: float
    df: int

    def __str__(self) -> str:
        return f"pooled sd {100 * self.sd:.2f} pp, {self.df} df"


def pool(summaries: Sequence[Summary], outside: PooledSd | None = None) -> PooledSd | None:
    """The pooled sd: sqrt(sum of (n_i - 1) s_i^2 / sum of (n_i - 1)) over the replicated
    summaries and ``outside`` (its sd with its df); None when nothing has a spread."""
    parts = [(s.n - 1, s.std) for s in summaries if s.std is not None]
    if outside is not None:
        parts.append((outside.df, outside.sd))
    df = sum(d for d, _ in parts)
    if df == 0:
        return None
    return PooledSd(math.sqrt(sum(d * sd**2 for d, sd in parts) / df), df)


def pooled(a: Summary, b: Summary, sd: PooledSd) -> Difference:
    """b − a with the two-sample t interval of a common sd: t(df) * sd * sqrt(1/n_a + 1/n_b)."""
    delta = b.mean - a.mean
    half = float(stats.t.ppf(0.5 + LEVEL / 2, sd.df)) * sd.sd * math.sqrt(1 / a.n + 1 / b.n)
    return Difference(delta, delta - half, delta + half, float(sd.df), str(sd))


def difference(a: Summary, b: Summary, sd: PooledSd | None = None) -> Difference:
    """Welch where both sides have replicates (no assumption about their spreads); else the
    pooled sd's interval where there is one; else the bare difference."""
    if (a.std is not None and b.std is not None) or sd is None:
        return welch(a, b)
    return pooled(a, b, sd)


def group(items: Sequence[T], key: Callable[[T], Hashable]) -> list[list[T]]:
    """Items with equal keys, in the order each key first appears."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())
