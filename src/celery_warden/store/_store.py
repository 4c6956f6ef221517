"""The SQLite store: opening it safely, writing records, applying retention.

WAL mode lets ``report`` read while the warden writes, and survives ``kill -9`` mid
transaction (RELIABILITY.md, point 10). Only one thread writes (the session's writer
thread); every batch is one transaction, so a reader never sees half a sweep.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from celery_warden._config import Retention
from celery_warden._records import (
    DiagnosisRecord,
    Incident,
    ProcessEnd,
    ProcessInfo,
    Sample,
    SignalAudit,
    TaskFinished,
    TaskStarted,
    WorkerInfo,
)
from celery_warden.exceptions import (
    StoreEmpty,
    StoreError,
    StoreNotADatabase,
    StoreNotWritable,
    StoreTooNew,
)
from celery_warden.store._read import SELECT_INCIDENTS, read_incidents
from celery_warden.store._schema import MIGRATIONS, SCHEMA_VERSION

__all__ = ["Record", "Store"]

Record = (
    ProcessInfo
    | Sample
    | ProcessEnd
    | WorkerInfo
    | TaskStarted
    | TaskFinished
    | Incident
    | SignalAudit
)

MAX_DIAGNOSES = 1000  # kept in all, the newest
_BUSY_TIMEOUT_MS = 1000  # no write may hold the sampler's pipeline longer than this

_AGGREGATE = (
    "INSERT INTO samples (process_id, t, resolution_seconds, rss_bytes, rss_peak_bytes,"
    " cpu_user_seconds, cpu_system_seconds, threads, open_fds, uss_bytes, pss_bytes,"
    " swap_bytes, shared_bytes)"
    " SELECT process_id, max(t), ?, CAST(avg(rss_bytes) AS INTEGER),"
    " max(COALESCE(rss_peak_bytes, rss_bytes)), max(cpu_user_seconds),"
    " max(cpu_system_seconds), max(threads), max(open_fds),"
    " CAST(avg(uss_bytes) AS INTEGER), CAST(avg(pss_bytes) AS INTEGER),"
    " CAST(avg(swap_bytes) AS INTEGER), CAST(avg(shared_bytes) AS INTEGER)"
    " FROM samples WHERE "
)
_GROUP = " AND t < ? GROUP BY process_id, CAST(t / ? AS INTEGER)"
# Bucket width -> (aggregate, delete) for the finer rows older than the cutoff. The
# resolutions are listed (IN), not compared (<=), so SQLite seeks samples_by_age for
# each one instead of scanning and sorting the whole table (docs/benchmarks.md).
_DOWNSAMPLE = {
    60: (
        _AGGREGATE + "resolution_seconds IN (0)" + _GROUP,
        "DELETE FROM samples WHERE resolution_seconds IN (0) AND t < ?",
    ),
    900: (
        _AGGREGATE + "resolution_seconds IN (0, 60)" + _GROUP,
        "DELETE FROM samples WHERE resolution_seconds IN (0, 60) AND t < ?",
    ),
}


def _numbers_json(numbers: dict[str, float | int | str | None]) -> str:
    """The measurements as JSON. NaN and infinity are not JSON, and a decision must
    never go unrecorded over a ratio that divided by zero, so they are kept as their
    text: ``"nan"``, ``"inf"``."""
    finite = {
        key: str(value) if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in numbers.items()
    }
    return json.dumps(finite, separators=(",", ":"), allow_nan=False)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class Store:
    """An open store. Use :meth:`open`; close it when done.

    >>> import tempfile, pathlib
    >>> store = Store.open(pathlib.Path(tempfile.mkdtemp()) / "w.db")
    >>> store.begin_session("run", "celery -A proj worker", 1.0) >= 1
    True
    >>> store.close()
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        # (session, pid, start_ticks) -> processes.id, for the processes alive now.
        self._process_ids: dict[tuple[int, int, int], int] = {}
        self._staged: dict[tuple[int, int, int], int] = {}

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> Store:
        """Open (and for writing, create or migrate) the store at ``path``.

        Raises a :class:`StoreError` naming the path and what to do; the file is not
        changed before its schema version has been checked.
        """
        path = Path(path)
        if readonly:
            if not path.exists():
                raise StoreEmpty(
                    f"no store at {path}; record something first with "
                    "`celery-warden run -- celery -A proj worker` or `celery-warden demo`"
                )
            # as_uri() escapes what a URI would misread in a path (`#`, `%`, `?`).
            conn = cls._connect(f"{path.resolve().as_uri()}?mode=ro", path, uri=True)
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreNotWritable(
                    f"cannot create the store's directory {path.parent}: {exc.strerror}; "
                    "pass --store with a writable path"
                ) from None
            if not os.access(path.parent, os.W_OK):
                raise StoreNotWritable(
                    f"the store's directory {path.parent} is not writable; "
                    "pass --store with a writable path"
                )
            if path.exists() and not os.access(path, os.W_OK):
                raise StoreNotWritable(
                    f"the store {path} is read-only; pass --store with a writable path"
                )
            conn = cls._connect(str(path), path, uri=False)
        store = cls(conn, path)
        try:
            store._check_and_migrate(readonly=readonly)
        except BaseException:
            conn.close()
            raise
        return store

    @staticmethod
    def _connect(target: str, path: Path, *, uri: bool) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                target, uri=uri, timeout=_BUSY_TIMEOUT_MS / 1000, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreNotWritable(f"cannot open the store {path}: {exc}") from None
        conn.isolation_level = None  # explicit BEGIN/COMMIT below
        return conn

    def _check_and_migrate(self, *, readonly: bool) -> None:
        try:
            # One read transaction, so that the version and the tables are seen at the
            # same moment even while another warden is creating the schema.
            self._conn.execute("BEGIN")
            try:
                version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
                # user_version reads the header only; make SQLite parse the schema too.
                tables = int(self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])
            finally:
                self._conn.execute("ROLLBACK")
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc) or "malformed" in str(exc):
                raise StoreNotADatabase(
                    f"{self.path} is not a celery-warden store (not an SQLite database); "
                    "pass --store with another path"
                ) from None
            raise StoreError(f"cannot read the store {self.path}: {exc}") from None
        if version > SCHEMA_VERSION:
            raise StoreTooNew(
                f"the store {self.path} has schema version {version}, newer than this "
                f"celery-warden understands ({SCHEMA_VERSION}); upgrade celery-warden"
            )
        if version == 0 and not readonly and tables:
            raise StoreNotADatabase(
                f"{self.path} is an SQLite database of something else; "
                "pass --store with another path"
            )
        if readonly:
            if version == 0:
                raise StoreEmpty(f"the store {self.path} holds nothing yet")
            return
        try:
            self._conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            self._switch_to_wal()
            self._conn.execute("PRAGMA synchronous=NORMAL")
            # Taking the write lock first proves the file is writable, and makes two
            # wardens opening a new store at once migrate it once: the second re-reads
            # the version under the lock and finds nothing to do.
            with self._transaction():
                version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
                for statements in MIGRATIONS[version:]:
                    for statement in statements:
                        self._conn.execute(statement)
                if version < SCHEMA_VERSION:
                    self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.OperationalError as exc:
            if "readonly" in str(exc) or "read-only" in str(exc):
                raise StoreNotWritable(
                    f"the store {self.path} is read-only; pass --store with a writable path"
                ) from None
            raise StoreError(f"cannot prepare the store {self.path}: {exc}") from None

    def _switch_to_wal(self) -> None:
        # Changing the journal mode needs the database to itself and SQLite answers
        # "locked" at once rather than waiting, so two wardens opening a new store
        # together retry for up to a second.
        for attempt in range(20):
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 19:
                    raise
                time.sleep(0.05)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @property
    def connection(self) -> sqlite3.Connection:
        """The underlying connection, for the reader."""
        return self._conn

    def close(self) -> None:
        """Close the connection (checkpointing the WAL when it is the last one)."""
        self._conn.close()

    # -- sessions --------------------------------------------------------------------

    def begin_session(self, mode: str, command: str, interval_seconds: float) -> int:
        """Record the start of a warden run and return its id."""
        try:
            return self._insert_session(mode, command, interval_seconds)
        except sqlite3.OperationalError as exc:
            raise StoreNotWritable(
                f"cannot write the store {self.path} ({exc}); pass --store with a writable path"
            ) from None

    def _insert_session(self, mode: str, command: str, interval_seconds: float) -> int:
        with self._transaction():
            cursor = self._conn.execute(
                "INSERT INTO sessions (mode, command, hostname, boot_id, warden_pid,"
                " interval_seconds, started_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    mode,
                    command,
                    socket.gethostname(),
                    _boot_id(),
                    os.getpid(),
                    interval_seconds,
                    time.time(),
                ),
            )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def end_session(self, session_id: int, exit_code: int | None, probe_dropped: int) -> None:
        """Record the end of a warden run. A session that saw no process at all (its
        command never started a worker) is dropped rather than kept as an empty row
        that `report` would show instead of the last real one."""
        now = time.time()
        with self._transaction():
            # A guard's decision keeps its session even without a process to show.
            seen = self._conn.execute(
                "SELECT 1 FROM processes WHERE session_id = ?1"
                " UNION ALL SELECT 1 FROM incidents WHERE session_id = ?1 LIMIT 1",
                (session_id,),
            ).fetchone()
            if seen is None:
                self._conn.execute("DELETE FROM workers WHERE session_id = ?", (session_id,))
                self._conn.execute("DELETE FROM tasks WHERE session_id = ?", (session_id,))
                self._conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
                return
            self._conn.execute(
                "UPDATE sessions SET ended_at = ?, exit_code = ?, probe_dropped = ? WHERE id = ?",
                (now, exit_code, probe_dropped, session_id),
            )
            self._conn.execute(
                "UPDATE tasks SET state = 'lost' WHERE session_id = ? AND state = 'started'"
                " AND EXISTS (SELECT 1 FROM processes p WHERE p.session_id = tasks.session_id"
                " AND p.pid = tasks.pid AND p.start_ticks = tasks.start_ticks"
                " AND p.ended_at IS NOT NULL)",
                (session_id,),
            )

    # -- writing ---------------------------------------------------------------------

    def write(self, session_id: int, records: Iterable[Record]) -> None:
        """Write a batch of records in one transaction."""
        self._staged.clear()
        with self._transaction():
            for record in records:
                self._write_one(session_id, record)
        # Only ids that were committed may be remembered: a rolled-back insert's rowid
        # is handed to the next process.
        self._process_ids.update(self._staged)

    def _process_id(self, key: tuple[int, int, int]) -> int | None:
        found = self._staged.get(key) or self._process_ids.get(key)
        if found is None:
            row = self._conn.execute(
                "SELECT id FROM processes WHERE session_id = ? AND pid = ? AND start_ticks = ?",
                key,
            ).fetchone()
            if row is not None:
                found = self._staged[key] = int(row[0])
        return found

    def _write_one(self, session_id: int, record: Record) -> None:
        if isinstance(record, Sample):
            process_id = self._process_id((session_id, record.pid, record.start_ticks))
            if process_id is None:
                return  # a process never announced: nothing to attach the sample to
            self._conn.execute(
                "INSERT INTO samples (process_id, t, state, rss_bytes, rss_peak_bytes,"
                " cpu_user_seconds, cpu_system_seconds, threads, open_fds, uss_bytes, pss_bytes,"
                " swap_bytes, shared_bytes, missing)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    process_id,
                    record.t,
                    record.state,
                    record.rss_bytes,
                    record.rss_peak_bytes,
                    record.cpu_user_seconds,
                    record.cpu_system_seconds,
                    record.threads,
                    record.open_fds,
                    record.uss_bytes,
                    record.pss_bytes,
                    record.swap_bytes,
                    record.shared_bytes,
                    ",".join(record.missing) or None,
                ),
            )
        elif isinstance(record, TaskFinished):
            self._conn.execute(
                "INSERT INTO tasks (session_id, pid, start_ticks, task_id, name, started_at,"
                " ended_at, wall_seconds, state, rss_after_bytes, cpu_seconds, uss_after_bytes,"
                " pss_after_bytes, py_blocks_delta, exception, retries)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (session_id, pid, start_ticks, task_id, started_at) DO UPDATE"
                " SET ended_at = excluded.ended_at, wall_seconds = excluded.wall_seconds,"
                " state = excluded.state, rss_after_bytes = excluded.rss_after_bytes,"
                " cpu_seconds = excluded.cpu_seconds, uss_after_bytes = excluded.uss_after_bytes,"
                " pss_after_bytes = excluded.pss_after_bytes,"
                " py_blocks_delta = excluded.py_blocks_delta, exception = excluded.exception,"
                " retries = excluded.retries",
                (
                    session_id,
                    record.pid,
                    record.start_ticks,
                    record.task_id,
                    record.name,
                    record.started_at
                    if record.started_at is not None
                    else record.t - record.wall_seconds,
                    record.t,
                    record.wall_seconds,
                    str(record.state),
                    record.rss_after_bytes,
                    record.cpu_seconds,
                    record.uss_after_bytes,
                    record.pss_after_bytes,
                    record.py_blocks_delta,
                    record.exception,
                    record.retries,
                ),
            )
        elif isinstance(record, TaskStarted):
            self._conn.execute(
                "INSERT OR IGNORE INTO tasks (session_id, pid, start_ticks, task_id, name,"
                " started_at, state) VALUES (?, ?, ?, ?, ?, ?, 'started')",
                (session_id, record.pid, record.start_ticks, record.task_id, record.name, record.t),
            )
        elif isinstance(record, ProcessInfo):
            self._conn.execute(
                "INSERT INTO processes (session_id, pid, start_ticks, ppid, master_pid,"
                " role, cmdline, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                # Seen again after an exec: the command line and the role change.
                " ON CONFLICT (session_id, pid, start_ticks) DO UPDATE"
                " SET role = excluded.role, cmdline = excluded.cmdline"
                " WHERE excluded.cmdline != ''",
                (
                    session_id,
                    record.pid,
                    record.start_ticks,
                    record.ppid,
                    record.master_pid,
                    str(record.role),
                    record.cmdline,
                    record.started_at,
                ),
            )
            row = self._conn.execute(
                "SELECT id FROM processes WHERE session_id = ? AND pid = ? AND start_ticks = ?",
                (session_id, record.pid, record.start_ticks),
            ).fetchone()
            self._staged[(session_id, record.pid, record.start_ticks)] = int(row[0])
        elif isinstance(record, ProcessEnd):
            self._process_ids.pop((session_id, record.pid, record.start_ticks), None)
            # The probe's word (an exit code, a recycle) beats the sampler's "gone", in
            # whichever order the two arrive.
            self._conn.execute(
                "UPDATE processes SET ended_at = COALESCE(ended_at, ?),"
                " end_reason = CASE WHEN end_reason IS NULL OR end_reason IN ('gone', 'unknown')"
                " THEN ? ELSE end_reason END, exit_code = COALESCE(?, exit_code)"
                " WHERE session_id = ? AND pid = ? AND start_ticks = ?",
                (
                    record.t,
                    str(record.reason),
                    record.exit_code,
                    session_id,
                    record.pid,
                    record.start_ticks,
                ),
            )
            self._conn.execute(
                "UPDATE tasks SET state = 'lost' WHERE session_id = ? AND pid = ?"
                " AND start_ticks = ? AND state = 'started'",
                (session_id, record.pid, record.start_ticks),
            )
        elif isinstance(record, Incident):
            self._upsert_incident(session_id, record)
        elif isinstance(record, SignalAudit):
            self._insert_signal(session_id, record)
        else:  # WorkerInfo
            self._conn.execute(
                "INSERT OR REPLACE INTO workers (session_id, pid, start_ticks, nodename, pool,"
                " concurrency, max_tasks_per_child, max_memory_per_child_kb)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    session_id,
                    record.pid,
                    record.start_ticks,
                    record.nodename,
                    record.pool,
                    record.concurrency,
                    record.max_tasks_per_child,
                    record.max_memory_per_child_kb,
                ),
            )

    # -- the guard -------------------------------------------------------------------

    def save_incident(self, session_id: int | None, incident: Incident) -> None:
        """Store an incident, replacing the earlier version with its id, committed
        before returning.

        The guard saves an incident before it sends any signal, so that a warden killed
        mid-escalation leaves behind what it was doing and why. The commit is WAL's with
        ``synchronous=NORMAL``: it survives the warden's death (even ``kill -9``); only
        a power loss can undo it, and that takes the target process with it. Raises
        :class:`sqlite3.Error` when it could not be stored (the store busy past its
        timeout, the disk full): then nothing durable records what is about to happen.
        """
        with self._transaction():
            self._upsert_incident(session_id, incident)

    def add_signal(self, session_id: int | None, audit: SignalAudit) -> None:
        """Store one signal sent, refused or dry-run, committed before returning."""
        with self._transaction():
            self._insert_signal(session_id, audit)

    def pending_incidents(self) -> list[tuple[int | None, Incident]]:
        """Every incident still pending, in any session, oldest first, with its session:
        a warden restarted mid-escalation resumes them (the KILL a deadline promised).
        Rows this version cannot read are skipped, with a warning."""
        return read_incidents(
            self._conn, SELECT_INCIDENTS + " WHERE outcome = 'pending' ORDER BY t, id", ()
        )

    def _upsert_incident(self, session_id: int | None, i: Incident) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO incidents (id, session_id, kind, pid, start_ticks,"
            " master_pid, t, reason, numbers, outcome, dry_run, task_name, task_id, stack,"
            " ended_at, deadline) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                i.id,
                session_id,
                str(i.kind),
                i.pid,
                i.start_ticks,
                i.master_pid,
                i.t,
                i.reason,
                _numbers_json(i.numbers),
                str(i.outcome),
                int(i.dry_run),
                i.task_name,
                i.task_id,
                i.stack,
                i.ended_at,
                i.deadline,
            ),
        )

    def _insert_signal(self, session_id: int | None, a: SignalAudit) -> None:
        self._conn.execute(
            "INSERT INTO signals (session_id, t, pid, start_ticks, signal, result,"
            " incident_id, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (session_id, a.t, a.pid, a.start_ticks, a.signal, a.result, a.incident_id, a.detail),
        )

    # -- diagnoses -------------------------------------------------------------------

    def session_of(self, pid: int, start_ticks: int) -> int | None:
        """The newest recorded session that watched this very process, if any."""
        row = self._conn.execute(
            "SELECT session_id FROM processes WHERE pid = ? AND start_ticks = ?"
            " ORDER BY session_id DESC LIMIT 1",
            (pid, start_ticks),
        ).fetchone()
        return None if row is None else int(row[0])

    def add_diagnosis(self, record: DiagnosisRecord) -> int:
        """Store what ``diagnose`` found; its id."""
        document = json.dumps(record.document, separators=(",", ":"), allow_nan=False)
        with self._transaction():
            cursor = self._conn.execute(
                "INSERT INTO diagnoses (session_id, pid, start_ticks, at, task_name, verdict,"
                " show_values, document) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.session_of(record.pid, record.start_ticks),
                    record.pid,
                    record.start_ticks,
                    record.at,
                    record.task_name,
                    record.verdict.value,
                    int(record.show_values),
                    document,
                ),
            )
        return int(cursor.lastrowid or 0)

    # -- retention -------------------------------------------------------------------

    def apply_retention(self, now: float, retention: Retention) -> None:
        """Downsample old samples and drop what is past retention (docs/store.md)."""
        with self._transaction():
            self._downsample(60, now - retention.raw_seconds)
            self._downsample(900, now - retention.minute_seconds)
            self._conn.execute(
                "DELETE FROM samples WHERE resolution_seconds IN (0, 60, 900) AND t < ?",
                (now - retention.quarter_seconds,),
            )
            self._conn.execute(
                "DELETE FROM tasks WHERE started_at < ?", (now - retention.task_seconds,)
            )
            self._conn.execute(
                "DELETE FROM tasks WHERE id <= (SELECT max(id) - ? FROM tasks)",
                (retention.max_task_rows,),
            )
            # The guard's record lasts as long as the tasks it acted on, except what is
            # still pending: a restarted warden must find it to finish the escalation.
            self._conn.execute(
                "DELETE FROM incidents WHERE t < ? AND outcome != 'pending'",
                (now - retention.task_seconds,),
            )
            self._conn.execute("DELETE FROM signals WHERE t < ?", (now - retention.task_seconds,))
            # Lives and sessions go once nothing refers to them any more.
            cutoff = now - retention.quarter_seconds
            self._conn.execute("DELETE FROM diagnoses WHERE at < ?", (cutoff,))
            self._conn.execute(
                "DELETE FROM diagnoses WHERE id <= (SELECT max(id) - ? FROM diagnoses)",
                (MAX_DIAGNOSES,),
            )
            self._conn.execute(
                "DELETE FROM processes WHERE ended_at < ?"
                " AND NOT EXISTS (SELECT 1 FROM samples s WHERE s.process_id = processes.id)"
                " AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.session_id = processes.session_id"
                " AND t.pid = processes.pid AND t.start_ticks = processes.start_ticks)",
                (cutoff,),
            )
            self._conn.execute(
                "DELETE FROM workers WHERE session_id IN (SELECT id FROM sessions"
                " WHERE ended_at < ? AND NOT EXISTS (SELECT 1 FROM processes p"
                " WHERE p.session_id = sessions.id))",
                (cutoff,),
            )
            self._conn.execute(
                "DELETE FROM sessions WHERE ended_at < ? AND NOT EXISTS"
                " (SELECT 1 FROM processes p WHERE p.session_id = sessions.id) AND NOT EXISTS"
                " (SELECT 1 FROM diagnoses d WHERE d.session_id = sessions.id) AND NOT EXISTS"
                " (SELECT 1 FROM incidents i WHERE i.session_id = sessions.id) AND NOT EXISTS"
                " (SELECT 1 FROM signals g WHERE g.session_id = sessions.id)",
                (cutoff,),
            )

    def _downsample(self, width: int, cutoff: float) -> None:
        cutoff = (cutoff // width) * width  # whole buckets only
        insert, delete = _DOWNSAMPLE[width]
        self._conn.execute(insert, (width, cutoff, width))
        self._conn.execute(delete, (cutoff,))
