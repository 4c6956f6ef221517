"""The guard's record in the store: incidents (upserted by id) and the signal audit."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from celery_warden._config import Retention
from celery_warden._records import (
    Incident,
    IncidentKind,
    Outcome,
    ProcessInfo,
    Role,
    SignalAudit,
    TaskFinished,
    TaskState,
)
from celery_warden.store import SCHEMA_VERSION, Store, read_snapshot
from celery_warden.store._schema import MIGRATIONS

CHILD = ProcessInfo(11, 101, 10, Role.CHILD, 1000.0, "celery -A proj worker", 10)
DAY = 86400.0


BASE = Incident(
    id="inc-1",
    kind=IncidentKind.MEMORY_HARD,
    pid=11,
    start_ticks=101,
    master_pid=10,
    t=1010.0,
    reason="USS 1.2 GiB over the hard limit of 1 GiB",
    numbers={"uss_bytes": 1_288_490_188, "limit_bytes": 1 << 30, "ratio": 1.2},
    outcome=Outcome.PENDING,
    task_name="proj.crunch",
    task_id="t-1",
    stack='File "/app/proj.py", line 7, in crunch\n    rows.append(row)',
    deadline=1020.0,
)


def _incident(
    id_: str = "inc-1", t: float = 1010.0, outcome: Outcome = Outcome.PENDING, **changes: Any
) -> Incident:
    return dataclasses.replace(BASE, id=id_, t=t, outcome=outcome, deadline=t + 10.0, **changes)


def _store(tmp_path: Path) -> tuple[Store, int]:
    store = Store.open(tmp_path / "warden.db")
    session = store.begin_session("run", "celery -A proj worker", 1.0)
    store.write(session, [CHILD])
    return store, session


def test_incidents_and_signals_round_trip_into_the_snapshot(tmp_path: Path) -> None:
    """Both read back as written, by time, enums as enums and the numbers as a dict;
    a non-finite number is kept as its text instead of failing the save."""
    # GIVEN a session with two incidents saved out of order and two signals
    store, session = _store(tmp_path)
    later = _incident("inc-2", t=1020.0, outcome=Outcome.KILLED, ended_at=1031.0)
    first = _incident(numbers={"count": 3, "ratio": float("inf"), "note": "x", "gone": None})
    store.save_incident(session, later)
    store.save_incident(session, first)
    term = SignalAudit(1020.5, 11, 101, "SIGTERM", "sent", "inc-2", "hard limit")
    kill = SignalAudit(1030.5, 11, 101, "SIGKILL", "sent", "inc-2")
    store.add_signal(session, kill)
    store.add_signal(session, term)
    # WHEN the session is read back
    snapshot = read_snapshot(store.connection, session)
    store.close()
    # THEN everything is there, ordered by time
    assert snapshot.incidents == (
        _incident(numbers={"count": 3, "ratio": "inf", "note": "x", "gone": None}),
        later,
    )
    assert isinstance(snapshot.incidents[1].kind, IncidentKind)
    assert snapshot.incidents[1].outcome is Outcome.KILLED
    assert snapshot.signals == (term, kill)


def test_a_saved_incident_is_committed_when_the_call_returns(tmp_path: Path) -> None:
    """Another connection (a reader, a restarted warden) sees it at once: the guard
    relies on that before it sends any signal."""
    store, session = _store(tmp_path)
    store.save_incident(session, _incident())
    other = Store.open(tmp_path / "warden.db", readonly=True)
    assert other.connection.execute("SELECT id, outcome FROM incidents").fetchall() == [
        ("inc-1", "pending")
    ]
    other.close()
    store.close()


def test_saving_an_incident_again_replaces_it(tmp_path: Path) -> None:
    """An incident written when decided and again with its outcome is one row, the
    last version; it is no longer pending."""
    store, session = _store(tmp_path)
    pending = _incident()
    store.save_incident(session, pending)
    assert [i.id for _, i in store.pending_incidents()] == ["inc-1"]
    done = dataclasses.replace(pending, outcome=Outcome.TERMINATED, ended_at=1012.0, deadline=None)
    store.save_incident(session, done)
    assert read_snapshot(store.connection, session).incidents == (done,)
    assert store.pending_incidents() == []
    store.close()


def test_pending_incidents_come_from_every_session_with_their_session(tmp_path: Path) -> None:
    """A restarted warden finds what is pending anywhere, the guard's own (no session)
    included, oldest first."""
    store, session = _store(tmp_path)
    other = store.begin_session("watch", "", 1.0)
    store.save_incident(other, _incident("b", t=1005.0))
    store.save_incident(None, _incident("c", t=1001.0))
    store.save_incident(session, _incident("a", t=1009.0, outcome=Outcome.RECYCLED))
    pending = [(s, i.id) for s, i in store.pending_incidents()]
    store.close()
    assert pending == [(None, "c"), (other, "b")]


def test_the_writer_queue_takes_incidents_and_signals(tmp_path: Path) -> None:
    """`write` accepts them among the sampler's records, in one transaction."""
    store, session = _store(tmp_path)
    audit = SignalAudit(1011.0, 11, 101, "SIGTERM", "dry-run", "inc-1")
    dry = _incident(outcome=Outcome.DRY_RUN, dry_run=True)
    store.write(session, [dry, audit])
    snapshot = read_snapshot(store.connection, session)
    store.close()
    assert (snapshot.incidents, snapshot.signals) == ((dry,), (audit,))


