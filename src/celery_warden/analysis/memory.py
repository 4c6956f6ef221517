"""The memory verdict on one process: leak, warming up, stable, or too little data.

The axis is tasks done when the probe recorded tasks (a Celery child leaks per task),
else time. The tests behind the verdict are in :mod:`._trend`; this module turns
them into a :class:`~celery_warden._records.MemoryFinding` with its evidence and a
sentence a person can act on.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery_warden._records import MemoryFinding, MemoryPoint, Verdict
from celery_warden.analysis._format import (
    format_bytes,
    format_count,
    format_duration,
    format_interval,
    format_signed_bytes,
)
from celery_warden.analysis._trend import (
    SECONDS_PER_HOUR,
    TASKS_AXIS,
    Trend,
    assess_trend,
    explain_insufficient,
    slope_per_hour,
    window_phrase,
)
from celery_warden.analysis.thresholds import DEFAULT_THRESHOLDS, AnalysisThresholds

__all__ = ["assess_memory"]


def assess_memory(
    points: Sequence[MemoryPoint],
    metric: str,
    thresholds: AnalysisThresholds = DEFAULT_THRESHOLDS,
) -> MemoryFinding:
    """Judge whether one process's memory leaks, with the evidence.

    Args:
        points: Time-ordered readings of one process: ``value`` in bytes,
            ``tasks_done`` the tasks it had finished by then (all 0 if unknown).
        metric: The series' name (``"uss"`` or ``"rss"``), carried into the finding.
        thresholds: The thresholds to apply.

    Returns:
        The finding: verdict, slopes per task and per hour where computable, fitted
        growth and noise over the window after warm-up, confidence and a reason.
    """
    problem = explain_insufficient(points, thresholds)
    if problem is not None:
        return _insufficient(points, metric, problem)
    trend = assess_trend(points, thresholds.min_growth_bytes, thresholds)
    verdict = trend.verdict
    return MemoryFinding(
        verdict=verdict,
        metric=metric,
        current_bytes=points[-1].value,
        peak_bytes=max(p.value for p in points),
        slope_bytes_per_task=trend.fit.slope if trend.axis == TASKS_AXIS else None,
        slope_bytes_per_hour=slope_per_hour(trend, thresholds),
        growth_bytes=trend.growth,
        noise_bytes=trend.noise,
        confidence=_confidence(trend, verdict),
        window_start=trend.window[0].t,
        window_end=trend.window[-1].t,
        window_tasks=_window_tasks(trend) if trend.axis == TASKS_AXIS else None,
        points=len(points),
        reason=_explain(trend, verdict, thresholds),
    )


def _insufficient(points: Sequence[MemoryPoint], metric: str, problem: str) -> MemoryFinding:
    """Return the insufficient-data finding, saying what is missing."""
    return MemoryFinding(
        verdict=Verdict.INSUFFICIENT_DATA,
        metric=metric,
        current_bytes=points[-1].value if points else None,
        peak_bytes=max(p.value for p in points) if points else None,
        slope_bytes_per_task=None,
        slope_bytes_per_hour=None,
        growth_bytes=None,
        noise_bytes=None,
        confidence=0.0,
        window_start=points[0].t if points else None,
        window_end=points[-1].t if points else None,
        window_tasks=None,
        points=len(points),
        reason=f"not enough data to judge: {problem}",
    )


def _window_tasks(trend: Trend) -> int:
    """Return how many tasks finished within the window."""
    return trend.window[-1].tasks_done - trend.window[0].tasks_done


def _confidence(trend: Trend, verdict: Verdict) -> float:
    """Return how sure ``verdict`` is, 0..1.

    A leak is as sure as :attr:`Trend.leak_confidence`. Stable is surest when even
    the slope's upper bound predicts no material growth. Warming up and a levelled-off
    plateau rest on the curve's shape, which cannot promise the future, so they get
    fixed middling values.
    """
    if verdict is Verdict.LEAK:
        return trend.leak_confidence
    if verdict is Verdict.WARMING_UP:
        return 0.5 if trend.young else 0.7
    if trend.material:
        return 0.7
    upper_growth = trend.fit.slope_high * trend.x_span
    return round(1.0 - 0.5 * min(1.0, max(0.0, upper_growth / trend.growth_floor)), 3)


def _explain(trend: Trend, verdict: Verdict, thresholds: AnalysisThresholds) -> str:
    """Return the one-sentence reason for ``verdict``."""
    growth = format_signed_bytes(trend.growth)
    where = window_phrase(trend)
    if verdict is Verdict.LEAK:
        return f"grows {_slope_phrase(trend, thresholds)} {where}; a real leak"
    if verdict is Verdict.WARMING_UP:
        if trend.young:
            return (
                f"grew {growth} {where}, but the process is young "
                f"({_age_phrase(trend, thresholds)}); likely still warming up, check again later"
            )
        how = "is slowing down" if not trend.sustained else "in jumps rather than steadily"
        return f"grew {growth} {where} but {how}; likely still warming up"
    if trend.material:
        # Grew materially but not spread or sustained, and the tail is flat: a step.
        return (
            f"rose {growth} {where} but then levelled off; "
            "a high-water plateau or finished warm-up, not a leak"
        )
    if trend.growth <= -trend.growth_floor:
        return f"shrinks {growth} {where}; not a leak"
    # Say which floor the growth missed: a person reads "within noise" as "noisy".
    if trend.growth_floor > thresholds.noise_multiple * trend.noise:
        missed = f"under the {format_bytes(trend.growth_floor)} that matters"
    else:
        missed = f"within noise (±{format_bytes(trend.noise)})"
    return f"flat after warm-up: {growth} {where}, {missed}"


def _slope_phrase(trend: Trend, thresholds: AnalysisThresholds) -> str:
    """Return e.g. ``20.1 KiB per task (95% CI 19.2-21.0 KiB)``."""
    scale, per = (1.0, "task") if trend.axis == TASKS_AXIS else (SECONDS_PER_HOUR, "hour")
    fit = trend.fit
    slope, interval = format_interval(
        scale * fit.slope, scale * fit.slope_low, scale * fit.slope_high
    )
    return f"{slope} per {per} ({thresholds.confidence_level * 100:g}% CI {interval})"


def _age_phrase(trend: Trend, thresholds: AnalysisThresholds) -> str:
    """Return what makes the series young, against the warm-up minimum."""
    if trend.axis != TASKS_AXIS:
        need = format_duration(thresholds.warmup_min_seconds)
        return f"watched only {format_duration(trend.series_seconds)}, need {need}"
    need = format_count(thresholds.warmup_min_tasks)
    return f"only {format_count(trend.series_tasks)} tasks watched, need {need}"
