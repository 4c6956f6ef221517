"""Frozen records every layer shares: the sampler and probe produce them, the store keeps
them, analysis reads them and returns findings.

A process is identified by ``(pid, start_ticks)``: ``start_ticks`` is field 22 of
``/proc/PID/stat`` (clock ticks since boot), exact and cheap to read both from outside
(the sampler) and from inside (the probe), so both sides name a process the same way
even after its PID is reused.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, enum.Enum):
        """The 3.11 ``StrEnum``: members are their own text value."""

        def __str__(self) -> str:
            return str(self.value)


__all__ = [
    "EndReason",
    "GrowthFinding",
    "Heartbeat",
    "Incident",
    "IncidentKind",
    "MemoryFinding",
    "MemoryPoint",
    "Outcome",
    "ProcessEnd",
    "ProcessHistory",
    "ProcessInfo",
    "Role",
    "RunningTask",
    "Sample",
    "SessionInfo",
    "SignalAudit",
    "Snapshot",
    "StrEnum",
    "TaskFinished",
    "TaskStarted",
    "TaskState",
    "Verdict",
    "WorkerInfo",
]


class Role(StrEnum):
    """Where a process stands in a worker tree."""

    MASTER = "master"
    CHILD = "child"  # a pool process forked by the master
    DESCENDANT = "descendant"  # anything else below the master (what tasks spawn)


class EndReason(StrEnum):
    """Why a process ended, as far as the warden knows."""

    EXITED = "exited"  # it exited on its own with the recorded code
    MAX_TASKS = "max-tasks"  # Celery recycled it after worker_max_tasks_per_child
    MAX_MEMORY = "max-memory"  # Celery recycled it after worker_max_memory_per_child
    RECYCLED = "recycled"  # billiard's recycle exit code, cause not known
    KILLED = "killed"  # ended by a signal (the code is -signum)
    GONE = "gone"  # vanished; nobody told us how
    UNKNOWN = "unknown"  # still alive when the warden stopped watching


class TaskState(StrEnum):
    """The outcome of one task call, as the probe saw it."""

    STARTED = "started"
    SUCCESS = "success"
    FAILURE = "failure"
    RETRY = "retry"
    REVOKED = "revoked"
    IGNORED = "ignored"
    REJECTED = "rejected"
    LOST = "lost"  # started but its process ended before it finished


class Verdict(StrEnum):
    """The memory verdict on one process."""

    LEAK = "leak"  # Python objects kept
    NATIVE_LEAK = "native-leak"  # growth outside the Python heap (a C extension, ctypes)
    FRAGMENTATION = "fragmentation"  # a high-water plateau: freed memory the allocator keeps
    WARMING_UP = "warming-up"
    STABLE = "stable"
    INSUFFICIENT_DATA = "insufficient-data"


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """A process of a worker tree, as first seen."""

    pid: int
    start_ticks: int
    ppid: int
    role: Role
    started_at: float  # epoch seconds
    cmdline: str
    master_pid: int  # the worker this process belongs to (itself for a master)


class Sample(NamedTuple):
    """One reading of one process.

    Figures that could not be read are ``None`` and named in ``missing`` as
    ``"field:reason"`` (reason ``permission`` or ``gone``); the smaps figures
    (uss, pss, swap, shared) are read at a lower rate and are ``None`` between reads
    without being missing.

    A named tuple rather than a frozen dataclass, unlike the other records: a report
    over a day builds hundreds of thousands of them, and a tuple is built about ten
    times faster (docs/benchmarks.md).
    """

    pid: int
    start_ticks: int
    t: float
    state: str
    rss_bytes: int
    cpu_user_seconds: float
    cpu_system_seconds: float
    threads: int
    open_fds: int | None = None
    uss_bytes: int | None = None
    pss_bytes: int | None = None
    swap_bytes: int | None = None
    shared_bytes: int | None = None
    rss_peak_bytes: int | None = None  # VmHWM: the peak RSS, what Celery's own limit reads
    missing: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ProcessEnd:
    """The end of a process's life."""

    pid: int
    start_ticks: int
    t: float
    reason: EndReason
    exit_code: int | None = None


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the probe in a worker's master says about it at startup."""

    pid: int
    start_ticks: int
    nodename: str
    pool: str
    concurrency: int
    max_tasks_per_child: int | None
    max_memory_per_child_kb: int | None
    # The app's settings the guard's self-check reads, and per task name what decides
    # whether a hard kill loses the task (``celery_warden.guard.selfcheck``); None from
    # a probe that does not send them. Live only: not stored.
    settings: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class TaskStarted:
    """The probe saw a task start in a pool process."""

    pid: int
    start_ticks: int
    task_id: str
    name: str
    t: float


