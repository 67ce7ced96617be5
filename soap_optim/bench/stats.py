"""Means over seeds with 95% confidence intervals (Student's t), and whether two intervals overlap.

The t quantiles are tabulated for 1-30 degrees of freedom (to three decimals, as in any table of
them) and computed above that from the Cornish-Fisher expansion around the normal quantile, which
is within 1e-3 of the exact value there; no scipy needed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

# t_{0.975, df} for df = 1, ..., 30.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
_Z975 = 1.959964  # the standard normal's 0.975 quantile


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z ** 3 + z) / (4 * df)
        + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
        + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3)
    )


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its 95% interval (``low``, ``high`` None for fewer than two values)."""

    mean: Optional[float]
    low: Optional[float]
    high: Optional[float]
    n: int

    def as_dict(self) -> Dict[str, Optional[float]]:
        return asdict(self)


def interval(values: Sequence[float]) -> Interval:
    """Mean and t-based 95% interval of the finite ``values`` (the others are left out)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return Interval(None, None, None, 0)
    mean = sum(finite) / n
    if n == 1:
        return Interval(mean, None, None, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def compare(candidate: Interval, reference: Interval) -> Optional[str]:
    """"better", "worse" (lower is better) or "not significant" when the intervals overlap; None without intervals."""
    if None in (candidate.low, candidate.high, reference.low, reference.high):
        return None
    if candidate.high < reference.low:
        return "better"
    if candidate.low > reference.high:
        return "worse"
    return "not significant"
