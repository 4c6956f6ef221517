"""Reading a session back out of the store, as records for analysis.

Reads go through their own read-only connection: WAL lets them run while the warden
writes, and they never take a write lock, so ``report`` cannot stall the sampler.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections import defaultdict
from typing import Any

from celery_warden._records import (
    DiagnosisRecord,
    EndReason,
    Incident,
    IncidentKind,
    Outcome,
    ProcessHistory,
    ProcessInfo,
    Role,
    Sample,
    SessionInfo,
    SignalAudit,
    Snapshot,
    TaskFinished,
    TaskStarted,
    TaskState,
    Verdict,
    WorkerInfo,
)
from celery_warden.exceptions import StoreEmpty, StoreError

__all__ = ["SELECT_INCIDENTS", "list_sessions", "read_incidents", "read_snapshot"]

log = logging.getLogger("celery_warden")

SELECT_INCIDENTS = (
    "SELECT session_id, id, kind, pid, start_ticks, master_pid, t, reason, numbers, outcome,"
    " dry_run, task_name, task_id, stack, ended_at, deadline FROM incidents"
)

_SELECT_SESSIONS = (
    "SELECT id, mode, command, hostname, started_at, ended_at, exit_code, interval_seconds,"
    " probe_dropped FROM sessions"
)
_NEWEST_FIRST = _SELECT_SESSIONS + " ORDER BY id DESC"
_BY_ID = _SELECT_SESSIONS + " WHERE id = ?"


def _session(row: tuple[object, ...]) -> SessionInfo:
    return SessionInfo(*row)  # type: ignore[arg-type]


def list_sessions(conn: sqlite3.Connection) -> list[SessionInfo]:
    """Every recorded session, newest first."""
    try:
        rows = conn.execute(_NEWEST_FIRST).fetchall()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"cannot read the store: {exc}") from None
    return [_session(row) for row in rows]


def read_snapshot(conn: sqlite3.Connection, session_id: int | None = None) -> Snapshot:
    """Read one session (the newest when ``session_id`` is None)."""
    try:
        # One read transaction: the warden may commit (or apply retention) meanwhile.
        conn.execute("BEGIN")
        try:
            return _read_snapshot(conn, session_id)
        finally:
            conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"cannot read the store: {exc}") from None


def _read_snapshot(conn: sqlite3.Connection, session_id: int | None) -> Snapshot:
    if session_id is None:
        row = conn.execute(_NEWEST_FIRST).fetchone()
        if row is None:
            raise StoreEmpty("the store holds no session yet; run `celery-warden run` first")
    else:
        row = conn.execute(_BY_ID, (session_id,)).fetchone()
        if row is None:
            raise StoreEmpty(
                f"no session {session_id} in the store; `celery-warden report --list` shows them"
            )
    session = _session(row)
    # `report` opens the store read-only and never migrates it: a store an older warden
    # wrote lacks the later tables, and reads as if they were empty.
    tables = {
        name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    workers = tuple(
        WorkerInfo(*r)
        for r in conn.execute(
            "SELECT pid, start_ticks, nodename, pool, concurrency, max_tasks_per_child,"
            " max_memory_per_child_kb FROM workers WHERE session_id = ? ORDER BY pid",
            (session.id,),
        )
    )
    tasks, running = _read_tasks(conn, session.id)
    samples = _read_samples(conn, session.id)
    processes = []
    for r in conn.execute(
        "SELECT id, pid, start_ticks, ppid, role, started_at, cmdline, master_pid, ended_at,"
        " end_reason, exit_code FROM processes WHERE session_id = ? ORDER BY started_at, pid",
        (session.id,),
    ):
        info = ProcessInfo(
            pid=r[1],
            start_ticks=r[2],
            ppid=r[3],
            role=Role(r[4]),
            started_at=r[5],
            cmdline=r[6],
            master_pid=r[7],
        )
        processes.append(
            ProcessHistory(
                info=info,
                ended_at=r[8],
                end_reason=EndReason(r[9]) if r[9] else None,
                exit_code=r[10],
                samples=tuple(samples.get(r[0], ())),
                tasks=tuple(tasks.get((info.pid, info.start_ticks), ())),
            )
        )
    return Snapshot(
        session=session,
        workers=workers,
        processes=tuple(processes),
        running_tasks=running,
        diagnoses=_read_diagnoses(conn, session.id) if "diagnoses" in tables else (),
        incidents=_session_incidents(conn, session.id) if "incidents" in tables else (),
        signals=_read_signals(conn, session.id) if "signals" in tables else (),
    )


def _session_incidents(conn: sqlite3.Connection, session_id: int) -> tuple[Incident, ...]:
    query = SELECT_INCIDENTS + " WHERE session_id = ? ORDER BY t, id"
    return tuple(incident for _, incident in read_incidents(conn, query, (session_id,)))


def read_incidents(
    conn: sqlite3.Connection, query: str, params: tuple[Any, ...]
) -> list[tuple[int | None, Incident]]:
    """The incidents ``query`` (:data:`SELECT_INCIDENTS` and a filter) selects, each
    with its session.

    A row this version cannot read is skipped, and the skipped rows are counted in one
    warning: a newer celery-warden may add a kind or an outcome without a new schema
    version (so the store still opens here), and one such row must not cost the report
    or a restarted guard every other incident. There is no member to map it to that
    would not misstate what the guard did.
    """
    incidents = []
    skipped = 0
    for row in conn.execute(query, params):
        session_id, id_, kind, pid, ticks, master, t, reason, numbers, outcome, *rest = row
        dry_run, task_name, task_id, stack, ended_at, deadline = rest
        try:
            parsed = json.loads(numbers)
            if not isinstance(parsed, dict):
                raise ValueError("numbers is not a JSON object")
            incident = Incident(
                id=id_,
                kind=IncidentKind(kind),
                pid=pid,
                start_ticks=ticks,
                master_pid=master,
                t=t,
                reason=reason,
                numbers=parsed,
                outcome=Outcome(outcome),
                dry_run=bool(dry_run),
                task_name=task_name,
                task_id=task_id,
                stack=stack,
                ended_at=ended_at,
                deadline=deadline,
            )
        except ValueError:
            skipped += 1
            continue
        incidents.append((session_id, incident))
    if skipped:
        log.warning(
            "%d stored incidents were skipped: this celery-warden cannot read them "
            "(written by a newer version?)",
            skipped,
        )
    return incidents


def _read_signals(conn: sqlite3.Connection, session_id: int) -> tuple[SignalAudit, ...]:
    return tuple(
        SignalAudit(*row)
        for row in conn.execute(
            "SELECT t, pid, start_ticks, signal, result, incident_id, detail FROM signals"
            " WHERE session_id = ? ORDER BY t, id",
            (session_id,),
        )
    )


def _read_diagnoses(conn: sqlite3.Connection, session_id: int) -> tuple[DiagnosisRecord, ...]:
    records = []
    for pid, ticks, at, task_name, verdict, show_values, document in conn.execute(
        "SELECT pid, start_ticks, at, task_name, verdict, show_values, document"
        " FROM diagnoses WHERE session_id = ? ORDER BY at, id",
        (session_id,),
    ):
        try:
            parsed = json.loads(document)
            kind = Verdict(verdict)
        except ValueError:
            continue  # a row this version cannot read is skipped, not fatal
        if isinstance(parsed, dict):
            records.append(
                DiagnosisRecord(pid, ticks, at, task_name, kind, bool(show_values), parsed)
            )
    return tuple(records)


def _read_tasks(
    conn: sqlite3.Connection, session_id: int
) -> tuple[dict[tuple[int, int], list[TaskFinished]], tuple[TaskStarted, ...]]:
    finished: dict[tuple[int, int], list[TaskFinished]] = defaultdict(list)
    running = []
    for row in conn.execute(
        "SELECT pid, start_ticks, task_id, name, started_at, ended_at, wall_seconds, state,"
        " rss_after_bytes, cpu_seconds, uss_after_bytes, pss_after_bytes, py_blocks_delta,"
        " exception, retries FROM tasks WHERE session_id = ?"
        " ORDER BY COALESCE(ended_at, started_at)",
        (session_id,),
    ):
        pid, ticks, task_id, name, started, ended, wall, state, rss = row[:9]
        if ended is None:  # still running, or lost with its process
            running.append(TaskStarted(pid, ticks, task_id, name, started))
            continue
        finished[(pid, ticks)].append(
            TaskFinished(
                pid, ticks, task_id, name, ended, wall, TaskState(state), rss, started, *row[9:]
            )
        )
    return finished, tuple(running)


def _read_samples(conn: sqlite3.Connection, session_id: int) -> dict[int, list[Sample]]:
    identity = {
        row[0]: (row[1], row[2])
        for row in conn.execute(
            "SELECT id, pid, start_ticks FROM processes WHERE session_id = ?", (session_id,)
        )
    }
    by_process: dict[int, list[Sample]] = defaultdict(list)
    # In table order, then sorted per process in Python: an ORDER BY over the join
    # makes SQLite sort every row in a temporary B-tree (docs/benchmarks.md).
    for r in conn.execute(
        "SELECT process_id, t, COALESCE(state, ''), COALESCE(rss_bytes, 0),"
        " COALESCE(cpu_user_seconds, 0.0), COALESCE(cpu_system_seconds, 0.0),"
        " COALESCE(threads, 0), open_fds, uss_bytes, pss_bytes, swap_bytes, shared_bytes,"
        " rss_peak_bytes, missing FROM samples"
        # `+process_id`: no index for this filter, a plain scan is faster than
        # fetching every row through samples_by_process.
        " WHERE +process_id IN (SELECT id FROM processes WHERE session_id = ?)",
        (session_id,),
    ):
        pid, ticks = identity[r[0]]
        missing = tuple(r[13].split(",")) if r[13] else ()
        by_process[r[0]].append(Sample._make((pid, ticks, *r[1:13], missing)))
    for samples in by_process.values():
        samples.sort(key=_by_time)
    return by_process


def _by_time(sample: Sample) -> float:
    return sample.t
