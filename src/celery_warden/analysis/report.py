"""Turn a stored session (a :class:`Snapshot`) into the findings every reporter renders.

Pure: records in, findings out. Which memory series a verdict is drawn from, per
process, in order of preference:

1. USS (private memory, what recycling the process would free) when the sampler read it
   often enough (``min_points``): it ignores copy-on-write pages shared with the master;
2. else the RSS the probe read right after each task: one reading per task, always at
   the same point of the task cycle, so transient allocations of the next task do not
   blur it;
3. else the RSS of the 1 Hz samples.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from celery_warden._records import (
    DiagnosisRecord,
    EndReason,
    GrowthFinding,
    Incident,
    MemoryFinding,
    MemoryPoint,
    ProcessHistory,
    Role,
    SessionInfo,
    SignalAudit,
    Snapshot,
    TaskFinished,
    Verdict,
    WorkerInfo,
)
from celery_warden.analysis.attribution import TaskAttribution, attribute_growth
from celery_warden.analysis.growth import assess_count_growth
from celery_warden.analysis.memory import assess_memory
from celery_warden.analysis.tasks import TaskSummary, summarize_tasks
from celery_warden.analysis.thresholds import DEFAULT_THRESHOLDS, AnalysisThresholds

__all__ = [
    "ProcessReport",
    "Report",
    "TaskReport",
    "WorkerReport",
    "build_report",
    "verdict_rank",
]

_VERDICT_ORDER = {
    Verdict.LEAK: 0,
    Verdict.NATIVE_LEAK: 1,
    Verdict.FRAGMENTATION: 2,
    Verdict.WARMING_UP: 3,
    Verdict.STABLE: 4,
    Verdict.INSUFFICIENT_DATA: 5,
}


# The diagnosis verdicts that overrule the trend (stable only means "not in the calls
# that were traced", which the trend, over the whole session, knows better).
_DIAGNOSED = frozenset({Verdict.LEAK, Verdict.NATIVE_LEAK, Verdict.FRAGMENTATION})

_LEAKS = frozenset({Verdict.LEAK, Verdict.NATIVE_LEAK})

_SHUTDOWN_SECONDS = 10.0  # a warm shutdown ends a worker's processes within this


def verdict_rank(verdict: Verdict) -> int:
    """Sort key that puts the verdicts a person must act on first."""
    return _VERDICT_ORDER[verdict]


@dataclass(frozen=True, slots=True)
class ProcessReport:
    """One process: its life, its memory now and at peak, and the verdicts."""

    pid: int
    start_ticks: int
    role: Role
    master_pid: int
    cmdline: str
    started_at: float
    ended_at: float | None
    end_reason: EndReason | None
    exit_code: int | None
    rss_bytes: int | None
    rss_peak_bytes: int | None
    uss_bytes: int | None
    uss_peak_bytes: int | None
    pss_bytes: int | None
    pss_peak_bytes: int | None
    threads: int | None
    open_fds: int | None
    cpu_seconds: float | None
    tasks_run: int
    samples: int
    memory: MemoryFinding
    growth: tuple[GrowthFinding, ...]
    missing: tuple[str, ...]  # figures that could not be read, with why
    diagnosis: DiagnosisRecord | None = None  # the newest `diagnose` of this process

    @property
    def verdict(self) -> Verdict:
        """The trend's verdict, unless a diagnosis found more: a diagnosis is direct
        evidence (what the calls kept, where the memory is), the trend only a slope."""
        if self.diagnosis is not None and self.diagnosis.verdict in _DIAGNOSED:
            return self.diagnosis.verdict
        return self.memory.verdict


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """One worker: its master and what the probe told about it."""

    master_pid: int
    nodename: str | None
    pool: str | None
    concurrency: int | None
    processes: int
    children_alive: int  # now, or when the worker stopped
    tasks_run: int
    verdict: Verdict  # the most pressing verdict among its processes
    rss_bytes: int  # sum over live processes (as `ps` adds up: shared pages counted twice)
    uss_bytes: int | None  # sum of private memory where known: what it really holds


@dataclass(frozen=True, slots=True)
class TaskReport:
    """One task name: how its calls ran (time, CPU, outcomes) and whether it carries
    the memory growth of the processes it ran in.

    ``memory`` is None when no call of the name had a memory reading (no probe)."""

    summary: TaskSummary
    memory: TaskAttribution | None
    confidence: float  # the level of memory's interval
    diagnosis: DiagnosisRecord | None = None  # the newest `diagnose --task` of this name

    @property
    def trace(self) -> dict[str, Any] | None:
        """What the newest diagnosis traced of this name: sites, types, roots."""
        if self.diagnosis is None:
            return None
        trace = self.diagnosis.document.get("trace")
        return trace if isinstance(trace, dict) else None

    @property
    def name(self) -> str:
        return self.summary.name

    @property
    def leaks(self) -> bool:
        if self.diagnosis is not None and self.diagnosis.verdict in _LEAKS:
            return True
        return self.memory is not None and self.memory.verdict is Verdict.LEAK


@dataclass(frozen=True, slots=True)
class Report:
    """Everything a reporter renders for one session."""

    session: SessionInfo
    workers: tuple[WorkerReport, ...]
    processes: tuple[ProcessReport, ...]
    tasks: tuple[TaskReport, ...]  # leaking names first, by bytes per call; then by calls
    tasks_running: int
    diagnoses: tuple[DiagnosisRecord, ...] = ()  # every diagnosis of the session, oldest first
    incidents: tuple[Incident, ...] = ()  # what the guard decided, by decision time
    signals: tuple[SignalAudit, ...] = ()  # every signal sent, refused or dry-run, by time


def build_report(snapshot: Snapshot, thresholds: AnalysisThresholds = DEFAULT_THRESHOLDS) -> Report:
    """Assess every process and task name of a session."""
    newest = {(d.pid, d.start_ticks): d for d in snapshot.diagnoses}  # oldest first: last wins
    processes = [
        dataclasses.replace(p, diagnosis=newest.get((p.pid, p.start_ticks)))
        for p in (_assess_process(history, thresholds) for history in snapshot.processes)
    ]
    processes.sort(
        key=lambda p: (verdict_rank(p.verdict), p.master_pid, p.role != Role.MASTER, p.started_at)
    )
    workers = _workers(snapshot.workers, processes)
    return Report(
        session=snapshot.session,
        workers=tuple(workers),
        processes=tuple(processes),
        tasks=tuple(_tasks(snapshot, thresholds)),
        tasks_running=len(snapshot.running_tasks),
        diagnoses=snapshot.diagnoses,
        incidents=snapshot.incidents,
        signals=snapshot.signals,
    )


def _tasks(snapshot: Snapshot, thresholds: AnalysisThresholds) -> list[TaskReport]:
    """Per task name, its summary and its share of the growth, leaking names first."""
    runs = [history.tasks for history in snapshot.processes if history.tasks]
    summaries = summarize_tasks((task for calls in runs for task in calls), thresholds)
    measured = [calls for calls in runs if any(t.rss_after_bytes is not None for t in calls)]
    memory = {a.name: a for a in attribute_growth(measured, thresholds)} if measured else {}
    traced = {d.task_name: d for d in snapshot.diagnoses if d.task_name}  # newest wins
    reports = [
        TaskReport(
            summary,
            memory.get(summary.name),
            thresholds.attribution_confidence,
            traced.get(summary.name),
        )
        for summary in summaries
    ]
    reports.sort(
        key=lambda t: (
            not t.leaks,
            -(t.memory.retained_bytes_per_call or 0.0) if t.leaks and t.memory else 0.0,
            -t.summary.calls,
            t.name,
        )
    )
    return reports


def _assess_process(history: ProcessHistory, thresholds: AnalysisThresholds) -> ProcessReport:
    samples = [s for s in history.samples if s.state != "zombie"]
    task_ends = [task.t for task in history.tasks]

    def done_by(t: float) -> int:
        return bisect.bisect_right(task_ends, t)

    metric, points = _memory_series(history, done_by, thresholds)
    memory = assess_memory(points, metric, thresholds)
    growth = []
    for kind, field in (("thread-leak", "threads"), ("fd-leak", "open_fds")):
        values = {getattr(s, field) for s in samples} - {None}
        if len(values) < 2:
            continue  # a count that never moved cannot leak: skip the fit
        points = [
            MemoryPoint(s.t, float(v), done_by(s.t))
            for s in samples
            if (v := getattr(s, field)) is not None
        ]
        finding = assess_count_growth(kind, points, thresholds)
        if finding is not None:
            growth.append(finding)
    last = samples[-1] if samples else None
    uss = [s.uss_bytes for s in samples if s.uss_bytes is not None]
    pss = [s.pss_bytes for s in samples if s.pss_bytes is not None]
    peaks = [s.rss_peak_bytes or s.rss_bytes for s in samples]
    peaks += [t.rss_after_bytes for t in history.tasks if t.rss_after_bytes is not None]
    missing = sorted({m for s in history.samples for m in s.missing})
    return ProcessReport(
        pid=history.info.pid,
        start_ticks=history.info.start_ticks,
        role=history.info.role,
        master_pid=history.info.master_pid,
        cmdline=history.info.cmdline,
        started_at=history.info.started_at,
        ended_at=history.ended_at,
        end_reason=history.end_reason,
        exit_code=history.exit_code,
        rss_bytes=last.rss_bytes if last else None,
        rss_peak_bytes=max(peaks) if peaks else None,
        uss_bytes=uss[-1] if uss else None,
        uss_peak_bytes=max(uss) if uss else None,
        pss_bytes=pss[-1] if pss else None,
        pss_peak_bytes=max(pss) if pss else None,
        threads=last.threads if last else None,
        open_fds=last.open_fds if last else None,
        cpu_seconds=(last.cpu_user_seconds + last.cpu_system_seconds) if last else None,
        tasks_run=len(history.tasks),
        samples=len(history.samples),
        memory=memory,
        growth=tuple(growth),
        missing=tuple(missing),
    )


def _memory_series(
    history: ProcessHistory,
    done_by: Callable[[float], int],
    thresholds: AnalysisThresholds,
) -> tuple[str, list[MemoryPoint]]:
    uss = [
        MemoryPoint(s.t, float(s.uss_bytes), done_by(s.t))
        for s in history.samples
        if s.uss_bytes is not None
    ]
    if len(uss) >= thresholds.min_points:
        return "uss", uss
    per_task = _per_task_rss(history.tasks)
    if len(per_task) >= thresholds.min_points:
        return "rss", per_task
    rss = [
        MemoryPoint(s.t, float(s.rss_bytes), done_by(s.t))
        for s in history.samples
        if s.state != "zombie"
    ]
    return "rss", rss


def _per_task_rss(tasks: Sequence[TaskFinished]) -> list[MemoryPoint]:
    return [
        MemoryPoint(task.t, float(task.rss_after_bytes), index)
        for index, task in enumerate(tasks, start=1)
        if task.rss_after_bytes is not None
    ]


def _alive_at_end(members: Sequence[ProcessReport]) -> list[ProcessReport]:
    """The processes alive now, or, for a worker that has stopped, those that were
    alive when it stopped (they end within seconds of each other)."""
    alive = [p for p in members if p.ended_at is None]
    if alive:
        return alive
    last = max(p.ended_at or 0.0 for p in members)
    return [p for p in members if (p.ended_at or 0.0) >= last - _SHUTDOWN_SECONDS]


def _workers(infos: Sequence[WorkerInfo], processes: Sequence[ProcessReport]) -> list[WorkerReport]:
    by_pid = {info.pid: info for info in infos}
    masters = sorted({p.master_pid for p in processes})
    workers = []
    for master_pid in masters:
        members = [p for p in processes if p.master_pid == master_pid]
        alive = _alive_at_end(members)
        info = by_pid.get(master_pid)
        uss_known = [p.uss_bytes for p in alive if p.uss_bytes is not None]
        workers.append(
            WorkerReport(
                master_pid=master_pid,
                nodename=info.nodename if info else None,
                pool=info.pool if info else None,
                concurrency=info.concurrency if info else None,
                processes=len(members),
                children_alive=sum(1 for p in alive if p.role is Role.CHILD),
                tasks_run=sum(p.tasks_run for p in members),
                verdict=min((p.verdict for p in members), key=verdict_rank),
                rss_bytes=sum(p.rss_bytes or 0 for p in alive),
                uss_bytes=sum(uss_known) if uss_known and len(uss_known) == len(alive) else None,
            )
        )
    workers.sort(key=lambda w: (verdict_rank(w.verdict), w.master_pid))
    return workers
