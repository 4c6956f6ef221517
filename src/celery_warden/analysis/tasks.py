"""Per task name: how often it ran, how it ended and how long it took."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from celery_warden._records import TaskFinished, TaskState
from celery_warden.analysis._robust import percentile

__all__ = ["TaskSummary", "summarize_tasks"]


@dataclass(frozen=True, slots=True)
class TaskSummary:
    """What the probe saw of one task name.

    Attributes:
        name: The task's registered name.
        calls: How many calls ended, whatever the outcome.
        failures: Calls that ended in FAILURE.
        retries: Calls that ended asking for a RETRY.
        wall_p50_seconds: Median wall time of a call.
        wall_p95_seconds: 95th percentile of the wall time (linear interpolation).
        wall_max_seconds: Longest call.
    """

    name: str
    calls: int
    failures: int
    retries: int
    wall_p50_seconds: float
    wall_p95_seconds: float
    wall_max_seconds: float


def summarize_tasks(records: Iterable[TaskFinished]) -> list[TaskSummary]:
    """Summarize finished calls per task name, most called first (then by name).

    Every record counts as a call, whatever its state, and its wall time counts
    towards the percentiles: a failing call costs time too.
    """
    by_name: defaultdict[str, list[TaskFinished]] = defaultdict(list)
    for record in records:
        by_name[record.name].append(record)
    summaries = [_summarize(name, calls) for name, calls in by_name.items()]
    summaries.sort(key=lambda s: (-s.calls, s.name))
    return summaries


def _summarize(name: str, calls: list[TaskFinished]) -> TaskSummary:
    """Return the summary of one task name's calls (at least one)."""
    walls = [call.wall_seconds for call in calls]
    return TaskSummary(
        name=name,
        calls=len(calls),
        failures=sum(1 for call in calls if call.state is TaskState.FAILURE),
        retries=sum(1 for call in calls if call.state is TaskState.RETRY),
        wall_p50_seconds=percentile(walls, 50.0),
        wall_p95_seconds=percentile(walls, 95.0),
        wall_max_seconds=max(walls),
    )