@dataclass(frozen=True, slots=True)
class TaskFinished:
    """The probe saw a task end; the memory figures are read right after it."""

    pid: int
    start_ticks: int
    task_id: str
    name: str
    t: float  # end, epoch seconds
    wall_seconds: float  # from a monotonic clock, so a clock jump cannot skew it
    state: TaskState
    rss_after_bytes: int | None
    started_at: float | None = None  # epoch seconds, as the probe saw it at prerun
    # CPU seconds of the thread that ran the call (None where it cannot be told, as
    # under gevent/eventlet, where every greenlet shares one thread).
    cpu_seconds: float | None = None
    # Private and proportional memory right after the call: read at a bounded rate
    # (smaps costs far more than statm), so None on most calls.
    uss_after_bytes: int | None = None
    pss_after_bytes: int | None = None
    # Change over the call in the blocks Python's allocator holds (sys.getallocatedblocks):
    # objects created and kept, whatever their size.
    py_blocks_delta: int | None = None
    exception: str | None = None  # the exception type of a failed or retried call
    retries: int = 0  # how many times this task id had been retried before this call


@dataclass(frozen=True, slots=True)
class RunningTask:
    """A task a process is running now, as its last heartbeat told."""

    task_id: str
    name: str
    since: float  # epoch seconds, when it started
    cpu_seconds: float | None  # CPU its thread has used so far (None: cannot be told)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A process's periodic word: it is alive, and these are the tasks it is running.

    Not stored: it refreshes the warden's live view (:meth:`Session.running`), and
    repeats state rather than events, so a lost message mends itself at the next beat.
    """

    pid: int
    start_ticks: int
    t: float  # epoch seconds, as the process saw it
    running: tuple[RunningTask, ...]


class MemoryPoint(NamedTuple):
    """One point of a memory series for analysis: when, how much, after how many tasks.

    A named tuple, like :class:`Sample`, for the same reason: one per sample.
    """

    t: float
    value: float
    tasks_done: int = 0


@dataclass(frozen=True, slots=True)
class MemoryFinding:
    """The memory verdict on one process with the evidence behind it.

    Slopes are robust (Theil-Sen) fits over ``window`` after warm-up; ``None`` where
    the axis was not available (no tasks recorded, or too short a time).
    """

    verdict: Verdict
    metric: str  # "uss" or "rss": the series the verdict was drawn from
    current_bytes: float | None
    peak_bytes: float | None
    slope_bytes_per_task: float | None
    slope_bytes_per_hour: float | None
    growth_bytes: float | None  # fitted growth over the window
    noise_bytes: float | None  # robust spread of the residuals
    confidence: float  # 0..1: how sure the verdict is
    window_start: float | None  # epoch seconds
    window_end: float | None
    window_tasks: int | None
    points: int
    reason: str  # one sentence a person can read


@dataclass(frozen=True, slots=True)
class GrowthFinding:
    """Sustained growth of a count (threads, open files) in one process."""

    kind: str  # "thread-leak" or "fd-leak"
    start_value: float
    end_value: float
    slope_per_hour: float
    slope_per_task: float | None
    confidence: float
    points: int
    reason: str


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One run of the warden (``run``, ``watch`` or ``demo``) as stored."""

    id: int
    mode: str
    command: str
    hostname: str
    started_at: float
    ended_at: float | None
    exit_code: int | None
    interval_seconds: float
    probe_dropped: int


