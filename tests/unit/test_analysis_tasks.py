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


def timed(name: str, wall: float, cpu: float | None, exception: str | None = None) -> TaskFinished:
    """Return a call of ``name`` with its wall and CPU time."""
    return TaskFinished(
        pid=100,
        start_ticks=5,
        task_id=f"{name}-{wall}-{cpu}-{exception}",
        name=name,
        t=1_700_000_000.0,
        wall_seconds=wall,
        state=TaskState.FAILURE if exception else TaskState.SUCCESS,
        rss_after_bytes=None,
        cpu_seconds=cpu,
        exception=exception,
    )


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [
        ([0.9, 0.95, 1.0, 0.85, 0.8], "cpu-bound"),
        ([0.01, 0.05, 0.1, 0.02, 0.2], "io-bound"),
        ([0.4, 0.5, 0.6, 0.45, 0.55], "mixed"),
        ([0.05, 0.1, 0.9, 0.95, 0.9, 0.1], "mixed"),
        ([0.9, 0.9, 0.9, 0.9], None),
    ],
    ids=["cpu", "io", "middle", "straddles", "too-few"],
)
def test_cpu_class_follows_the_ratio_quartiles(ratios: list[float], expected: str | None) -> None:
    """The class is cpu-bound, io-bound or mixed by the median ratio and its quartiles."""
    # GIVEN calls of one wall second with the given CPU shares
    records = [timed("app.t", 1.0, r) for r in ratios]
    # WHEN they are summarized
    (summary,) = summarize_tasks(records)
    # THEN the class follows the thresholds (0.7, 0.3), and the quartiles straddling both is mixed
    assert summary.cpu_class == expected


def test_cpu_figures_and_clamped_ratios() -> None:
    """CPU percentiles come from calls with CPU time; ratios are clamped to [0, 1]."""
    # GIVEN a call whose CPU reads above its wall time, one without CPU and a zero-wall one
    records = [
        timed("a", 1.0, 1.2),
        timed("a", 2.0, 1.0),
        timed("a", 1.0, None),
        timed("a", 0.0, 0.0),
    ]
    # WHEN they are summarized
    (summary,) = summarize_tasks(records)
    # THEN the CPU percentiles use the three calls with CPU, the ratios the two with wall time
    assert summary.cpu_p50_seconds == 1.0
    assert summary.cpu_p95_seconds == pytest.approx(1.18)
    assert (summary.cpu_ratio_p25, summary.cpu_ratio_p75) == (
        pytest.approx(0.625),
        pytest.approx(0.875),
    )
    assert summary.cpu_ratio_p50 == pytest.approx(0.75)
    assert summary.cpu_class is None  # fewer than 5 calls with a ratio


def test_no_cpu_time_under_gevent_gives_no_class() -> None:
    """Without cpu_seconds (gevent, eventlet) every CPU figure is None."""
    # GIVEN calls without CPU time
    (summary,) = summarize_tasks([timed("g", 1.0, None) for _ in range(10)])
    # WHEN / THEN
    assert (summary.cpu_p50_seconds, summary.cpu_ratio_p50, summary.cpu_class) == (None, None, None)


def test_exceptions_are_counted_most_frequent_first_at_most_five() -> None:
    """Exception types are counted per name, most frequent first, then by name, capped at 5."""
    # GIVEN seven exception types with different counts
    kinds = {"E1": 1, "E2": 3, "E3": 2, "E4": 2, "E5": 1, "E6": 1, "E7": 5}
    records = [timed("x", 1.0, None, kind) for kind, n in kinds.items() for _ in range(n)]
    # WHEN they are summarized
    (summary,) = summarize_tasks(records)
    # THEN the top five are kept in order
    assert summary.exceptions == (("E7", 5), ("E2", 3), ("E3", 2), ("E4", 2), ("E1", 1))
