"""Sustained growth of a count in one process: threads or open file descriptors.

Counts use the same machinery as memory (:mod:`._trend`): warm-up is dropped, and
the growth must be significant, spread over the window and not slowing to a stop. A
pool that opens its connections at start and then holds them is not a leak; a
thread or a descriptor left behind every few tasks is.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery_warden._records import GrowthFinding, MemoryPoint, Verdict
from celery_warden.analysis._format import format_count
from celery_warden.analysis._trend import (
    TASKS_AXIS,
    assess_trend,
    explain_insufficient,
    slope_per_hour,
    window_phrase,
)
from celery_warden.analysis.thresholds import DEFAULT_THRESHOLDS, AnalysisThresholds

__all__ = ["COUNT_KINDS", "assess_count_growth"]

COUNT_KINDS = ("fd-leak", "thread-leak")

_NOUNS = {"thread-leak": ("threads", "a thread leak"), "fd-leak": ("open files", "an fd leak")}


def assess_count_growth(
    kind: str,
    points: Sequence[MemoryPoint],
    thresholds: AnalysisThresholds = DEFAULT_THRESHOLDS,
) -> GrowthFinding | None:
    """Return a finding if a count grows steadily after warm-up, else None.

    Args:
        kind: ``"thread-leak"`` (``value`` is the thread count) or ``"fd-leak"``
            (``value`` is the open descriptor count).
        points: Time-ordered readings of one process; ``tasks_done`` as for memory.
        thresholds: The thresholds to apply; ``min_thread_growth`` or
            ``min_fd_growth`` is the least fitted growth over the window that counts.

    Returns:
        The finding, or None when there is too little data, the process is young,
        or the count is flat, shrinking, stepped once or levelling off.

    Raises:
        ValueError: If ``kind`` is not one of :data:`COUNT_KINDS`.
    """
    if kind not in _NOUNS:
        raise ValueError(f"kind must be one of {', '.join(COUNT_KINDS)}, got {kind!r}")
    if explain_insufficient(points, thresholds) is not None:
        return None
    trend = assess_trend(points, _min_growth(kind, thresholds), thresholds)
    if trend.verdict is not Verdict.LEAK:
        return None
    per_hour = slope_per_hour(trend, thresholds)
    per_task = trend.fit.slope if trend.axis == TASKS_AXIS else None
    noun, name = _NOUNS[kind]
    # Start and end are the readings a person can check with ps, not fitted values.
    return GrowthFinding(
        kind=kind,
        start_value=points[0].value,
        end_value=points[-1].value,
        slope_per_hour=per_hour,
        slope_per_task=per_task,
        confidence=trend.leak_confidence,
        points=len(points),
        reason=(
            f"{noun} rose from {format_count(points[0].value)} to "
            f"{format_count(points[-1].value)}, {_rate_phrase(per_task, per_hour)} "
            f"{window_phrase(trend)}; {name}"
        ),
    )


def _min_growth(kind: str, thresholds: AnalysisThresholds) -> float:
    """Return the least growth over the window that counts for ``kind``."""
    return thresholds.min_thread_growth if kind == "thread-leak" else thresholds.min_fd_growth


def _rate_phrase(per_task: float | None, per_hour: float) -> str:
    """Return e.g. ``one more every 50 tasks`` or ``72.0 more per hour``."""
    if per_task is None:
        return f"{per_hour:.1f} more per hour"
    if per_task < 1.0:
        return f"one more every {format_count(1.0 / per_task)} tasks"
    return f"{per_task:.1f} more per task"
