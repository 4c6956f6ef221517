"""Robust statistics: median, MAD, percentiles, Theil-Sen, Sen's interval, Mann-Kendall, bins."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from celery_warden.analysis._robust import (
    MAX_PAIRWISE_POINTS,
    bin_series,
    fit_trend,
    kendall_s_variance,
    mad,
    mann_kendall,
    median,
    percentile,
    sen_slope_interval,
    theil_sen,
)


def noisy_line(
    seed: int, n: int, slope: float, noise: float = 1.0
) -> tuple[list[float], list[float]]:
    """Return ``n`` points of ``y = 5 + slope * x`` with Gaussian noise."""
    rng = random.Random(seed)
    xs = [float(i) for i in range(n)]
    return xs, [5.0 + slope * x + rng.gauss(0, noise) for x in xs]


@pytest.mark.parametrize(
    ("values", "expected"),
    [([3.0, 1.0, 2.0], 2.0), ([4.0, 1.0, 3.0, 2.0], 2.5), ([7.0], 7.0)],
)
def test_median_of_odd_and_even_counts(values: list[float], expected: float) -> None:
    """The median is the middle value, or the mean of the middle two."""
    # GIVEN values in any order
    # WHEN their median is taken / THEN it is the middle
    assert median(values) == expected


@pytest.mark.parametrize("function", [median, mad])
def test_centre_and_spread_of_nothing_are_refused(
    function: Callable[[list[float]], float],
) -> None:
    """Median and MAD of no values raise ValueError rather than invent a number."""
    # GIVEN no values
    # WHEN / THEN
    with pytest.raises(ValueError, match="no values"):
        function([])


def test_mad_is_scaled_to_a_standard_deviation() -> None:
    """The MAD of normal noise estimates its standard deviation, and ignores outliers."""
    # GIVEN 5,000 normal draws with sigma 3 and 2% huge outliers
    rng = random.Random(1)
    values = [rng.gauss(0, 3.0) for _ in range(5000)] + [1e9] * 100
    # WHEN the MAD is taken
    spread = mad(values)
    # THEN it is close to 3
    assert spread == pytest.approx(3.0, rel=0.1)
    assert mad([1.0, 2.0, 3.0, 4.0, 100.0]) == pytest.approx(1.4826)


@pytest.mark.parametrize(
    ("q", "expected"), [(0, 1.0), (25, 1.75), (50, 2.5), (95, 3.85), (100, 4.0)]
)
def test_percentile_interpolates_linearly(q: float, expected: float) -> None:
    """Percentiles interpolate between ranks as numpy's default does."""
    # GIVEN four values
    # WHEN a percentile is taken / THEN it interpolates between neighbours
    assert percentile([4.0, 1.0, 3.0, 2.0], q) == pytest.approx(expected)


@pytest.mark.parametrize(("values", "q"), [([], 50.0), ([1.0], -1.0), ([1.0], 100.5)])
def test_percentile_refuses_nothing_or_q_out_of_range(values: list[float], q: float) -> None:
    """A percentile of no values, or outside 0..100, raises ValueError."""
    # GIVEN bad input
    # WHEN / THEN
    with pytest.raises(ValueError, match="percentile"):
        percentile(values, q)


def test_theil_sen_recovers_an_exact_line() -> None:
    """On points of an exact line the fit is that line."""
    # GIVEN y = 3 + 2x
    xs = [float(i) for i in range(20)]
    ys = [3.0 + 2.0 * x for x in xs]
    # WHEN it is fitted
    slope, intercept = theil_sen(xs, ys)
    # THEN slope and intercept are exact
    assert slope == pytest.approx(2.0)
    assert intercept == pytest.approx(3.0)


def test_theil_sen_ignores_a_fifth_of_wild_outliers() -> None:
    """A fifth of the readings thrown far off does not move the slope much."""
    # GIVEN a line of slope 2 with every fifth reading 1,000 higher
    xs, ys = noisy_line(2, 100, 2.0, noise=0.5)
    ys = [y + (1000.0 if i % 5 == 0 else 0.0) for i, y in enumerate(ys)]
    # WHEN it is fitted
    slope, _ = theil_sen(xs, ys)
    # THEN the slope is close to 2
    assert slope == pytest.approx(2.0, rel=0.05)


def test_sen_interval_covers_the_true_slope_about_95_percent_of_the_time() -> None:
    """Over 200 noisy lines the 95% interval holds the true slope 90% to 99% of the time."""
    # GIVEN 200 seeds of 40 noisy points with slope 0.1
    covered = 0
    for seed in range(200):
        xs, ys = noisy_line(seed, 40, 0.1)
        # WHEN the interval is computed
        low, high = sen_slope_interval(xs, ys, 0.95)
        covered += low <= 0.1 <= high
    # THEN its coverage is near the nominal level
    assert 180 <= covered <= 198


def test_sen_interval_narrows_with_more_points() -> None:
    """More readings give a narrower interval around the slope."""
    # GIVEN 30 and 300 noisy points of the same line
    short = fit_trend(*noisy_line(3, 30, 0.5))
    long = fit_trend(*noisy_line(3, 300, 0.5))
    # WHEN / THEN the longer series' interval is narrower and both contain their slope
    assert long.slope_high - long.slope_low < (short.slope_high - short.slope_low) / 5
    for fit in (short, long):
        assert fit.slope_low <= fit.slope <= fit.slope_high