def test_retention_drops_old_incidents_but_never_pending_ones(tmp_path: Path) -> None:
    """Incidents and signals go with the task rows, except what is still pending, and
    a session a pending incident belongs to stays."""
    # GIVEN an ended session with an old finished incident, an old pending one and a signal
    store = Store.open(tmp_path / "warden.db")
    session = store.begin_session("run", "x", 1.0)
    store.save_incident(session, _incident("done", outcome=Outcome.KILLED))
    store.save_incident(session, _incident("stuck"))
    store.add_signal(session, SignalAudit(1011.0, 11, 101, "SIGTERM", "sent", "done"))
    store.end_session(session, 0, 0)
    # WHEN retention runs long after everything else has expired
    store.apply_retention(1010.0 + 365 * DAY, Retention())
    # THEN only the pending incident and its session are left
    assert [i.id for _, i in store.pending_incidents()] == ["stuck"]
    assert store.connection.execute("SELECT id FROM incidents").fetchall() == [("stuck",)]
    assert store.connection.execute("SELECT count(*) FROM signals").fetchone() == (0,)
    assert store.connection.execute("SELECT id FROM sessions").fetchall() == [(session,)]
    store.close()


def test_retention_keeps_incidents_as_long_as_task_rows(tmp_path: Path) -> None:
    """Within task retention, finished incidents and signals stay."""
    store, session = _store(tmp_path)
    store.save_incident(session, _incident(outcome=Outcome.KILLED))
    store.add_signal(session, SignalAudit(1011.0, 11, 101, "SIGKILL", "sent", "inc-1"))
    store.apply_retention(1010.0 + 6 * DAY, Retention(task_seconds=7 * DAY))
    snapshot = read_snapshot(store.connection, session)
    store.close()
    assert (len(snapshot.incidents), len(snapshot.signals)) == (1, 1)


def _version_3_store(path: Path) -> None:
    conn = sqlite3.connect(path)
    for statements in MIGRATIONS[:3]:
        for statement in statements:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 3")
    conn.execute(
        "INSERT INTO sessions (id, mode, command, hostname, boot_id, warden_pid,"
        " interval_seconds, started_at) VALUES (1, 'run', 'c', 'h', 'b', 1, 1.0, 1000.0)"
    )
    conn.execute(
        "INSERT INTO processes (session_id, pid, start_ticks, ppid, master_pid, role,"
        " cmdline, started_at) VALUES (1, 11, 101, 10, 10, 'child', 'celery worker', 1000.0)"
    )
    conn.execute(
        "INSERT INTO tasks (session_id, pid, start_ticks, task_id, name, started_at,"
        " ended_at, wall_seconds, state, rss_after_bytes, cpu_seconds)"
        " VALUES (1, 11, 101, 'id', 'proj.add', 1001.0, 1001.5, 0.5, 'success', 4096, 0.25)"
    )
    conn.execute(
        "INSERT INTO diagnoses (session_id, pid, start_ticks, at, verdict, document)"
        " VALUES (1, 11, 101, 1002.0, 'leak', '{\"verdict\": \"leak\"}')"
    )
    conn.commit()
    conn.close()


