"""Robust statistics for short, noisy series, in pure Python.

Memory readings are skewed (transient allocations only ever add), stepped (pages and
malloc arenas) and autocorrelated (one reading a second), so the analysis uses
rank-based estimators: medians, the MAD, the Theil-Sen slope with Sen's confidence
interval and the Mann-Kendall trend test. Both of the last two rest on Kendall's S
and its variance, so :func:`fit_trend` computes the pairwise slopes once and derives
all of them. Pairwise work is O(n^2): callers reduce a series with :func:`bin_series`
first, and :data:`MAX_PAIRWISE_POINTS` refuses anything that would cost seconds.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAD_SCALE",
    "MAX_PAIRWISE_POINTS",
    "TrendFit",
    "bin_series",
    "fit_trend",
    "kendall_s_variance",
    "mad",
    "mann_kendall",
    "median",
    "percentile",
    "sen_slope_interval",
    "theil_sen",
]

MAD_SCALE = 1.4826  # makes the MAD estimate the standard deviation of normal noise
MAX_PAIRWISE_POINTS = 1000  # about 500k slopes, a fraction of a second

_NORMAL = statistics.NormalDist()


@dataclass(frozen=True, slots=True)
class TrendFit:
    """A Theil-Sen line with Sen's slope interval and a Mann-Kendall test.

    Attributes:
        slope: The median of the pairwise slopes (y units per x unit).
        intercept: The median of ``y - slope * x``.
        slope_low: Lower bound of the slope's two-sided confidence interval.
        slope_high: Upper bound of the slope's two-sided confidence interval.
        z: The Mann-Kendall statistic, positive for an increasing trend.
        p_increasing: One-sided p-value of "no trend" against "increasing".
        points: How many points the fit used.
    """

    slope: float
    intercept: float
    slope_low: float
    slope_high: float
    z: float
    p_increasing: float
    points: int


def median(values: Sequence[float]) -> float:
    """Return the median of ``values`` (the mean of the middle two for an even count).

    Raises:
        ValueError: If ``values`` is empty.
    """
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def mad(values: Sequence[float]) -> float:
    """Return the median absolute deviation, scaled by 1.4826 to estimate a sigma.

    Raises:
        ValueError: If ``values`` is empty.
    """
    centre = median(values)
    return MAD_SCALE * median([abs(v - centre) for v in values])


def percentile(values: Sequence[float], q: float) -> float:
    """Return the ``q``-th percentile (0..100) by linear interpolation between ranks.

    This is the usual "linear" definition (numpy's default): rank ``q/100 * (n-1)``.

    Raises:
        ValueError: If ``values`` is empty or ``q`` is outside 0..100.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    return _at_rank(sorted(values), q / 100.0 * (len(values) - 1))


def theil_sen(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Return the Theil-Sen ``(slope, intercept)`` of ``ys`` against ``xs``.

    Raises:
        ValueError: If the lengths differ, fewer than two distinct x values exist, or
            there are more than :data:`MAX_PAIRWISE_POINTS` points.
    """
    slopes = _pairwise_slopes(xs, ys)
    slope = median(slopes)
    return slope, median([y - slope * x for x, y in zip(xs, ys, strict=True)])


def kendall_s_variance(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Return the variance of Kendall's S under "no trend", corrected for ties.

    Ties in x (readings at the same task count) and in y (quantized memory) both
    shrink the variance; this is the full correction (Kendall 1970, eq. 4.3).
    """
    n = len(xs)
    tx = list(Counter(xs).values())
    ty = list(Counter(ys).values())
    base = n * (n - 1) * (2 * n + 5)
    base -= sum(t * (t - 1) * (2 * t + 5) for t in tx)
    base -= sum(u * (u - 1) * (2 * u + 5) for u in ty)
    variance = base / 18.0
    if n > 2:
        variance += (
            sum(t * (t - 1) * (t - 2) for t in tx)
            * sum(u * (u - 1) * (u - 2) for u in ty)
            / (9.0 * n * (n - 1) * (n - 2))
        )
    if n > 1:
        variance += (
            sum(t * (t - 1) for t in tx) * sum(u * (u - 1) for u in ty) / (2.0 * n * (n - 1))
        )
    return max(variance, 0.0)


def sen_slope_interval(
    xs: Sequence[float], ys: Sequence[float], confidence: float = 0.95
) -> tuple[float, float]:
    """Return Sen's rank-based two-sided confidence interval ``(low, high)`` for the slope.

    Raises:
        ValueError: As :func:`theil_sen`, or if ``confidence`` is not within (0, 1).
    """
    fit = fit_trend(xs, ys, confidence)
    return fit.slope_low, fit.slope_high


def mann_kendall(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Return the Mann-Kendall ``(z, p_increasing)`` of ``ys`` against ``xs``.

    Raises:
        ValueError: As :func:`theil_sen`.
    """
    fit = fit_trend(xs, ys)
    return fit.z, fit.p_increasing


def fit_trend(xs: Sequence[float], ys: Sequence[float], confidence: float = 0.95) -> TrendFit:
    """Fit a Theil-Sen line with Sen's interval and the Mann-Kendall test in one pass.

    Args:
        xs: The axis (tasks done, seconds); need not be sorted, may have ties.
        ys: The readings, one per x.
        confidence: Two-sided confidence level of the slope interval.

    Raises:
        ValueError: If the lengths differ, fewer than two distinct x values exist,
            there are more than :data:`MAX_PAIRWISE_POINTS` points, or ``confidence``
            is not within (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    slopes = sorted(_pairwise_slopes(xs, ys))
    slope = median(slopes)
    intercept = median([y - slope * x for x, y in zip(xs, ys, strict=True)])
    # sign(dx) * sign(dy) is the sign of the slope, so S falls out of the slopes.
    s = sum(1 for v in slopes if v > 0) - sum(1 for v in slopes if v < 0)
    sd = math.sqrt(kendall_s_variance(xs, ys))
    z = (s - math.copysign(1.0, s)) / sd if sd > 0 and s != 0 else 0.0
    c = _NORMAL.inv_cdf(0.5 + confidence / 2.0) * sd
    count = len(slopes)
    # Sen (1968): the bounds are the slopes ranked (N - C)/2 and (N + C)/2 + 1.
    low = _at_rank(slopes, min(max((count - c) / 2.0 - 1.0, 0.0), count - 1.0))
    high = _at_rank(slopes, min(max((count + c) / 2.0, 0.0), count - 1.0))
    return TrendFit(
        slope=slope,
        intercept=intercept,
        slope_low=min(low, slope),
        slope_high=max(high, slope),
        z=z,
        p_increasing=1.0 - _NORMAL.cdf(z),
        points=len(xs),
    )


def bin_series(
    xs: Sequence[float], ys: Sequence[float], max_points: int
) -> tuple[list[float], list[float]]:
    """Reduce a series to at most ``max_points`` by equal-width binning on x.

    Each non-empty bin becomes one point: the median x and the median y of its
    readings. This bounds the pairwise work of a fit and, since neighbouring 1 Hz
    readings are strongly correlated, loses little information. A series already
    short enough is returned unchanged (as lists).

    Raises:
        ValueError: If the lengths differ or ``max_points`` is below 1.
    """
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys differ in length: {len(xs)} != {len(ys)}")
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1, got {max_points}")
    if len(xs) <= max_points:
        return list(xs), list(ys)
    lo, hi = min(xs), max(xs)
    if hi == lo:
        return [lo], [median(ys)]
    width = (hi - lo) / max_points
    bins: dict[int, tuple[list[float], list[float]]] = {}
    for x, y in zip(xs, ys, strict=True):
        bx, by = bins.setdefault(min(int((x - lo) / width), max_points - 1), ([], []))
        bx.append(x)
        by.append(y)
    keys = sorted(bins)
    return [median(bins[k][0]) for k in keys], [median(bins[k][1]) for k in keys]


def _pairwise_slopes(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """Return the slopes of every pair of points with distinct x."""
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys differ in length: {len(xs)} != {len(ys)}")
    if len(xs) > MAX_PAIRWISE_POINTS:
        raise ValueError(
            f"{len(xs)} points is too many for pairwise slopes "
            f"(at most {MAX_PAIRWISE_POINTS}); bin the series first"
        )
    slopes = [
        (ys[j] - ys[i]) / (xs[j] - xs[i])
        for i in range(len(xs))
        for j in range(i + 1, len(xs))
        if xs[j] != xs[i]
    ]
    if not slopes:
        raise ValueError("a slope needs at least two distinct x values")
    return slopes


def _at_rank(ordered: Sequence[float], rank: float) -> float:
    """Return the value at a fractional 0-based ``rank`` of sorted values, interpolating."""
    lower = math.floor(rank)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (rank - lower)
