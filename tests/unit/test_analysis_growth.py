"""Thread and file-descriptor counts: steady growth is a finding, a pool opened at start is not."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from celery_warden._records import MemoryPoint
from celery_warden.analysis import COUNT_KINDS, AnalysisThresholds, assess_count_growth

T0 = 1_700_000_000.0
TASKS_PER_POINT = 2
N_POINTS = 2000


def make_points(
    counts: Sequence[float], tasks_per_point: int = TASKS_PER_POINT
) -> list[MemoryPoint]:
    """Return one count a second, ``tasks_per_point`` more tasks done at each."""
    return [
        MemoryPoint(t=T0 + i, value=float(c), tasks_done=i * tasks_per_point)
        for i, c in enumerate(counts)
    ]


def test_thread_left_behind_every_50_tasks_is_a_thread_leak() -> None:
    """One new thread every 50 tasks gives a thread-leak finding with its rate."""
    # GIVEN 4 threads plus one more every 50 tasks, over 4,000 tasks
    counts = [4 + (i * TASKS_PER_POINT) // 50 for i in range(N_POINTS)]
    # WHEN the thread count is assessed
    finding = assess_count_growth("thread-leak", make_points(counts))
    # THEN it is a thread leak at one per 50 tasks
    assert finding is not None
    assert finding.kind == "thread-leak"
    assert finding.slope_per_task == pytest.approx(1 / 50, rel=0.2)
    assert finding.slope_per_hour == pytest.approx(3600 * TASKS_PER_POINT / 50, rel=0.2)
    assert (finding.start_value, finding.end_value) == (4.0, counts[-1])
    assert finding.points == N_POINTS
    assert finding.confidence > 0.9
    assert finding.reason.startswith("threads rose from 4 to 83, one more every 50 tasks")
    assert finding.reason.endswith("a thread leak")


def test_pool_opening_8_fds_at_start_is_not_a_leak() -> None:
    """A connection pool that opens 8 descriptors at start and then holds them is not a leak."""
    # GIVEN 10 fds, 8 more opened over the first 40 s, then flat with a brief extra one now and then
    rng = random.Random(1)
    counts = [10 + min(8, i // 5) + (1 if rng.random() < 0.05 else 0) for i in range(N_POINTS)]
    # WHEN the fd count is assessed
    finding = assess_count_growth("fd-leak", make_points(counts))
    # THEN there is no finding
    assert finding is None


def test_fd_leak_measured_against_time_only_is_found() -> None:
    """Without task counts an fd leak is measured per hour and has no per-task rate."""
    # GIVEN one more fd every 30 s and no task count
    counts = [10 + i // 30 for i in range(N_POINTS)]
    # WHEN the fd count is assessed
    finding = assess_count_growth("fd-leak", make_points(counts, tasks_per_point=0))
    # THEN it is an fd leak of 120 an hour
    assert finding is not None
    assert finding.kind == "fd-leak"
    assert finding.slope_per_task is None
    assert finding.slope_per_hour == pytest.approx(120, rel=0.2)
    assert "120.0 more per hour" in finding.reason


def test_growth_below_the_minimum_from_the_thresholds_is_not_a_leak() -> None:
    """Steady growth of fewer threads than ``min_thread_growth`` over the window is no finding."""
    # GIVEN one more thread every 200 tasks (about 15 over the window), and minimums of 5 and 30
    points = make_points([4 + (i * TASKS_PER_POINT) // 200 for i in range(N_POINTS)])
    strict = AnalysisThresholds(min_thread_growth=30)
    # WHEN the thread count is assessed under each
    default, strict_finding = (
        assess_count_growth("thread-leak", points),
        assess_count_growth("thread-leak", points, strict),
    )
    # THEN only the default minimum lets it through
    assert default is not None
    assert strict_finding is None


def test_flat_count_with_transient_threads_is_not_a_leak() -> None:
    """Short-lived worker threads that come and go are not a leak."""
    # GIVEN 6 threads with up to 4 transient ones at random moments
    rng = random.Random(2)
    counts = [6 + (rng.randint(0, 4) if rng.random() < 0.2 else 0) for _ in range(N_POINTS)]
    # WHEN the thread count is assessed
    finding = assess_count_growth("thread-leak", make_points(counts))
    # THEN there is no finding
    assert finding is None


@pytest.mark.parametrize(
    "points",
    [
        pytest.param(make_points([4.0 + i for i in range(10)]), id="few-points"),
        pytest.param(make_points([4.0 + i // 5 for i in range(90)]), id="young"),
        pytest.param([], id="empty"),
    ],
)
def test_too_little_or_too_young_data_gives_no_finding(points: list[MemoryPoint]) -> None:
    """Growth cannot be called a leak on too few readings or in a young process."""
    # GIVEN a series too short to judge
    # WHEN it is assessed
    finding = assess_count_growth("thread-leak", points)
    # THEN there is no finding
    assert finding is None


def test_unknown_kind_is_refused() -> None:
    """A kind other than thread-leak or fd-leak raises ValueError naming the valid ones."""
    # GIVEN a made-up kind
    # WHEN it is assessed / THEN it is refused
    with pytest.raises(ValueError, match="fd-leak, thread-leak"):
        assess_count_growth("socket-leak", make_points([1.0] * 100))
    assert COUNT_KINDS == ("fd-leak", "thread-leak")
