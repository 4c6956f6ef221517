"""The shape of one series after warm-up: the machinery behind every growth verdict.

:func:`assess_trend` fits the window after warm-up and runs the tests that tell a leak
from what merely looks like one; :attr:`Trend.verdict` reads them in order. Memory
(:mod:`.memory`) and counts (:mod:`.growth`) share it and differ only in the least
growth that matters and in how they explain themselves.

The tests, and the real pattern each one rules out:

* material: the slope's interval excludes zero and the fitted growth reaches both an
  absolute floor and a multiple of the residual noise (noisy flat usage, GC sawtooth);
* spread: the medians of consecutive segments each rise by a share of what the slope
  predicts (one big task's high-water plateau, a single jump);
* sustained: the later half grows significantly, at least ``deceleration_ratio`` as
  fast as the earlier half (warm-up approaching its plateau).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from celery_warden._records import MemoryPoint, Verdict
from celery_warden.analysis._format import format_count, format_duration
from celery_warden.analysis._robust import TrendFit, bin_series, fit_trend, mad, median
from celery_warden.analysis.thresholds import AnalysisThresholds

__all__ = [
    "SECONDS_PER_HOUR",
    "TASKS_AXIS",
    "TIME_AXIS",
    "Trend",
    "assess_trend",
    "choose_axis",
    "explain_insufficient",
    "slope_per_hour",
    "window_phrase",
]

TASKS_AXIS = "tasks"
TIME_AXIS = "time"
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class Trend:
    """A window's fit and the outcome of each test on it.

    Attributes:
        axis: ``"tasks"`` or ``"time"`` (seconds): what the slope is per.
        window: The readings after warm-up.
        fit: The fit of the binned window on ``axis``.
        x_span: The window's extent on ``axis``.
        growth: Fitted growth over the window (slope times ``x_span``).
        noise: Robust spread (scaled MAD) of the window's residuals.
        growth_floor: The growth needed to matter: the larger of the absolute floor
            and ``noise_multiple`` times ``noise``.
        series_seconds: How long the whole series covers.
        series_tasks: How many tasks finished across the whole series (0 if unknown).
        young: The series is shorter than the warm-up minimum.
        material: Significant growth of at least ``growth_floor``.
        spread: Every segment's median rose.
        sustained: The later half still grows, not much slower than the earlier.
        still_growing: The last segment alone grows significantly.
    """

    axis: str
    window: Sequence[MemoryPoint]
    fit: TrendFit
    x_span: float
    growth: float
    noise: float
    growth_floor: float
    series_seconds: float
    series_tasks: int
    young: bool
    material: bool
    spread: bool
    sustained: bool
    still_growing: bool

    @property
    def leak_confidence(self) -> float:
        """Return how sure a leak verdict is, 0..1.

        As sure as the trend test, scaled down while the growth barely clears its
        floor: growth at the floor gives half the test's confidence.
        """
        margin = min(1.0, self.growth / (2.0 * self.growth_floor))
        return round((1.0 - self.fit.p_increasing) * margin, 3)

    @property
    def verdict(self) -> Verdict:
        """Return the verdict the tests add up to (never insufficient-data)."""
        if not self.material:
            return Verdict.STABLE
        if self.young:
            return Verdict.WARMING_UP
        if self.spread and self.sustained:
            return Verdict.LEAK
        if self.still_growing:
            return Verdict.WARMING_UP
        return Verdict.STABLE


def choose_axis(points: Sequence[MemoryPoint]) -> str:
    """Return ``"tasks"`` when the probe recorded tasks for these points, else ``"time"``."""
    return TASKS_AXIS if any(p.tasks_done > 0 for p in points) else TIME_AXIS


def explain_insufficient(
    points: Sequence[MemoryPoint], thresholds: AnalysisThresholds
) -> str | None:
    """Return why ``points`` are too few to judge (a phrase), or None if they suffice."""
    if len(points) < thresholds.min_points:
        return f"only {len(points)} readings (need {thresholds.min_points})"
    axis = choose_axis(points)
    span_seconds = points[-1].t - points[0].t
    # On the task axis the number of tasks is the span that matters: a worker can run
    # thousands of tasks in a minute, and its per-task growth is then well measured.
    if axis == TIME_AXIS and span_seconds < thresholds.min_span_seconds:
        return (
            f"readings cover only {format_duration(span_seconds)} "
            f"(need {format_duration(thresholds.min_span_seconds)})"
        )
    tasks = _task_span(points)
    if axis == TASKS_AXIS and tasks < thresholds.min_tasks:
        return f"only {format_count(tasks)} tasks finished (need {thresholds.min_tasks})"
    distinct = len({_x(p, axis) for p in _drop_warmup(points, axis, thresholds)})
    if distinct < thresholds.min_distinct_x:
        return f"after warm-up only {distinct} distinct {_axis_noun(axis)} were read"
    return None


def assess_trend(
    points: Sequence[MemoryPoint], min_growth: float, thresholds: AnalysisThresholds
) -> Trend:
    """Fit the window after warm-up and run every test on it.

    Args:
        points: Time-ordered readings that :func:`explain_insufficient` accepted.
        min_growth: The absolute growth floor, in the readings' unit.
        thresholds: The thresholds to apply.
    """
    axis = choose_axis(points)
    window = _drop_warmup(points, axis, thresholds)
    xs = [_x(p, axis) for p in window]
    ys = [p.value for p in window]
    bx, by = bin_series(xs, ys, thresholds.max_points)
    fit = fit_trend(bx, by, thresholds.confidence_level)
    x_span = max(xs) - min(xs)
    growth = fit.slope * x_span
    # Noise from every raw residual: what a reader sees as the series' jitter.
    noise = mad([y - (fit.intercept + fit.slope * x) for x, y in zip(xs, ys, strict=True)])
    floor = max(min_growth, thresholds.noise_multiple * noise)
    # The shape tests run on the bins: their medians shrug off spikes and mid-task reads.
    return Trend(
        axis=axis,
        window=window,
        fit=fit,
        x_span=x_span,
        growth=growth,
        noise=noise,
        growth_floor=floor,
        series_seconds=points[-1].t - points[0].t,
        series_tasks=_task_span(points),
        young=_is_young(points, axis, thresholds),
        material=fit.slope_low > 0 and growth >= floor,
        spread=_is_spread(bx, by, fit.slope, thresholds),
        sustained=_is_sustained(bx, by, thresholds),
        still_growing=_is_still_growing(bx, by, thresholds),
    )


def slope_per_hour(trend: Trend, thresholds: AnalysisThresholds) -> float:
    """Return the window's growth per hour, fitted on time whatever the trend's axis."""
    if trend.axis == TIME_AXIS:
        return trend.fit.slope * SECONDS_PER_HOUR
    xs = [p.t for p in trend.window]
    bx, by = bin_series(xs, [p.value for p in trend.window], thresholds.max_points)
    by_time = _fit_or_none(bx, by, thresholds)
    if by_time is not None:
        return by_time.slope * SECONDS_PER_HOUR
    # Readings piled on too few instants to fit: fall back to the average rate.
    seconds = max(trend.window[-1].t - trend.window[0].t, 1.0)
    return trend.growth / seconds * SECONDS_PER_HOUR


def window_phrase(trend: Trend) -> str:
    """Return e.g. ``over the last 1,600 tasks (40 min)`` or ``over the last 40 min``."""
    first, last = trend.window[0], trend.window[-1]
    seconds = format_duration(last.t - first.t)
    if trend.axis == TASKS_AXIS:
        return f"over the last {format_count(last.tasks_done - first.tasks_done)} tasks ({seconds})"
    return f"over the last {seconds}"


def _x(point: MemoryPoint, axis: str) -> float:
    """Return where ``point`` lies on ``axis``."""
    return float(point.tasks_done) if axis == TASKS_AXIS else point.t


def _axis_noun(axis: str) -> str:
    """Return what the values of ``axis`` are called."""
    return "task counts" if axis == TASKS_AXIS else "times"


def _task_span(points: Sequence[MemoryPoint]) -> int:
    """Return how many tasks finished between the first and last reading."""
    return max(p.tasks_done for p in points) - min(p.tasks_done for p in points)


def _drop_warmup(
    points: Sequence[MemoryPoint], axis: str, thresholds: AnalysisThresholds
) -> list[MemoryPoint]:
    """Return the points after the warm-up prefix of the axis range."""
    xs = [_x(p, axis) for p in points]
    # A share of the axis, not of the readings: an idle stretch piles readings on one
    # task count and must not push the cut past the tasks that did the warming up.
    cut = min(xs) + thresholds.warmup_fraction * (max(xs) - min(xs))
    return [p for p, x in zip(points, xs, strict=True) if x >= cut]


def _is_young(points: Sequence[MemoryPoint], axis: str, thresholds: AnalysisThresholds) -> bool:
    """Decide whether the series is shorter than the warm-up minimum, on its own axis:
    a worker warms up over its first tasks, however fast they run."""
    if axis == TASKS_AXIS:
        return _task_span(points) < thresholds.warmup_min_tasks
    return points[-1].t - points[0].t < thresholds.warmup_min_seconds


def _is_spread(
    xs: Sequence[float], ys: Sequence[float], slope: float, thresholds: AnalysisThresholds
) -> bool:
    """Decide whether the growth is spread over the window rather than one jump.

    A step lifts the medians on one side of it only; a leak lifts each in turn.
    """
    segments = _split(xs, ys, thresholds.spread_segments)
    if len(segments) < 3:
        return False
    centres = [(median(sx), median(sy)) for sx, sy in segments]
    return all(
        y1 - y0 >= thresholds.spread_min_fraction * slope * (x1 - x0)
        for (x0, y0), (x1, y1) in pairwise(centres)
    )


def _is_sustained(xs: Sequence[float], ys: Sequence[float], thresholds: AnalysisThresholds) -> bool:
    """Decide whether the later half grows significantly and about as fast as the earlier."""
    halves = _split(xs, ys, 2)
    if len(halves) < 2:
        return False
    early = _fit_or_none(*halves[0], thresholds)
    late = _fit_or_none(*halves[1], thresholds)
    # Warm-up approaches its plateau: the later half keeps a little significant
    # growth, so significance alone does not tell; the ratio of slopes does.
    if early is None or late is None or late.slope_low <= 0:
        return False
    return late.slope >= thresholds.deceleration_ratio * early.slope


def _is_still_growing(
    xs: Sequence[float], ys: Sequence[float], thresholds: AnalysisThresholds
) -> bool:
    """Decide whether the window's last segment alone still grows significantly."""
    last = _fit_or_none(*_split(xs, ys, thresholds.spread_segments)[-1], thresholds)
    return last is not None and last.slope_low > 0


def _fit_or_none(
    xs: Sequence[float], ys: Sequence[float], thresholds: AnalysisThresholds
) -> TrendFit | None:
    """Fit ``ys`` on ``xs``, or return None with fewer than three distinct x values."""
    if len(set(xs)) < 3:
        return None
    return fit_trend(xs, ys, thresholds.confidence_level)


def _split(
    xs: Sequence[float], ys: Sequence[float], parts: int
) -> list[tuple[list[float], list[float]]]:
    """Split a series into ``parts`` equal ranges of x; empty ranges are left out."""
    lo, hi = min(xs), max(xs)
    width = (hi - lo) / parts or 1.0
    groups: list[tuple[list[float], list[float]]] = [([], []) for _ in range(parts)]
    for x, y in zip(xs, ys, strict=True):
        gx, gy = groups[min(int((x - lo) / width), parts - 1)]
        gx.append(x)
        gy.append(y)
    return [g for g in groups if g[0]]