def test_ties_in_x_are_handled() -> None:
    """Readings at the same x (same task count) are skipped as pairs and shrink the variance."""
    # GIVEN three readings at each of 20 task counts, growing 1 per task
    rng = random.Random(4)
    xs = [float(i // 3) for i in range(60)]
    ys = [x + rng.gauss(0, 0.2) for x in xs]
    # WHEN it is fitted
    fit = fit_trend(xs, ys)
    # THEN the slope is right and the tie correction lowered the variance
    assert fit.slope == pytest.approx(1.0, rel=0.05)
    assert fit.slope_low < 1.0 < fit.slope_high
    assert kendall_s_variance(xs, ys) < 60 * 59 * 125 / 18


def test_kendall_variance_without_ties_is_the_textbook_value() -> None:
    """Without ties Var(S) is n(n-1)(2n+5)/18."""
    # GIVEN 10 distinct x and y
    xs = [float(i) for i in range(10)]
    # WHEN / THEN
    assert kendall_s_variance(xs, xs[::-1]) == pytest.approx(10 * 9 * 25 / 18)


@pytest.mark.parametrize(
    ("slope", "check"),
    [
        (0.5, lambda z, p: z > 3 and p < 0.001),
        (0.0, lambda z, p: abs(z) < 2.5 and 0.005 < p < 0.995),
        (-0.5, lambda z, p: z < -3 and p > 0.999),
    ],
    ids=["increasing", "flat", "decreasing"],
)
def test_mann_kendall_tells_the_direction(
    slope: float, check: Callable[[float, float], bool]
) -> None:
    """Mann-Kendall's z is clearly positive for growth, near 0 for noise, negative for decline."""
    # GIVEN 100 noisy points with the given slope
    xs, ys = noisy_line(5, 100, slope, noise=2.0)
    # WHEN the trend is tested
    z, p_increasing = mann_kendall(xs, ys)
    # THEN z and the one-sided p-value point the right way
    assert check(z, p_increasing)


def test_constant_series_has_no_trend() -> None:
    """A constant series has slope 0, z 0 and p 0.5."""
    # GIVEN a constant series
    fit = fit_trend([float(i) for i in range(10)], [7.0] * 10)
    # WHEN / THEN
    assert (fit.slope, fit.slope_low, fit.slope_high, fit.z, fit.p_increasing) == (
        0.0,
        0.0,
        0.0,
        0.0,
        0.5,
    )


@pytest.mark.parametrize(
    ("xs", "ys", "kwargs", "message"),
    [
        ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], {}, "two distinct x"),
        ([1.0, 2.0], [1.0], {}, "differ in length"),
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], {"confidence": 1.0}, "confidence"),
        (
            [float(i) for i in range(MAX_PAIRWISE_POINTS + 1)],
            [0.0] * (MAX_PAIRWISE_POINTS + 1),
            {},
            "bin the series first",
        ),
    ],
    ids=["one-x", "lengths", "confidence", "too-many"],
)
def test_fit_refuses_what_it_cannot_fit(
    xs: list[float], ys: list[float], kwargs: dict[str, float], message: str
) -> None:
    """A fit raises ValueError on one x value, unequal lengths, a bad level or unbounded work."""
    # GIVEN input that cannot be fitted
    # WHEN / THEN
    with pytest.raises(ValueError, match=message):
        fit_trend(xs, ys, **kwargs)


def test_bin_series_keeps_a_short_series() -> None:
    """A series no longer than max_points comes back unchanged."""
    # GIVEN five points
    xs, ys = [1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 4.0, 3.0, 2.0, 1.0]
    # WHEN binned to 10 / THEN unchanged
    assert bin_series(xs, ys, 10) == (xs, ys)


def test_bin_series_reduces_to_medians_per_bin() -> None:
    """A long series becomes at most max_points bins, each the median x and median y."""
    # GIVEN 1,000 points of y = x with one huge outlier
    xs = [float(i) for i in range(1000)]
    ys = [*xs[:500], 1e12, *xs[501:]]
    # WHEN binned to 100 points
    bx, by = bin_series(xs, ys, 100)
    # THEN there are 100 bins of 10 at their medians, and the outlier is gone
    assert len(bx) == len(by) == 100
    assert (bx[0], by[0]) == (4.5, 4.5)
    assert by[50] == 505.5  # median of 501..509 and the outlier
    assert max(by) < 1000


def test_bin_series_of_one_x_value_is_one_point() -> None:
    """Readings that all share one x become a single median point."""
    # GIVEN 50 readings at the same task count
    # WHEN / THEN
    assert bin_series([3.0] * 50, [float(i) for i in range(50)], 10) == ([3.0], [24.5])


def test_bin_series_skips_empty_bins() -> None:
    """A gap on x leaves no empty bins behind."""
    # GIVEN two clusters of points far apart
    xs = [float(i) for i in range(30)] + [float(1000 + i) for i in range(30)]
    # WHEN binned to 50
    bx, _ = bin_series(xs, xs, 50)
    # THEN only the two bins each cluster spans remain
    assert len(bx) == 4


@pytest.mark.parametrize(("xs", "ys", "max_points"), [([1.0], [1.0, 2.0], 5), ([1.0], [1.0], 0)])
def test_bin_series_refuses_bad_input(xs: list[float], ys: list[float], max_points: int) -> None:
    """Unequal lengths or a max_points below 1 raise ValueError."""
    # GIVEN bad input
    # WHEN / THEN
    with pytest.raises(ValueError, match=r"length|max_points"):
        bin_series(xs, ys, max_points)
