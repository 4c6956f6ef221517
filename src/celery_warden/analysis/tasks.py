"""Per task name: how often it ran, how it ended, how long it took and what it waited on.

A call's CPU time over its wall time says what the call spent its time on: near 1 it
computed, near 0 it waited (network, disk, a lock, the broker). Per call, the ratio is
clamped to [0, 1] (a thread's CPU clock and the wall clock are read a little apart).
The class is drawn from the median ratio and its quartiles; under gevent or eventlet
every greenlet shares one thread, the probe records no CPU time, and no class is given.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from celery_warden._records import TaskFinished, TaskState
from celery_warden.analysis._robust import percentile
from celery_warden.analysis.thresholds import DEFAULT_THRESHOLDS, AnalysisThresholds

__all__ = ["CPU_BOUND", "IO_BOUND", "MIXED", "TaskSummary", "summarize_tasks"]

CPU_BOUND = "cpu-bound"
IO_BOUND = "io-bound"
MIXED = "mixed"
MAX_EXCEPTION_TYPES = 5


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
        cpu_p50_seconds: Median CPU time of a call, over calls with CPU time; None
            when none had it (gevent/eventlet, or an older probe).
        cpu_p95_seconds: 95th percentile of the CPU time, likewise.
        cpu_ratio_p25: First quartile of CPU/wall per call (clamped to [0, 1]), over
            calls with CPU time and a positive wall time; None without such calls.
        cpu_ratio_p50: Median of that ratio.
        cpu_ratio_p75: Third quartile of that ratio.
        cpu_class: ``"cpu-bound"``, ``"io-bound"`` or ``"mixed"``; None with fewer
            than ``cpu_class_min_calls`` calls with a ratio.
        exceptions: ``(type name, calls)`` of failed and retried calls, most frequent
            first (then by name), at most 5.
    """

    name: str
    calls: int
    failures: int
    retries: int
    wall_p50_seconds: float
    wall_p95_seconds: float
    wall_max_seconds: float
    cpu_p50_seconds: float | None = None
    cpu_p95_seconds: float | None = None
    cpu_ratio_p25: float | None = None
    cpu_ratio_p50: float | None = None
    cpu_ratio_p75: float | None = None
    cpu_class: str | None = None
    exceptions: tuple[tuple[str, int], ...] = ()


def summarize_tasks(
    records: Iterable[TaskFinished], thresholds: AnalysisThresholds = DEFAULT_THRESHOLDS
) -> list[TaskSummary]:
    """Summarize finished calls per task name, most called first (then by name).

    Every record counts as a call, whatever its state, and its wall time counts
    towards the percentiles: a failing call costs time too.
    """
    by_name: defaultdict[str, list[TaskFinished]] = defaultdict(list)
    for record in records:
        by_name[record.name].append(record)
    summaries = [_summarize(name, calls, thresholds) for name, calls in by_name.items()]
    summaries.sort(key=lambda s: (-s.calls, s.name))
    return summaries


def _summarize(name: str, calls: list[TaskFinished], thresholds: AnalysisThresholds) -> TaskSummary:
    """Return the summary of one task name's calls (at least one)."""
    walls = [call.wall_seconds for call in calls]
    cpus = [call.cpu_seconds for call in calls if call.cpu_seconds is not None]
    ratios = [
        min(1.0, max(0.0, call.cpu_seconds / call.wall_seconds))
        for call in calls
        if call.cpu_seconds is not None and call.wall_seconds > 0
    ]
    quartiles = [percentile(ratios, q) for q in (25.0, 50.0, 75.0)] if ratios else None
    raised = Counter(call.exception for call in calls if call.exception is not None)
    return TaskSummary(
        name=name,
        calls=len(calls),
        failures=sum(1 for call in calls if call.state is TaskState.FAILURE),
        retries=sum(1 for call in calls if call.state is TaskState.RETRY),
        wall_p50_seconds=percentile(walls, 50.0),
        wall_p95_seconds=percentile(walls, 95.0),
        wall_max_seconds=max(walls),
        cpu_p50_seconds=percentile(cpus, 50.0) if cpus else None,
        cpu_p95_seconds=percentile(cpus, 95.0) if cpus else None,
        cpu_ratio_p25=quartiles[0] if quartiles else None,
        cpu_ratio_p50=quartiles[1] if quartiles else None,
        cpu_ratio_p75=quartiles[2] if quartiles else None,
        cpu_class=_classify(quartiles, len(ratios), thresholds) if quartiles else None,
        exceptions=tuple(
            sorted(raised.items(), key=lambda item: (-item[1], item[0]))[:MAX_EXCEPTION_TYPES]
        ),
    )


def _classify(quartiles: list[float], count: int, thresholds: AnalysisThresholds) -> str | None:
    """Return the class of a name from its ratio quartiles, or None with too few calls.

    The median decides, unless the quartiles reach past both thresholds: then half
    the calls compute and a quarter wait (or the other way round), which is a mix
    whatever the median says (a task that sometimes hits a cache and sometimes not).
    """
    if count < thresholds.cpu_class_min_calls:
        return None
    low, middle, high = quartiles
    if low <= thresholds.io_bound_ratio and high >= thresholds.cpu_bound_ratio:
        return MIXED
    if middle >= thresholds.cpu_bound_ratio:
        return CPU_BOUND
    if middle <= thresholds.io_bound_ratio:
        return IO_BOUND
    return MIXED