def test_a_version_3_store_is_migrated_with_its_data_intact(tmp_path: Path) -> None:
    """A store the previous release wrote gains the guard's tables; its session, call
    and diagnosis read back as before, and incidents can be saved into it."""
    # GIVEN a version 3 store with history
    path = tmp_path / "v3.db"
    _version_3_store(path)
    # WHEN this release opens it for writing
    store = Store.open(path)
    # THEN it is at the current version with its rows intact
    assert store.connection.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    snapshot = read_snapshot(store.connection, 1)
    (process,) = snapshot.processes
    assert process.tasks == (
        TaskFinished(11, 101, "id", "proj.add", 1001.5, 0.5, TaskState.SUCCESS, 4096, 1001.0, 0.25),
    )
    assert [d.document for d in snapshot.diagnoses] == [{"verdict": "leak"}]
    assert (snapshot.incidents, snapshot.signals) == ((), ())
    # AND the guard can write into it
    store.save_incident(1, _incident())
    assert [i.id for i in read_snapshot(store.connection, 1).incidents] == ["inc-1"]
    store.close()


def test_a_version_3_store_read_without_migrating_has_no_incidents(tmp_path: Path) -> None:
    """`report` opens the store read-only and never migrates it: an older store reads
    with no incidents and no signals rather than failing."""
    path = tmp_path / "v3.db"
    _version_3_store(path)
    store = Store.open(path, readonly=True)
    snapshot = read_snapshot(store.connection, 1)
    store.close()
    assert len(snapshot.processes) == 1
    assert (snapshot.incidents, snapshot.signals) == ((), ())


def test_an_incident_this_version_cannot_read_is_skipped_with_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A kind or outcome a newer release added (or numbers that are not an object)
    skips that row only, counted in one warning; the rest read."""
    # GIVEN one readable incident and three rows from a newer writer
    store, session = _store(tmp_path)
    store.save_incident(session, _incident("ok"))
    for id_, kind, outcome, numbers in (
        ("new-kind", "from-the-future", "pending", "{}"),
        ("new-outcome", "hang", "teleported", "{}"),
        ("odd-numbers", "hang", "pending", "[1, 2]"),
    ):
        store.connection.execute(
            "INSERT INTO incidents (id, session_id, kind, pid, start_ticks, t, reason,"
            " numbers, outcome) VALUES (?, ?, ?, 11, 101, 1000.0, 'r', ?, ?)",
            (id_, session, kind, numbers, outcome),
        )
    # WHEN the session and the pending incidents are read
    with caplog.at_level(logging.WARNING, logger="celery_warden"):
        incidents = read_snapshot(store.connection, session).incidents
        pending = store.pending_incidents()
    store.close()
    # THEN the readable one comes back each time and the others are counted
    assert [i.id for i in incidents] == ["ok"]
    assert [i.id for _, i in pending] == ["ok"]
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped[0].startswith("3 stored incidents were skipped")
    assert skipped[1].startswith("2 stored incidents were skipped")  # only pending rows


def test_a_session_with_an_incident_but_no_process_is_kept(tmp_path: Path) -> None:
    """A session is dropped at its end when it saw nothing, not when the guard decided
    something in it."""
    store = Store.open(tmp_path / "warden.db")
    session = store.begin_session("watch", "", 1.0)
    store.save_incident(session, _incident(kind=IncidentKind.CONFIG, outcome=Outcome.REPORTED))
    store.end_session(session, 0, 0)
    assert store.connection.execute("SELECT id FROM sessions").fetchall() == [(session,)]
    store.close()