@dataclass(frozen=True, slots=True)
class ProcessHistory:
    """Everything stored about one process: its life, its samples and its tasks."""

    info: ProcessInfo
    ended_at: float | None
    end_reason: EndReason | None
    exit_code: int | None
    samples: tuple[Sample, ...]
    tasks: tuple[TaskFinished, ...]  # finished tasks, by end time


@dataclass(frozen=True, slots=True)
class DiagnosisRecord:
    """What ``celery-warden diagnose`` found in one live process.

    ``document`` is the probe's replies merged (``probe/_ops.py``) plus the verdict's
    evidence and advice: types, sizes, counts, file:line, attribute names; object
    contents only when ``show_values`` (the user asked, and it is recorded)."""

    pid: int
    start_ticks: int
    at: float
    task_name: str | None
    verdict: Verdict
    show_values: bool
    document: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What ``report`` reads from the store for one session."""

    session: SessionInfo
    workers: tuple[WorkerInfo, ...]
    processes: tuple[ProcessHistory, ...]
    running_tasks: tuple[TaskStarted, ...]  # started, never finished
    diagnoses: tuple[DiagnosisRecord, ...] = ()  # newest last
    incidents: tuple[Incident, ...] = ()  # by decision time
    signals: tuple[SignalAudit, ...] = ()  # by time


class IncidentKind(StrEnum):
    """What the guard acted on (or, in a dry run, would have)."""

    MEMORY_SOFT = "memory-soft"  # a child over the soft threshold: leaves after its task
    MEMORY_HARD = "memory-hard"  # a child over the hard threshold: TERM, then KILL
    MASTER_MEMORY = "master-memory"  # a master over its budget
    HANG = "hang"  # a task far past its usual time, or a child whose heartbeats stopped
    MASTER_STUCK = "master-stuck"  # a master that stopped consuming while its queue has work
    ORPHAN = "orphan"  # a process of a worker's lineage whose master died
    POISON = "poison"  # a task id killed too often: reported, no longer killed
    FOREIGN = "foreign"  # a pool child that exec'd something else
    CONFIG = "config"  # a startup self-check warning


class Outcome(StrEnum):
    """How an incident ended (or where it stands)."""

    DRY_RUN = "dry-run"  # decided, not acted on (`watch` without --act)
    PENDING = "pending"  # acting: soft recycle requested, or TERM sent and KILL due
    RECYCLED = "recycled"  # the child left after its task (soft)
    TERMINATED = "terminated"  # ended on TERM, no KILL needed
    KILLED = "killed"  # needed KILL
    TARGET_GONE = "target-gone"  # it ended (or its PID was reused) before any signal
    CELERY_HANDLED = "celery-time-limit-handled"  # Celery's own time limit acted first
    REPORTED = "reported"  # nothing to do but say so
    REFUSED = "refused"  # a rule forbade acting (rate limit, last serving child, poison)
    FAILED = "failed"  # the action failed (see the reason)


@dataclass(frozen=True, slots=True)
class Incident:
    """One decision of the guard, with everything behind it.

    ``id`` is stable across updates (the store keeps the last version): an incident is
    written when decided (before any signal, with the stack when one was captured) and
    again when its outcome is known. ``deadline`` (epoch seconds) is when a pending hard
    recycle sends KILL: a warden restarted mid-escalation resumes from it.
    """

    id: str
    kind: IncidentKind
    pid: int
    start_ticks: int
    master_pid: int | None
    t: float  # when decided, epoch seconds
    reason: str  # one sentence a person can read
    numbers: dict[str, float | int | str | None]  # the measurements behind it
    outcome: Outcome
    dry_run: bool = False
    task_name: str | None = None
    task_id: str | None = None
    stack: str | None = None  # the stack captured before acting, or why none was
    ended_at: float | None = None  # when the outcome was known
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class SignalAudit:
    """One signal the warden sent, or refused, or would have sent (dry run).

    Every signal goes through ``celery_warden.guard.signals.Signaller.send``, which
    writes one of these before returning.
    """

    t: float
    pid: int
    start_ticks: int
    signal: str  # "SIGTERM"
    result: str  # "sent", "gone", "dry-run", or "refused: <why>"
    incident_id: str | None = None
    detail: str = ""
