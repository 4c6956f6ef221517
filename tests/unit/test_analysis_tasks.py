"""Per task name summaries: calls, failures, retries, wall-time percentiles, order."""

from __future__ import annotations

import pytest

from celery_warden._records import TaskFinished, TaskState
from celery_warden.analysis import TaskSummary, summarize_tasks


def finished(name: str, wall_seconds: float, state: TaskState = TaskState.SUCCESS) -> TaskFinished:
    """Return a finished call of ``name``."""
    return TaskFinished(
        pid=100,
        start_ticks=5,
        task_id=f"{name}-{wall_seconds}-{state}",
        name=name,
        t=1_700_000_000.0,
        wall_seconds=wall_seconds,
        state=state,
        rss_after_bytes=None,
    )


def test_calls_failures_retries_and_wall_times_per_name() -> None:
    """Each name gets its call count, FAILURE and RETRY counts and wall-time p50, p95 and max."""
    # GIVEN five calls of one task (one failed, one retried) and one of another
    records = [
        finished("app.resize", 1.0),
        finished("app.resize", 2.0, TaskState.FAILURE),
        finished("app.resize", 3.0, TaskState.RETRY),
        finished("app.resize", 4.0),
        finished("app.resize", 10.0),
        finished("app.mail", 0.5, TaskState.REVOKED),
    ]
    # WHEN they are summarized
    summaries = summarize_tasks(records)
    # THEN every figure is per name, and failed calls count towards time too
    resize, mail = summaries
    assert (resize.name, resize.calls, resize.failures, resize.retries) == ("app.resize", 5, 1, 1)
    assert (resize.wall_p50_seconds, resize.wall_max_seconds) == (3.0, 10.0)
    assert resize.wall_p95_seconds == pytest.approx(8.8)
    assert mail == TaskSummary("app.mail", 1, 0, 0, 0.5, 0.5, 0.5)


def test_order_is_calls_descending_then_name() -> None:
    """The most called name comes first; equal counts are in name order."""
    # GIVEN two names with two calls each and one with three
    records = [finished(name, 1.0) for name in ["b", "a", "c", "b", "a", "c", "c"]]
    # WHEN they are summarized
    names = [s.name for s in summarize_tasks(iter(records))]
    # THEN c (3 calls) leads, then a and b by name
    assert names == ["c", "a", "b"]


def test_no_records_give_no_summaries() -> None:
    """Summarizing nothing gives an empty list."""
    # GIVEN no records
    # WHEN / THEN
    assert summarize_tasks([]) == []
