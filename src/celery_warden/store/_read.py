"""Reading a session back out of the store, as records for analysis.

Reads go through their own read-only connection: WAL lets them run while the warden
writes, and they never take a write lock, so ``report`` cannot stall the sampler.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict

from celery_warden._records import (
    EndReason,
    ProcessHistory,
    ProcessInfo,
    Role,
    Sample,
    SessionInfo,
    Snapshot,
    TaskFinished,
    TaskStarted,
    TaskState,
    WorkerInfo,
)
from celery_warden.exceptions import StoreEmpty, StoreError

__all__ = ["list_sessions", "read_snapshot"]

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
        session=session, workers=workers, processes=tuple(processes), running_tasks=running
    )


def _read_tasks(
    conn: sqlite3.Connection, session_id: int
) -> tuple[dict[tuple[int, int], list[TaskFinished]], tuple[TaskStarted, ...]]:
    finished: dict[tuple[int, int], list[TaskFinished]] = defaultdict(list)
    running = []
    for pid, ticks, task_id, name, started, ended, wall, state, rss in conn.execute(
        "SELECT pid, start_ticks, task_id, name, started_at, ended_at, wall_seconds, state,"
        " rss_after_bytes FROM tasks WHERE session_id = ? ORDER BY COALESCE(ended_at, started_at)",
        (session_id,),
    ):
        if ended is None:  # still running, or lost with its process
            running.append(TaskStarted(pid, ticks, task_id, name, started))
            continue
        finished[(pid, ticks)].append(
            TaskFinished(pid, ticks, task_id, name, ended, wall, TaskState(state), rss, started)
        )
    return finished, tuple(running)


def _read_samples(conn: sqlite3.Connection, session_id: int) -> dict[int, list[Sample]]:
    by_process: dict[int, list[Sample]] = defaultdict(list)
    for r in conn.execute(
        "SELECT s.process_id, p.pid, p.start_ticks, s.t, s.state, s.rss_bytes,"
        " s.cpu_user_seconds, s.cpu_system_seconds, s.threads, s.open_fds, s.uss_bytes,"
        " s.pss_bytes, s.swap_bytes, s.shared_bytes, s.missing, s.rss_peak_bytes"
        " FROM samples s JOIN processes p ON p.id = s.process_id"
        " WHERE p.session_id = ? ORDER BY s.process_id, s.t",
        (session_id,),
    ):
        by_process[r[0]].append(
            Sample(
                pid=r[1],
                start_ticks=r[2],
                t=r[3],
                state=r[4] or "",
                rss_bytes=r[5] or 0,
                cpu_user_seconds=r[6] or 0.0,
                cpu_system_seconds=r[7] or 0.0,
                threads=r[8] or 0,
                open_fds=r[9],
                uss_bytes=r[10],
                pss_bytes=r[11],
                swap_bytes=r[12],
                shared_bytes=r[13],
                missing=tuple(r[14].split(",")) if r[14] else (),
                rss_peak_bytes=r[15],
            )
        )
    return by_process
