"""The guard: after every sweep, decide; act through the audited signaller; record why.

It reads what the session already keeps (the processes of each tree with their verified
pidfds, the latest sample of each, what each child runs from the probe's heartbeats,
how long each task name usually takes) and applies, in this order:

1. **hang**: a task far past what its name usually takes (or past its Celery time
   limit x a factor: Celery acts first), or a child running a task whose heartbeats
   stopped (the GIL held in C code, or the process stopped). Its stack is captured and
   the incident stored *before* the child is recycled hard;
2. **memory**: a child's current private memory (USS or PSS, never the peak) over the
   hard threshold: recycled hard (TERM, KILL after the grace); over the soft threshold,
   or heading over the hard one within the horizon: asked to leave after its current
   task (the probe's in-process recycle, billiard's own graceful exit); a master over
   its budget: reported (recycling children never fixes it) or warm-restarted;
3. **orphans**: processes of a dead master's recorded lineage, after a grace period.

Recycles of one worker are bounded (in flight, per hour, spacing) and at least
``min_serving`` children keep serving; a task id that keeps getting its child killed is
reported as poison and not killed again. Every decision is an :class:`Incident`, written
before the first signal and again with its outcome; in a dry run, with ``dry-run``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from celery_warden import _procs, control
from celery_warden._records import (
    Incident,
    IncidentKind,
    Outcome,
    ProcessInfo,
    Role,
    RunningTask,
    Sample,
    SignalAudit,
    TaskFinished,
    TaskState,
    WorkerInfo,
)
from celery_warden.exceptions import WardenError
from celery_warden.guard import _stacks, selfcheck
from celery_warden.guard._config import GuardConfig
from celery_warden.guard._policy import Durations, PoisonLedger, Trip, WorkerBudget, projected
from celery_warden.guard.signals import Signaller, Target
from celery_warden.store import Store

__all__ = ["Guard", "GuardView"]

log = logging.getLogger("celery_warden")

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class GuardView:
    """What one tick reads: the session's state at the end of a sweep."""

    tracked: list[ProcessInfo]
    latest: dict[int, Sample]  # pid -> its latest sample
    running: dict[tuple[int, int], tuple[tuple[RunningTask, ...], float | None]]
    workers: list[WorkerInfo]


@dataclass(slots=True)
class _Proc:
    """What the guard remembers about one process between ticks."""

    soft: Trip
    hard: Trip
    readings: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=30))
    last_sample_t: float = 0.0
    task_seen: dict[str, float] = field(default_factory=dict)  # task id -> first seen (mono)
    beat: float | None = None  # the last heartbeat value seen...
    beat_changed: float = 0.0  # ...and when (mono)
    incident: str | None = None  # the hard action (or report) under way on it
    recycling: str | None = None  # a soft recycle waiting for the child to leave
    soft_failures: int = 0  # soft recycles its probe could not take on...
    soft_retry_at: float = float("-inf")  # ...so the next is tried only from then
    reported: set[str] = field(default_factory=set)  # once-only reports (kind:task id)
    past_limit: dict[str, str] = field(default_factory=dict)  # task id -> name, over its limit


class _Recorder:
    """Writes incidents and signal audits at once, from the guard's own connection (the
    session's writer batches for 0.2 s; an incident must be durable before its signal)."""

    def __init__(self, store_path: Path | None, session_id: Callable[[], int]) -> None:
        self._store = Store.open(store_path) if store_path is not None else None
        self._session_id = session_id
        self._lock = threading.Lock()
        self.errors = 0
        self.incidents: dict[str, Incident] = {}  # the latest version of each, this run

    def incident(self, incident: Incident) -> None:
        with self._lock:
            self.incidents[incident.id] = incident
            if self._store is None:
                return
            try:
                self._store.save_incident(self._session_id() or None, incident)
            except Exception as exc:  # noqa: BLE001 - supervision goes on without history
                self.errors += 1
                log.warning("could not store incident %s: %s", incident.id, exc)

    def signal(self, audit: SignalAudit) -> None:
        with self._lock:
            if self._store is None:
                return
            try:
                self._store.add_signal(self._session_id() or None, audit)
            except Exception as exc:  # noqa: BLE001 - as above
                self.errors += 1
                log.warning("could not store a signal audit: %s", exc)

    def pending(self) -> list[Incident]:
        if self._store is None:
            return []
        try:
            with self._lock:
                pending = self._store.pending_incidents()
                wardens = dict(
                    self._store.connection.execute("SELECT id, warden_pid FROM sessions")
                )
        except Exception as exc:  # noqa: BLE001 - a damaged table must not stop the guard
            log.warning("could not read pending incidents: %s", exc)
            return []
        # Another warden still running owns its escalations (the store may be shared).
        mine = self._session_id()
        return [
            incident for sid, incident in pending if sid == mine or not _alive(wardens.get(sid))
        ]

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


