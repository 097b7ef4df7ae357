"""Order statistics the benchmarks report (None values are left out)."""

from __future__ import annotations

import statistics


def pct(xs, q: float) -> float | None:
    """The q-quantile (0..1), linear between order statistics; None for no values."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def med(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
