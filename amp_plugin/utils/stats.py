"""Summaries of repeated measurements: median and quartiles, and a distribution-free
interval for a median (from order statistics), so that a difference is claimed only when
it is larger than the noise of the measurements."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def spread(values: Sequence[float]) -> dict[str, float] | None:
    """{min, mean, max} of `values` (None if there are none)."""
    if not values:
        return None
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


def quartiles(values: Sequence[float]) -> dict[str, float]:
    """{median, q1, q3, min, max} of at least one value (q1 = q3 = the value for one)."""
    if not values:
        raise ValueError("quartiles: no values")
    v = sorted(values)
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else v * 3
    return {"median": statistics.median(v), "q1": q1, "q3": q3, "min": v[0], "max": v[-1]}


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage): the widest-needed pair of order statistics x(k) <= x(n-k+1)
    that holds the true median with probability >= `level` for any continuous
    distribution (binomial tails); with too few values for `level`, (min, max) and the
    coverage they do have (1 - 2 / 2^n)."""
    if not values:
        raise ValueError("median_interval: no values")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a probability in (0, 1), got {level}")
    v, n = sorted(values), len(values)
    tail, k = 0.0, 0  # tail = P(Binomial(n, 1/2) <= k - 1)
    while k + 1 <= (n + 1) // 2:
        below = tail + math.comb(n, k) / 2 ** n
        if below > (1 - level) / 2:
            break
        tail, k = below, k + 1
    k = max(k, 1)  # (min, max) at least
    tail = sum(math.comb(n, i) for i in range(k)) / 2 ** n
    return v[k - 1], v[n - k], 1 - 2 * tail


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float],
                 level: float = 0.95) -> dict:
    """The ratio of two measured quantities taken in pairs (the same repeat of an
    interleaved measurement): the ratio of their medians, the interval of the median of
    the per-pair ratios (widened to hold the ratio of medians), and whether the interval
    excludes 1, i.e. whether they differ beyond their spread."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"paired_ratio: need pairs, got {len(numerator)} and "
                         f"{len(denominator)} values")
    ratios = [a / b for a, b in zip(numerator, denominator)]
    value = statistics.median(numerator) / statistics.median(denominator)
    low, high, coverage = median_interval(ratios, level)
    low, high = min(low, value), max(high, value)
    return {"ratio": value, "low": low, "high": high, "coverage": coverage,
            "differs": not low <= 1.0 <= high}
