"""Pure statistics used by every benchmark: percentiles, summaries, medians, ratios."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default 'linear' method). None for an empty sequence."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Iterable[float], percentiles: Sequence[float] = PERCENTILES) -> dict[str, float | None]:
    """{"mean", "p50", "p90", "p99", "min", "max", "n"} of the values; None fields when empty."""
    xs = [float(v) for v in values]
    out: dict[str, float | None] = {"n": len(xs), "mean": sum(xs) / len(xs) if xs else None,
                                    "min": min(xs) if xs else None, "max": max(xs) if xs else None}
    for q in percentiles:
        out[f"p{q:g}"] = percentile(xs, q)
    return out


def median(values: Iterable[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return percentile(xs, 50) if xs else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator
