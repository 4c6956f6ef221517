"""What each process of a watched worker is doing right now, from the probe's messages.

Task start and end messages keep it current between heartbeats; each heartbeat replaces
a process's running set outright, so a message the probe dropped, or a warden that came
late, is mended within one beat. The guard reads it to know which task a child is
running, since when, and whether its thread still burns CPU.

It also keeps what each worker's master said of itself at startup (``WorkerInfo``, with
the app's settings the guard's self-check reads), until that master ends: the settings
are live only, never stored.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from celery_warden._records import (
    Heartbeat,
    ProcessEnd,
    ProcessInfo,
    RunningTask,
    TaskFinished,
    TaskStarted,
    WorkerInfo,
)

__all__ = ["Activity", "LiveView"]

_MAX_PROCESSES = 10_000
_SILENT_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class Activity:
    """One process as the warden knows it now.

    ``heard_at`` is the warden's clock (epoch seconds) when the process last said
    anything; ``heartbeat_at`` when its last heartbeat arrived (None before the first):
    a process running a task whose heartbeats stop is stuck with the GIL held, or dead.
    """

    pid: int
    start_ticks: int
    running: tuple[RunningTask, ...]
    heard_at: float
    heartbeat_at: float | None


@dataclass(slots=True)
class _State:
    running: dict[str, RunningTask] = field(default_factory=dict)
    heard_at: float = 0.0
    heartbeat_at: float | None = None


class LiveView:
    """Thread-safe: the listener thread updates it, anyone reads it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[tuple[int, int], _State] = {}
        self._workers: dict[int, WorkerInfo] = {}  # by master pid, the latest

    def update(self, message: object, now: float | None = None) -> None:
        """Apply one probe message (or a sampler's ProcessEnd); others are ignored."""
        now = time.time() if now is None else now
        with self._lock:
            if isinstance(message, ProcessEnd):
                self._states.pop((message.pid, message.start_ticks), None)
                worker = self._workers.get(message.pid)
                if worker is not None and worker.start_ticks == message.start_ticks:
                    del self._workers[message.pid]
                return
            if isinstance(message, WorkerInfo):
                # A master restarted under the same pid replaces the one before it.
                self._workers.pop(message.pid, None)
                if len(self._workers) >= _MAX_PROCESSES:
                    del self._workers[next(iter(self._workers))]  # the longest known
                self._workers[message.pid] = message
                return
            if not isinstance(message, TaskStarted | TaskFinished | Heartbeat | ProcessInfo):
                return
            key = (message.pid, message.start_ticks)
            if key not in self._states and len(self._states) >= _MAX_PROCESSES:
                self._forget_silent(now)
            state = self._states.setdefault(key, _State())
            state.heard_at = now
            if isinstance(message, TaskStarted):
                state.running[message.task_id] = RunningTask(
                    message.task_id, message.name, message.t, None
                )
            elif isinstance(message, TaskFinished):
                state.running.pop(message.task_id, None)
            elif isinstance(message, Heartbeat):
                state.heartbeat_at = now
                state.running = {task.task_id: task for task in message.running}

    def _forget_silent(self, now: float) -> None:
        """Bounded: processes whose end was never seen (a program a task spawned that
        inherited the probe's socket) are forgotten once silent for a while."""
        for key, state in list(self._states.items()):
            if now - state.heard_at > _SILENT_SECONDS:
                del self._states[key]

    def workers(self) -> list[WorkerInfo]:
        """The latest word of every worker's master not known to have ended, by pid."""
        with self._lock:
            return [self._workers[pid] for pid in sorted(self._workers)]

    def activity(self) -> list[Activity]:
        """Every process heard from and not known to have ended, by pid."""
        with self._lock:
            return [
                Activity(pid, ticks, tuple(s.running.values()), s.heard_at, s.heartbeat_at)
                for (pid, ticks), s in sorted(self._states.items())
            ]