class Guard:
    """Applies ``config`` to the trees a session watches.

    ``view`` returns the session's state; ``handle(pid, start_ticks)`` a duplicate of
    the pidfd the sampler opened at discovery (None: not a process of ours). The guard
    thread waits on ``swept`` (set after each sweep); tests call :meth:`tick` directly.
    """

    def __init__(
        self,
        config: GuardConfig,
        *,
        view: Callable[[], GuardView],
        handle: Callable[[int, int], _procs.ProcessHandle | None],
        store_path: Path | None,
        session_id: Callable[[], int] = lambda: 0,
        stack_signal: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._view = view
        self._handle = handle
        self._clock = clock
        self.recorder = _Recorder(store_path, session_id)
        self.signaller = Signaller(
            dry_run=not config.act, audit=self.recorder.signal, stack_signal=stack_signal
        )
        self.durations = Durations()
        self.poison = PoisonLedger(config.poison.window_seconds)
        self._procs: dict[tuple[int, int], _Proc] = {}
        self._budgets: dict[int, WorkerBudget] = {}
        self._masters: dict[int, tuple[int, int]] = {}  # pid -> (start_ticks, uid)
        self._orphaned: dict[tuple[int, int], float] = {}  # first seen orphaned (mono)
        self._checked: set[tuple[int, int]] = set()  # masters self-checked
        self._settings: dict[int, dict[str, Any]] = {}  # master pid -> app settings
        self._last_work: dict[int, float] = {}  # master pid -> when a child last worked
        self._worked: set[int] = set()  # pids that finished a call since the last tick
        # tick() against the escalation threads and the listener's on_task (reentrant:
        # a decision may finish an incident on the spot)
        self._lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self._last_view: GuardView | None = None
        self._beating = False  # whether any probe of this session sends heartbeats
        self.swept = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="warden-guard", daemon=True)

    # -- life --------------------------------------------------------------------------

    def start(self) -> None:
        self._resume_pending()
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop deciding; escalations under way finish (up to ``timeout`` seconds)."""
        self._stop.set()
        self.swept.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        h, r = self.config.hang, self.config.recycle
        worst = h.stack_timeout_seconds + 5 + r.grace_seconds + 5  # stack, TERM, KILL
        deadline = time.monotonic() + (worst if timeout is None else timeout)
        for thread in list(self._threads):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if not any(thread.is_alive() for thread in self._threads):
            self.recorder.close()  # else the process's exit closes it, after their writes

    def on_task(self, message: TaskFinished) -> None:
        """Learn how long each task name takes (the session calls this per call), and
        see Celery's own time limit end a call (B11)."""
        self.durations.add(message.name, message.wall_seconds)
        self._worked.add(message.pid)
        if message.state is not TaskState.SUCCESS:
            with self._lock:
                self._limit_reached(message)

    def _limit_reached(self, message: TaskFinished) -> None:
        """A call that failed at its Celery time limit: Celery ends its child (TERM,
        then KILL); the guard leaves it be and says so, once."""
        view = self._last_view
        info = next((i for i in view.tracked if i.pid == message.pid), None) if view else None
        if info is None:
            return
        limit = self._task_setting(info.master_pid, message.name, "time_limit")
        if not isinstance(limit, int | float) or message.wall_seconds < limit - 0.05:
            return
        state = self._state(info)
        state.past_limit.pop(message.task_id, None)  # _gone must not say it again
        if state.incident is not None:
            return  # the guard was acting on it already
        self._record(
            IncidentKind.HANG,
            (info.pid, info.start_ticks),
            info.master_pid,
            f"{message.name} reached its Celery time limit of {limit:g} s; Celery ends the "
            "child, the guard sent nothing",
            {"wall_seconds": round(message.wall_seconds, 3), "time_limit_seconds": limit},
            Outcome.CELERY_HANDLED,
            task=(message.name, message.task_id),
        )

    def orphans_pending(self) -> bool:
        """Whether orphans are waiting for their grace or being killed (``run`` waits
        for them before it exits)."""
        with self._lock:
            return bool(self._orphaned) or any(t.is_alive() for t in self._threads)

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        """Run an action on a thread of its own (a slow py-spy or a grace period holds
        up no other decision); :meth:`stop` waits for it."""
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.swept.wait()
            self.swept.clear()
            if self._stop.is_set():
                return
            try:
                self.tick()
            except Exception:  # a guard bug must not end the session's supervision
                log.exception("guard tick failed")

    # -- one decision round ----------------------------------------------------------------

    def tick(self) -> None:
        now = self._clock()
        view = self._view()
        with self._lock:
            self._last_view = view
            self._beating = self._beating or any(b is not None for _r, b in view.running.values())
            self._threads = [t for t in self._threads if t.is_alive()]
            by_pid = {info.pid: info for info in view.tracked}
            self._note_masters(view, by_pid)
            live = {(i.pid, i.start_ticks) for i in view.tracked}
            for key in [k for k in self._procs if k not in live]:
                self._gone(key, now)
            for info in view.tracked:
                sample = view.latest.get(info.pid)
                if sample is not None and sample.start_ticks != info.start_ticks:
                    sample = None
                if sample is not None and sample.state == "zombie":
                    continue  # a zombie holds nothing and cannot be acted on (A5)
                state = self._state(info)
                if info.role is Role.CHILD or (info.role is Role.MASTER and self._runs_tasks(info)):
                    running, beat = view.running.get((info.pid, info.start_ticks), ((), None))
                    self._check_hang(info, state, running, beat, now)
                if sample is not None:
                    self._check_memory(info, state, sample, now)
                if info.role is Role.DESCENDANT and info.ppid == info.master_pid:
                    self._foreign(info, state)
            self._check_orphans(view, now)
            self._check_consuming(view, now)

    def _state(self, info: ProcessInfo) -> _Proc:
        key = (info.pid, info.start_ticks)
        state = self._procs.get(key)
        if state is None:
            m = self.config.memory
            metric_soft = m.child_soft_mib if info.role is not Role.MASTER else 0.0
            metric_hard = m.child_hard_mib if info.role is not Role.MASTER else m.master_budget_mib
            state = self._procs[key] = _Proc(
                soft=Trip(metric_soft * _MIB, m.sustain_samples, m.hysteresis_mib * _MIB),
                hard=Trip(metric_hard * _MIB, m.sustain_samples, m.hysteresis_mib * _MIB),
            )
        return state

    def _gone(self, key: tuple[int, int], now: float) -> None:
        state = self._procs.pop(key)
        self._orphaned.pop(key, None)
        for task_id, name in state.past_limit.items():
            # It ended after its task passed the Celery time limit and before the
            # guard's own threshold: Celery's hard time limit handled it (B11).
            self._record(
                IncidentKind.HANG,
                key,
                None,
                f"{name} ran past its Celery time limit; Celery ended it, the guard sent nothing",
                {},
                Outcome.CELERY_HANDLED,
                task=(name, task_id),
            )

    def _runs_tasks(self, info: ProcessInfo) -> bool:
        """A solo or threads master runs tasks itself: hangs there are reported."""
        settings = self._settings.get(info.pid)
        return settings is not None and settings.get("_pool") in ("solo", "threads")

    # -- masters and the self-check ----------------------------------------------------------

    def _note_masters(self, view: GuardView, by_pid: dict[int, ProcessInfo]) -> None:
        for info in view.tracked:
            if info.role is Role.MASTER:
                # Refreshed while it lives: a PID reused by a new master replaces the
                # old one, and `celery worker --uid` drops root after it started.
                with contextlib.suppress(_procs.Vanished, OSError):
                    self._masters[info.pid] = (info.start_ticks, _procs.owner_uid(info.pid))
        for worker in view.workers:
            master = by_pid.get(worker.pid)
            if master is None or master.start_ticks != worker.start_ticks:
                continue
            settings = dict(worker.settings or {})
            settings["_pool"] = worker.pool
            self._settings[worker.pid] = settings
            key = (worker.pid, worker.start_ticks)
            if key not in self._checked:
                self._checked.add(key)
                self._self_check(master, worker)

    def _self_check(self, master: ProcessInfo, worker: WorkerInfo) -> None:
        findings = []
        if worker.settings is not None:
            findings += selfcheck.check_settings(worker.settings)
        findings += selfcheck.check_process_manager(master.pid)
        if self.config.hang.enabled and self.config.hang.stack in ("auto", "py-spy"):
            found = selfcheck.check_ptrace(master.pid)
            if found is not None:
                findings.append(found)
        for finding in findings:
            self._record(
                IncidentKind.CONFIG,
                (master.pid, master.start_ticks),
                master.pid,
                f"{finding.message}; fix: {finding.fix}",
                {"key": finding.key, "severity": finding.severity},
                Outcome.REPORTED,
            )

    def _task_setting(self, master_pid: int | None, name: str, key: str) -> Any:
        settings = self._settings.get(master_pid or -1)
        if settings is None:
            return None
        per_task = (settings.get("tasks") or {}).get(name) or {}
        if key in per_task:
            return per_task[key]
        return settings.get(f"task_{key}")

    # -- hangs ----------------------------------------------------------------------------

    def _hang_threshold(self, master_pid: int, name: str) -> tuple[float, str, float | None]:
        """Seconds after which a call of ``name`` is hung, why, and its time limit."""
        h = self.config.hang
        limit = self._task_setting(master_pid, name, "time_limit")
        if isinstance(limit, int | float) and limit > 0:
            return (
                float(limit) * h.time_limit_factor,
                f"{h.time_limit_factor:g} x its time limit",
                float(limit),
            )
        p99 = self.durations.p99(name)
        if p99 is not None and self.durations.count(name) >= h.min_history:
            usual = h.factor * p99
            if usual > h.history_min_seconds:
                return usual, f"{h.factor:g} x its p99 of {p99:.3g} s", None
            return h.history_min_seconds, "hang.history_min_seconds", None
        return h.min_seconds, "hang.min_seconds: too little history for this name", None

    def _check_hang(
        self,
        info: ProcessInfo,
        state: _Proc,
        running: tuple[RunningTask, ...],
        beat: float | None,
        now: float,
    ) -> None:
        h = self.config.hang
        if beat != state.beat:
            state.beat, state.beat_changed = beat, now
        ids = {task.task_id for task in running}
        for task_id in [t for t in state.task_seen if t not in ids]:
            del state.task_seen[task_id]
            state.past_limit.pop(task_id, None)
        if not h.enabled or not running or state.incident is not None:
            return
        for task in running:
            if task.task_id not in state.task_seen:
                # Its age by the wall clock, at most the process's own (a monotonic
                # figure): a wall clock stepped since cannot make it look old.
                age = min(max(0.0, time.time() - task.since), _procs.age_seconds(info.start_ticks))
                state.task_seen[task.task_id] = now - age
            first = state.task_seen[task.task_id]
            runtime = now - first
            threshold, why, limit = self._hang_threshold(info.master_pid, task.name)
            if limit is not None and runtime > limit:
                state.past_limit[task.task_id] = task.name
            if runtime > threshold:
                reason = f"{task.name} has run {runtime:.0f} s, past {threshold:.0f} s ({why})"
                numbers = {"runtime_seconds": round(runtime, 3), "threshold_seconds": threshold}
                self._hang(info, state, task, reason, numbers, now)
                return
        if beat is not None:
            stalled = now - state.beat_changed
        elif self._beating:
            # Heartbeats flow in this session but this child never sent one: stopped (or
            # stuck in C) before its first beat. Silent since its task was first seen.
            stalled = now - min(state.task_seen.values())
        else:
            return  # no heartbeats at all (turned off, or no probe): nothing to tell by
        if stalled > h.stalled_seconds:
            task = running[0]
            reason = (
                f"no heartbeat for {stalled:.0f} s while running {task.name} "
                "(the GIL held in C code, or the process stopped)"
            )
            numbers = {"silent_seconds": round(stalled, 3), "threshold_seconds": h.stalled_seconds}
            self._hang(info, state, task, reason, numbers, now)

    def _hang(
        self,
        info: ProcessInfo,
        state: _Proc,
        task: RunningTask,
        reason: str,
        numbers: dict[str, Any],
        now: float,
    ) -> None:
        if info.role is Role.MASTER:  # solo/threads: the worker itself; report with the stack
            key = f"hang:{task.task_id}"
            if key in state.reported:
                return
            state.reported.add(key)
            decided = time.time()

            def report() -> None:  # py-spy may take seconds: not on the tick
                self._record(
                    IncidentKind.HANG,
                    (info.pid, info.start_ticks),
                    info.pid,
                    reason + "; a solo/threads worker runs tasks in its master: restart it",
                    numbers,
                    Outcome.REPORTED,
                    task=(task.name, task.task_id),
                    stack=self._stack(info).stored(),
                    t=decided,
                )

            self._spawn("warden-report", report)
            return
        self._hard(info, state, IncidentKind.HANG, reason, numbers, now, task=task, with_stack=True)

    def _stack(self, info: ProcessInfo, incident_id: str | None = None) -> _stacks.Stack:
        try:
            target = self._target(info)
        except OSError as exc:
            return _stacks.Stack(None, None, f"no descriptor for it: {exc.strerror or exc}")
        if target is None:
            return _stacks.Stack(None, None, "the process is no longer ours to read")
        sample = self._last_view.latest.get(info.pid) if self._last_view else None
        stopped = sample is not None and sample.state in ("stopped", "tracing-stop")
        try:
            h = self.config.hang
            return _stacks.capture(
                self.signaller,
                target,
                h.stack,
                h.stack_timeout_seconds,
                stopped=stopped,
                incident_id=incident_id,
            )
        finally:
            target.close()

    def _foreign(self, info: ProcessInfo, state: _Proc) -> None:
        """A direct child of the master that is not a pool child: a pool child that
        exec'd something else (A4). Never recycled as a pool child; reported once."""
        if "foreign" in state.reported:
            return
        state.reported.add("foreign")
        self._record(
            IncidentKind.FOREIGN,
            (info.pid, info.start_ticks),
            info.master_pid,
            f"foreign process in worker tree: {info.cmdline[:120]!r} is a child of the master "
            "but no longer a pool child (it exec'd); the guard does not recycle it",
            {"ppid": info.ppid},
            Outcome.REPORTED,
        )

    # -- memory ------------------------------------------------------------------------------

    def _metric(self, info: ProcessInfo, sample: Sample) -> float | None:
        """The current private memory: USS (or PSS). RSS bounds both from above, so
        only a process whose RSS is over a threshold costs an smaps read now."""
        m = self.config.memory
        floor = min(
            x for x in (m.child_soft_mib, m.child_hard_mib, m.master_budget_mib, 1e12) if x > 0
        )
        if sample.rss_bytes < floor * _MIB:
            return float(sample.rss_bytes)
        try:
            handle = self._handle(info.pid, info.start_ticks)
        except OSError:  # out of descriptors: no reading this sweep
            return None
        if handle is None:
            return None
        try:
            smaps = _procs.read_smaps(info.pid)
            if _procs.has_exited(handle):
                return None  # the figures may be of a process that took over the PID
        except (_procs.Vanished, PermissionError):
            value = sample.uss_bytes if m.metric == "uss" else sample.pss_bytes
            return float(value) if value is not None else None
        finally:
            handle.close()
        return float(smaps.uss_bytes if m.metric == "uss" else smaps.pss_bytes)

    def _check_memory(
        self,
        info: ProcessInfo,
        state: _Proc,
        sample: Sample,
        now: float,
    ) -> None:
        m = self.config.memory
        if info.role is Role.DESCENDANT or sample.t == state.last_sample_t:
            return  # what a task spawned is not a pool child; one reading per sweep
        if state.soft.threshold <= 0 and state.hard.threshold <= 0:
            return
        state.last_sample_t = sample.t
        value = self._metric(info, sample)
        if value is None:
            return
        state.readings.append((now, value))
        soft, hard = state.soft.reading(value), state.hard.reading(value)
        mib = round(value / _MIB, 1)
        numbers: dict[str, Any] = {
            f"{m.metric}_mib": mib,
            "rss_mib": round(sample.rss_bytes / _MIB, 1),
            "peak_rss_mib": round(sample.rss_peak_bytes / _MIB, 1)
            if sample.rss_peak_bytes
            else None,
        }
        if info.role is Role.MASTER:
            if hard and "master-memory" not in state.reported:
                state.reported.add("master-memory")
                self._master_over(info, state, value, numbers, now)
            elif not hard:
                state.reported.discard("master-memory")
            return
        if state.incident is not None:
            return
        running = self._running_task(info)
        if hard:
            numbers["threshold_mib"] = m.child_hard_mib
            reason = (
                f"{m.metric.upper()} {mib} MiB is over the hard threshold of "
                f"{m.child_hard_mib:g} MiB"
            )
            self._hard(info, state, IncidentKind.MEMORY_HARD, reason, numbers, now, task=running)
            return
        heading = None
        if m.projected_horizon_seconds > 0 and m.child_hard_mib > 0:
            heading = projected(list(state.readings), m.projected_horizon_seconds)
        if soft or (heading is not None and heading > m.child_hard_mib * _MIB):
            if soft:
                numbers["threshold_mib"] = m.child_soft_mib
                reason = (
                    f"{m.metric.upper()} {mib} MiB is over the soft threshold of "
                    f"{m.child_soft_mib:g} MiB"
                )
            else:
                assert heading is not None
                numbers["projected_mib"] = round(heading / _MIB, 1)
                numbers["horizon_seconds"] = m.projected_horizon_seconds
                reason = (
                    f"{m.metric.upper()} {mib} MiB is heading for {heading / _MIB:.0f} MiB within "
                    f"{m.projected_horizon_seconds:g} s, over the hard threshold"
                )
            self._soft(info, state, reason, numbers, now, task=running)

    def _running_task(self, info: ProcessInfo) -> RunningTask | None:
        if self._last_view is None:
            return None
        running, _beat = self._last_view.running.get((info.pid, info.start_ticks), ((), None))
        return running[0] if running else None

    def _master_over(
        self, info: ProcessInfo, state: _Proc, value: float, numbers: dict[str, Any], now: float
    ) -> None:
        m = self.config.memory
        numbers["budget_mib"] = m.master_budget_mib
        reason = (
            f"the master's {m.metric.upper()} of {value / _MIB:.0f} MiB is over its budget of "
            f"{m.master_budget_mib:g} MiB; recycling children never fixes a master's growth"
        )
        if m.master_action != "warm-restart":
            self._record(
                IncidentKind.MASTER_MEMORY,
                (info.pid, info.start_ticks),
                info.pid,
                reason + ": restart the worker (SIGTERM to the master is a warm shutdown)",
                numbers,
                Outcome.REPORTED,
            )
            return
        self._warm_restart(info, state, reason, numbers)

    # -- a master that stopped consuming -------------------------------------------------

    def _check_consuming(self, view: GuardView, now: float) -> None:
        """A prefork master whose children all sat idle for ``master_idle_seconds`` is
        asked (on a thread: it may not answer) how many messages wait in its queues."""
        idle_limit = self.config.hang.master_idle_seconds
        worked, self._worked = self._worked, set()
        if idle_limit <= 0:
            return
        busy: set[int] = set()
        for info in view.tracked:
            if info.role is not Role.CHILD:
                continue
            running, _beat = view.running.get((info.pid, info.start_ticks), ((), None))
            if running or info.pid in worked:
                busy.add(info.master_pid)
        for info in view.tracked:
            if info.role is not Role.MASTER or self._runs_tasks(info):
                continue
            if info.pid in busy or info.pid not in self._last_work:
                self._last_work[info.pid] = now
                self._state(info).reported.discard("stuck")
                continue
            state = self._state(info)
            if now - self._last_work[info.pid] < idle_limit or "stuck" in state.reported:
                continue
            state.reported.add("stuck")  # asked once per idle spell
            idle = now - self._last_work[info.pid]
            self._spawn("warden-queues", self._ask_queues, info, idle)

    def _ask_queues(self, info: ProcessInfo, idle: float) -> None:
        key = (info.pid, info.start_ticks)
        numbers: dict[str, Any] = {"idle_seconds": round(idle, 1)}
        try:
            reply = control.ask(info.pid, {"op": "queues"}, timeout=10.0)
        except control.NoProbe:
            return  # without the probe the queues cannot be read: nothing to say
        except WardenError as exc:
            self._record(
                IncidentKind.MASTER_STUCK,
                key,
                info.pid,
                f"every child idle for {idle:.0f} s and the master does not answer ({exc}): "
                "it may be blocked; its stack: `py-spy dump --pid "
                f"{info.pid}`; restart the worker",
                numbers,
                Outcome.REPORTED,
            )
            return
        depths = {str(k): v for k, v in (reply.get("queues") or {}).items() if isinstance(v, int)}
        waiting = sum(depths.values())
        if waiting <= 0:
            return  # idle because there is nothing to do
        numbers.update({"waiting_messages": waiting, "queues": ", ".join(sorted(depths))})
        self._record(
            IncidentKind.MASTER_STUCK,
            key,
            info.pid,
            f"every child idle for {idle:.0f} s while {waiting} message(s) wait in its queues: "
            "the master stopped consuming; restart the worker (SIGTERM to the master)",
            numbers,
            Outcome.REPORTED,
        )

    # -- orphans -------------------------------------------------------------------------------

    def _check_orphans(self, view: GuardView, now: float) -> None:
        o = self.config.orphans
        alive_masters = {(i.pid, i.start_ticks) for i in view.tracked if i.role is Role.MASTER}
        for info in view.tracked:
            key = (info.pid, info.start_ticks)
            if info.role is Role.MASTER:
                continue
            master = self._masters.get(info.master_pid)
            if master is None or (info.master_pid, master[0]) in alive_masters:
                self._orphaned.pop(key, None)
                continue
            sample = view.latest.get(info.pid)
            if sample is not None and sample.state == "zombie":
                continue
            since = self._orphaned.setdefault(key, now)
            state = self._state(info)
            # Half a sweep of slack: a tick a few milliseconds early must not wait a
            # whole sweep more.
            if now - since < o.grace_seconds - 0.05 or state.incident is not None:
                continue
            try:
                uid = _procs.owner_uid(info.pid)
            except (_procs.Vanished, OSError):  # hidepid: not ours to read, nor to touch
                continue
            numbers: dict[str, Any] = {
                "orphaned_seconds": round(now - since, 3),
                "master_pid": info.master_pid,
                "role": str(info.role),
            }
            running = self._running_task(info)
            reason = (
                f"{info.role} of worker {info.master_pid}, which died "
                f"{now - since:.0f} s ago (recorded lineage)"
            )
            if running is not None:
                reason += self._redelivery_note(info.master_pid, running)
            if uid != master[1]:
                if f"orphan-uid:{uid}" not in state.reported:
                    state.reported.add(f"orphan-uid:{uid}")
                    self._record(
                        IncidentKind.ORPHAN,
                        key,
                        info.master_pid,
                        reason + f"; it belongs to uid {uid}, not the worker's: left alone",
                        numbers,
                        Outcome.REFUSED,
                    )
                continue
            if o.action == "report":
                if "orphan" not in state.reported:
                    state.reported.add("orphan")
                    self._record(
                        IncidentKind.ORPHAN, key, info.master_pid, reason, numbers, Outcome.REPORTED
                    )
                continue
            self._orphaned.pop(key, None)
            self._escalate(info, state, IncidentKind.ORPHAN, reason, numbers, task=running)

    def _redelivery_note(self, master_pid: int, task: RunningTask) -> str:
        acks_late = self._task_setting(master_pid, task.name, "acks_late")
        if not acks_late:
            return f"; its task {task.name} [{task.task_id}] was acked: lost"
        settings = dict(self._settings.get(master_pid) or {})
        seconds = selfcheck.predict_redelivery_seconds(settings)
        when = f" in about {seconds:.0f} s" if seconds is not None else ""
        return (
            f"; its acks_late task {task.name} [{task.task_id}] will be redelivered{when}: "
            "if it finishes here too, it runs twice"
        )

    # -- acting -------------------------------------------------------------------------------

    def _target(self, info: ProcessInfo) -> Target | None:
        handle = self._handle(info.pid, info.start_ticks)
        return Target(handle, info.role) if handle is not None else None

    def _budget(self, master_pid: int) -> WorkerBudget:
        r = self.config.recycle
        budget = self._budgets.get(master_pid)
        if budget is None:
            budget = self._budgets[master_pid] = WorkerBudget(
                r.max_parallel, r.min_interval_seconds, r.max_per_hour
            )
        return budget

    def _serving_refusal(self, info: ProcessInfo, budget: WorkerBudget) -> str | None:
        """At least ``min_serving`` children keep serving (a worker with a single child
        recycles it anyway: its replacement follows at once)."""
        view = self._last_view
        if view is None:
            return None
        children = [
            i
            for i in view.tracked
            if i.role is Role.CHILD
            and i.master_pid == info.master_pid
            and (s := view.latest.get(i.pid)) is not None
            and s.state != "zombie"
        ]
        if len(children) <= 1:
            return None
        serving = len(children) - len(budget.in_flight) - 1
        if serving < self.config.recycle.min_serving:
            return f"only {serving} child(ren) would keep serving (min_serving)"
        return None

    def _soft(
        self,
        info: ProcessInfo,
        state: _Proc,
        reason: str,
        numbers: dict[str, Any],
        now: float,
        *,
        task: RunningTask | None,
    ) -> None:
        if state.recycling is not None or now < state.soft_retry_at:
            return  # asked already, or could not be lately: the hard threshold still acts
        if self._stop.is_set() or not self._once_if_dry(state, IncidentKind.MEMORY_SOFT):
            return
        budget = self._budget(info.master_pid)
        refusal = budget.refusal(now, hard=False) or self._serving_refusal(info, budget)
        key = (info.pid, info.start_ticks)
        if refusal is not None:
            self._refused(info, state, IncidentKind.MEMORY_SOFT, reason, numbers, refusal, task)
            return
        incident = self._record(
            IncidentKind.MEMORY_SOFT,
            key,
            info.master_pid,
            reason + "; asked to leave after its current task",
            numbers,
            Outcome.DRY_RUN if self.signaller.dry_run else Outcome.PENDING,
            task=_named(task),
        )
        if self.signaller.dry_run:
            return
        state.recycling = incident.id
        budget.begin(incident.id, now, hard=False)
        self._spawn("warden-recycle", self._soft_recycle, info, incident, budget)

    def _refused(
        self,
        info: ProcessInfo,
        state: _Proc,
        kind: IncidentKind,
        reason: str,
        numbers: dict[str, Any],
        refusal: str,
        task: RunningTask | None,
    ) -> None:
        """A recycle a bound forbids now: retried at the next tick when the bound lifts
        by itself, recorded once otherwise."""
        if _transient(refusal):
            log.debug("%s PID %d waits: %s", kind, info.pid, refusal)
        elif f"refused:{kind}" not in state.reported:
            state.reported.add(f"refused:{kind}")
            self._record(
                kind,
                (info.pid, info.start_ticks),
                info.master_pid,
                f"{reason}; not now: {refusal}",
                numbers,
                Outcome.REFUSED,
                task=_named(task),
            )

    def _soft_recycle(self, info: ProcessInfo, incident: Incident, budget: WorkerBudget) -> None:
        """Ask the child's probe to leave between tasks; wait for it to go."""
        target: Target | None = None
        try:
            target = self._target(info)
            if target is None:
                self._finish(incident, Outcome.TARGET_GONE, "it ended before it was asked")
                return
            request = {"op": "recycle", "start_ticks": info.start_ticks}
            try:
                reply = control.ask(info.pid, request, timeout=5.0)
            except WardenError as exc:
                self._soft_failed(info, incident, f"soft recycle needs the probe's recycle ({exc})")
                return
            if not reply.get("accepted"):
                self._soft_failed(info, incident, f"the probe refused: {reply.get('error')}")
                return
            with self._lock:
                budget.accepted(self._clock())
            left = "it left after its task"
            if reply.get("after_trace"):
                left += " and the diagnosis tracing it"
            # It leaves when its current task is done: wait as long as that takes.
            while not self._stop.is_set():
                if _procs.has_exited(target.handle, 0.5):
                    self._finish(incident, Outcome.RECYCLED, left)
                    return
            self._finish(incident, Outcome.FAILED, "not seen to its end: the warden stopped")
        except Exception as exc:  # noqa: BLE001 - EMFILE and the like: the budget must be freed
            self._finish(incident, Outcome.FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            if target is not None:
                target.close()
            with self._lock:
                budget.end(incident.id)

    def _soft_failed(self, info: ProcessInfo, incident: Incident, why: str) -> None:
        """Asked again only after a backoff (2 s, doubling up to 5 minutes): a child
        just forked may not listen yet, one without the probe never will, and neither
        may cost an incident at every sweep. The hard threshold still acts."""
        with self._lock:
            state = self._procs.get((info.pid, info.start_ticks))
            if state is not None:
                state.soft_failures += 1
                backoff = min(300.0, 2.0 * 2 ** (state.soft_failures - 1))
                state.soft_retry_at = self._clock() + backoff
        self._finish(incident, Outcome.REFUSED, why + "; the hard threshold still applies")

    def _once_if_dry(self, state: _Proc, kind: IncidentKind) -> bool:
        """In a dry run each kind of decision is recorded once per process (nothing
        acts, so nothing would end it); acting, always."""
        if not self.signaller.dry_run:
            return True
        if f"dry:{kind}" in state.reported:
            return False
        state.reported.add(f"dry:{kind}")
        return True

    def _hard(
        self,
        info: ProcessInfo,
        state: _Proc,
        kind: IncidentKind,
        reason: str,
        numbers: dict[str, Any],
        now: float,
        *,
        task: RunningTask | None,
        with_stack: bool = False,
    ) -> None:
        key = (info.pid, info.start_ticks)
        if "unkillable" in state.reported or self._stop.is_set():
            return
        if task is not None:
            kills = self.poison.kills(task.task_id, now)
            if kills >= self.config.poison.max_kills:
                if f"poison:{task.task_id}" not in state.reported:
                    state.reported.add(f"poison:{task.task_id}")
                    numbers = {**numbers, "kills": kills, "window_seconds": self.poison.window}
                    self._record(
                        IncidentKind.POISON,
                        key,
                        info.master_pid,
                        f"task {task.name} [{task.task_id}] had its child killed {kills} times "
                        f"in {self.poison.window:g} s: reported, not killed again ({reason})",
                        numbers,
                        Outcome.REFUSED,
                        task=_named(task),
                    )
                return
        budget = self._budget(info.master_pid)
        refusal = budget.refusal(now, hard=True) or self._serving_refusal(info, budget)
        if refusal is not None:
            self._refused(info, state, kind, reason, numbers, refusal, task)
            return
        state.reported.discard(f"refused:{kind}")
        if task is not None:
            reason += self._loss_note(info.master_pid, task)
        self._escalate(
            info, state, kind, reason, numbers, task=task, with_stack=with_stack, budget=budget
        )

    def _loss_note(self, master_pid: int, task: RunningTask) -> str:
        acks_late = self._task_setting(master_pid, task.name, "acks_late")
        reject = self._task_setting(master_pid, task.name, "reject_on_worker_lost")
        # Celery 5.7's retry_on_worker_lost redelivers it too.
        reject = reject or self._task_setting(master_pid, task.name, "retry_on_worker_lost")
        if acks_late and reject:
            return (
                f"; {task.name} [{task.task_id}] will be redelivered "
                "(acks_late + reject_on_worker_lost)"
            )
        if self._settings.get(master_pid) is None:
            return (
                f"; {task.name} [{task.task_id}] is lost unless acks_late + reject_on_worker_lost"
            )
        return f"; task_lost: {task.name} [{task.task_id}] (Celery acks a task whose child died)"

    def _escalate(
        self,
        info: ProcessInfo,
        state: _Proc,
        kind: IncidentKind,
        reason: str,
        numbers: dict[str, Any],
        *,
        task: RunningTask | None,
        with_stack: bool = False,
        budget: WorkerBudget | None = None,
    ) -> None:
        """Capture the stack (a hang), store the incident, TERM, then KILL after the
        grace unless it exited: on a thread of its own, so neither a slow py-spy nor the
        grace holds up the decisions on other processes, and the KILL lands on time."""
        dry = self.signaller.dry_run
        if self._stop.is_set() or not self._once_if_dry(state, kind):
            return
        incident_id, decided = uuid.uuid4().hex, time.time()
        if not dry:
            state.incident = incident_id
            if budget is not None:
                budget.begin(incident_id, self._clock(), hard=True)

        def escalate() -> None:
            grace = self.config.recycle.grace_seconds

            def record(stack: str | None) -> Incident:
                return self._record(
                    kind,
                    (info.pid, info.start_ticks),
                    info.master_pid,
                    reason,
                    {**numbers, "grace_seconds": grace},
                    Outcome.DRY_RUN if dry else Outcome.PENDING,
                    task=_named(task),
                    stack=stack,
                    deadline=None if dry else time.time() + grace,
                    incident_id=incident_id,
                    t=decided,
                )

            incident = record(None)  # stored before any signal, the stack signal too
            if with_stack:  # and again with the stack, before TERM
                incident = record(self._stack(info, incident_id).stored())
            if with_stack and task is not None and not self._still_running(info, task):
                self._finish(incident, Outcome.REPORTED, "its task ended while its stack was read")
                if budget is not None:
                    with self._lock:
                        budget.end(incident_id)
                return
            self._terminate(info, incident, budget)

        self._spawn("warden-escalate", escalate)

    def _still_running(self, info: ProcessInfo, task: RunningTask) -> bool:
        """Whether ``info`` still runs ``task`` (a TERM must not land on the next one)."""
        running, _beat = self._view().running.get((info.pid, info.start_ticks), ((), None))
        return any(t.task_id == task.task_id for t in running)

    def _terminate(
        self,
        info: ProcessInfo,
        incident: Incident,
        budget: WorkerBudget | None,
        kill_at: float | None = None,
    ) -> None:
        target: Target | None = None
        try:
            target = self._target(info)
            if target is None:
                self._finish(incident, Outcome.TARGET_GONE, "it ended before any signal")
                return
            grace = self.config.recycle.grace_seconds
            if kill_at is None:
                sent_at = time.monotonic()
                result = self.signaller.send(target, signal.SIGTERM, incident_id=incident.id)
                if result == "dry-run":
                    return
                if result != "sent":
                    if result == "gone":
                        self._finish(incident, Outcome.TARGET_GONE, "SIGTERM: gone")
                    else:
                        self._unkillable(incident, f"SIGTERM {result}")
                    return
                if incident.task_id is not None:
                    with self._lock:
                        self.poison.add(incident.task_id, self._clock())
                kill_at = sent_at + grace
            if _procs.has_exited(target.handle, max(0.0, kill_at - time.monotonic())):
                ms = round((time.monotonic() - kill_at + grace) * 1000)
                self._finish(
                    incident, Outcome.TERMINATED, "it exited on SIGTERM", exited_after_term_ms=ms
                )
                return
            result = self.signaller.send(target, signal.SIGKILL, incident_id=incident.id)
            if result == "gone":
                self._finish(incident, Outcome.TERMINATED, "it exited as the grace ended")
            elif result == "sent" and _procs.has_exited(target.handle, 5.0):
                self._finish(incident, Outcome.KILLED, f"no exit within {grace:g} s of SIGTERM")
            elif result == "sent":
                self._unkillable(incident, "still there 5 s after SIGKILL (uninterruptible sleep?)")
            else:
                self._unkillable(incident, f"SIGKILL {result}")
        except Exception as exc:  # noqa: BLE001 - EMFILE and the like: never left pending
            self._finish(incident, Outcome.FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            if target is not None:
                target.close()
            if budget is not None:
                with self._lock:
                    budget.end(incident.id)

    def _unkillable(self, incident: Incident, why: str) -> None:
        """A process that a signal could not end is not signalled again: a loop of kills
        on a process in uninterruptible sleep (a hung NFS mount) helps nobody."""
        with self._lock:
            state = self._procs.get((incident.pid, incident.start_ticks))
            if state is not None:
                state.reported.add("unkillable")
        self._finish(incident, Outcome.FAILED, why + "; not signalled again")

    def _warm_restart(
        self, info: ProcessInfo, state: _Proc, reason: str, numbers: dict[str, Any]
    ) -> None:
        """TERM to the master only (warm shutdown: running tasks finish and are acked),
        then after the grace KILL what is left of its tree (B14)."""
        incident = self._record(
            IncidentKind.MASTER_MEMORY,
            (info.pid, info.start_ticks),
            info.pid,
            reason + "; warm restart: SIGTERM to the master only",
            numbers,
            Outcome.DRY_RUN if self.signaller.dry_run else Outcome.PENDING,
            deadline=None
            if self.signaller.dry_run
            else time.time() + self.config.recycle.grace_seconds,
        )
        state.incident = incident.id
        self._spawn("warden-warm", self._warm_restart_run, info, incident)

    def _warm_restart_run(self, info: ProcessInfo, incident: Incident) -> None:
        target = self._target(info)
        if target is None:
            self._finish(incident, Outcome.TARGET_GONE, "it ended before any signal")
            return
        try:
            result = self.signaller.send(target, signal.SIGTERM, incident_id=incident.id)
            if result != "sent":
                if result != "dry-run":
                    self._finish(
                        incident,
                        Outcome.TARGET_GONE if result == "gone" else Outcome.FAILED,
                        f"SIGTERM {result}",
                    )
                return
            grace = self.config.recycle.grace_seconds
            if _procs.has_exited(target.handle, grace):
                self._finish(incident, Outcome.TERMINATED, "the worker shut down warmly")
                return
            uid = self._masters.get(info.pid, (0, -1))[1]
            tree = [i for i in self._view().tracked if i.master_pid == info.pid]
            for member in sorted(tree, key=lambda i: i.role is Role.MASTER):
                try:
                    if _procs.owner_uid(member.pid) != uid:
                        continue  # another user's: never touched (C17)
                except (_procs.Vanished, OSError):
                    continue
                other = self._target(member)
                if other is not None:
                    try:
                        self.signaller.send(other, signal.SIGKILL, incident_id=incident.id)
                    finally:
                        other.close()
            self._finish(
                incident, Outcome.KILLED, f"the worker was still there {grace:g} s after SIGTERM"
            )
        finally:
            target.close()

    # -- records -----------------------------------------------------------------------------

    def _record(
        self,
        kind: IncidentKind,
        key: tuple[int, int],
        master_pid: int | None,
        reason: str,
        numbers: dict[str, Any],
        outcome: Outcome,
        *,
        task: tuple[str, str] | None = None,
        stack: str | None = None,
        deadline: float | None = None,
        incident_id: str | None = None,
        t: float | None = None,
    ) -> Incident:
        incident = Incident(
            id=incident_id or uuid.uuid4().hex,
            kind=kind,
            pid=key[0],
            start_ticks=key[1],
            master_pid=master_pid,
            t=time.time() if t is None else t,
            reason=reason,
            numbers=numbers,
            outcome=outcome,
            dry_run=self.signaller.dry_run,
            task_name=task[0] if task else None,
            task_id=task[1] if task else None,
            stack=stack,
            ended_at=time.time() if outcome not in (Outcome.PENDING,) else None,
            deadline=deadline,
        )
        quiet = outcome in (Outcome.REPORTED, Outcome.CELERY_HANDLED)
        if kind is IncidentKind.CONFIG:  # the self-check's warnings are worth a warning
            quiet = numbers.get("severity") != "warning"
        level = logging.INFO if quiet else logging.WARNING
        log.log(level, "%s PID %d: %s [%s]", kind, key[0], reason, outcome)
        self.recorder.incident(incident)
        return incident

    def _finish(self, incident: Incident, outcome: Outcome, why: str, **numbers: Any) -> None:
        done = replace(
            incident,
            outcome=outcome,
            ended_at=time.time(),
            numbers={**incident.numbers, **numbers, "outcome_detail": why},
        )
        log.warning("%s PID %d: %s (%s)", incident.kind, incident.pid, outcome, why)
        self.recorder.incident(done)
        with self._lock:
            state = self._procs.get((incident.pid, incident.start_ticks))
            if state is not None and outcome is not Outcome.PENDING:
                if state.incident == incident.id:
                    state.incident = None
                if state.recycling == incident.id:
                    state.recycling = None

    # -- after a restart ------------------------------------------------------------------

    def _resume_pending(self) -> None:
        """Escalations a previous warden left half-done (it was killed between TERM and
        KILL): resumed only on the very same process (PID and start time), never on a
        PID that now names another (F26)."""
        for incident in self.recorder.pending():
            if incident.dry_run:
                continue
            try:
                alive = _procs.read_stat(incident.pid).start_ticks == incident.start_ticks
            except (_procs.Vanished, PermissionError):
                alive = False
            if incident.deadline is None:  # a soft recycle: the probe keeps the request
                self._finish(incident, Outcome.FAILED, "not seen to its end: the warden stopped")
                continue
            if not alive:
                self._finish(incident, Outcome.TARGET_GONE, "gone when the warden restarted")
                continue
            self._spawn("warden-resume", self._resume_one, incident)

    def _resume_one(self, incident: Incident) -> None:
        """Wait until the session has discovered the process (its pidfd verified) and
        its deadline has passed, then finish the escalation with KILL."""
        info: ProcessInfo | None = None
        for _ in range(100):
            view = self._view()
            info = next(
                (
                    i
                    for i in view.tracked
                    if (i.pid, i.start_ticks) == (incident.pid, incident.start_ticks)
                ),
                None,
            )
            if info is not None or self._stop.wait(0.1):
                break
        if info is None:
            self._finish(
                incident, Outcome.TARGET_GONE, "not found in any watched tree after restart"
            )
            return
        grace = self.config.recycle.grace_seconds
        kill_at = time.monotonic() + min(grace, max(0.0, (incident.deadline or 0.0) - time.time()))
        self._terminate(info, incident, None, kill_at=kill_at)


def _alive(pid: object) -> bool:
    """Whether a warden with this PID (from the store) still runs; a reused PID reads as
    alive, which only leaves its escalation alone."""
    return isinstance(pid, int) and pid != os.getpid() and os.path.exists(f"/proc/{pid}")


def _transient(refusal: str) -> bool:
    """A refusal that lifts by itself within seconds (another recycle in flight, the
    spacing between hard ones, the last serving child): retried at the next tick, not
    an incident. Only the hourly rate limit is worth a record."""
    return "max_per_hour" not in refusal


def _named(task: RunningTask | None) -> tuple[str, str] | None:
    return (task.name, task.task_id) if task is not None else None
