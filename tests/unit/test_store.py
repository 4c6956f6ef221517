"""The store: opening safely, migrations, writes, retention."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from celery_warden._config import Retention
from celery_warden._records import (
    EndReason,
    ProcessEnd,
    ProcessInfo,
    Role,
    Sample,
    TaskFinished,
    TaskStarted,
    TaskState,
)
from celery_warden.exceptions import StoreEmpty, StoreNotADatabase, StoreTooNew
from celery_warden.store import SCHEMA_VERSION, Store, read_snapshot

MASTER = ProcessInfo(10, 100, 1, Role.MASTER, 1000.0, "celery -A proj worker", 10)
CHILD = ProcessInfo(11, 101, 10, Role.CHILD, 1000.5, "celery -A proj worker", 10)


def _sample(info: ProcessInfo, t: float, rss: int = 50_000_000) -> Sample:
    return Sample(info.pid, info.start_ticks, t, "sleeping", rss, 1.0, 0.5, 3, open_fds=9)


def test_a_new_store_gets_the_current_schema_in_wal_mode(tmp_path: Path) -> None:
    """Opening a path that does not exist creates the schema, versioned, in WAL mode."""
    # GIVEN a path in a directory that does not exist yet
    path = tmp_path / "deep" / "warden.db"
    # WHEN the store is opened
    store = Store.open(path)
    store.close()
    # THEN the file carries the schema version and WAL journaling
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A store path holding another kind of file gives StoreNotADatabase, bytes intact."""
    # GIVEN a text file where the store should be
    path = tmp_path / "warden.db"
    path.write_bytes(b"my notes, not a database\n" * 100)
    before = path.read_bytes()
    # WHEN it is opened THEN it is refused
    with pytest.raises(StoreNotADatabase, match="not an SQLite database"):
        Store.open(path)
    # AND nothing was written
    assert path.read_bytes() == before


def test_an_sqlite_database_of_something_else_is_refused(tmp_path: Path) -> None:
    """A foreign SQLite database is not taken over."""
    # GIVEN an application's own database
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    # WHEN it is opened as a store THEN it is refused
    with pytest.raises(StoreNotADatabase, match="something else"):
        Store.open(path)


def test_a_store_from_a_newer_version_is_refused_untouched(tmp_path: Path) -> None:
    """A schema newer than this version gives StoreTooNew and the data stays."""
    # GIVEN a store written by a future version
    path = tmp_path / "warden.db"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.execute(
        "INSERT INTO sessions (mode, command, hostname, boot_id, warden_pid,"
        " interval_seconds, started_at) VALUES ('run', 'x', 'h', 'b', 1, 1.0, 1.0)"
    )
    conn.commit()
    conn.close()
    # WHEN it is opened for writing and for reading THEN both refuse
    with pytest.raises(StoreTooNew, match="upgrade celery-warden"):
        Store.open(path)
    with pytest.raises(StoreTooNew):
        Store.open(path, readonly=True)
    # AND the row is still there
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 1
    conn.close()


def test_reading_a_store_that_does_not_exist_says_how_to_fill_it(tmp_path: Path) -> None:
    """`report` on a missing store says to record something first."""
    with pytest.raises(StoreEmpty, match="celery-warden run"):
        Store.open(tmp_path / "none.db", readonly=True)


def test_records_round_trip_into_a_snapshot(tmp_path: Path) -> None:
    """Processes, samples, tasks and ends written by the warden read back as records."""
    # GIVEN a session with a master, a child, samples and tasks
    store = Store.open(tmp_path / "warden.db")
    session = store.begin_session("run", "celery -A proj worker", 1.0)
    store.write(session, [MASTER, CHILD, _sample(MASTER, 1001.0), _sample(CHILD, 1001.0)])
    store.write(
        session,
        [
            TaskStarted(11, 101, "id-1", "proj.add", 1001.2),
            TaskFinished(
                11, 101, "id-1", "proj.add", 1001.5, 0.3, TaskState.SUCCESS, 51_000_000, 1001.2
            ),
            TaskStarted(11, 101, "id-2", "proj.slow", 1001.6),
        ],
    )
    # WHEN the child is killed, the probe's word arriving after the sampler's
    store.write(session, [ProcessEnd(11, 101, 1002.0, EndReason.GONE)])
    store.write(session, [ProcessEnd(11, 101, 1002.1, EndReason.KILLED, -9)])
    store.end_session(session, 0, 0)
    snapshot = read_snapshot(store.connection)
    store.close()
    # THEN everything reads back, the specific end reason wins and the open task is lost
    master, child = snapshot.processes
    assert master.info == MASTER
    assert child.info == CHILD
    assert (child.end_reason, child.exit_code, child.ended_at) == (EndReason.KILLED, -9, 1002.0)
    assert [t.name for t in child.tasks] == ["proj.add"]
    assert child.tasks[0].wall_seconds == pytest.approx(0.3)
    assert child.samples[0].open_fds == 9
    assert [t.name for t in snapshot.running_tasks] == ["proj.slow"]  # lost with its child


def test_retention_downsamples_old_samples_and_keeps_the_peak(tmp_path: Path) -> None:
    """Raw samples past retention become 1-minute aggregates that keep the peak RSS."""
    # GIVEN two hours of 1 Hz samples with one spike in the first hour
    store = Store.open(tmp_path / "warden.db")
    session = store.begin_session("run", "x", 1.0)
    start = 1_000_020.0
    samples = [_sample(CHILD, start + i, 50_000_000) for i in range(7200)]
    samples[100] = _sample(CHILD, start + 100, 400_000_000)
    store.write(session, [CHILD, *samples])
    # WHEN retention runs with one hour of raw samples
    store.apply_retention(start + 7200, Retention(raw_seconds=3600))
    rows = store.connection.execute(
        "SELECT resolution_seconds, count(*), max(COALESCE(rss_peak_bytes, rss_bytes))"
        " FROM samples GROUP BY resolution_seconds ORDER BY 1"
    ).fetchall()
    store.close()
    # THEN the last hour stays raw, the first is one row a minute, and the spike survives
    (raw_res, raw_n, _), (agg_res, agg_n, agg_peak) = rows
    assert (raw_res, agg_res) == (0, 60)
    assert 3590 <= raw_n <= 3600
    assert 59 <= agg_n <= 61
    assert agg_peak == 400_000_000


def test_retention_caps_the_task_rows(tmp_path: Path) -> None:
    """Task rows beyond the cap are dropped oldest first."""
    store = Store.open(tmp_path / "warden.db")
    session = store.begin_session("run", "x", 1.0)
    store.write(
        session,
        [TaskStarted(11, 101, f"id-{i}", "proj.add", 1000.0 + i) for i in range(50)],
    )
    store.apply_retention(1100.0, Retention(max_task_rows=20))
    kept = store.connection.execute("SELECT min(task_id), count(*) FROM tasks").fetchone()
    store.close()
    assert kept[1] == 20


def test_a_failed_batch_does_not_hand_its_process_id_to_another(tmp_path: Path) -> None:
    """After a batch is rolled back, a process it announced gets its own row later and
    no other process's samples land on it."""
    # GIVEN a batch that fails after announcing the child
    store = Store.open(tmp_path / "warden.db")
    session = store.begin_session("run", "x", 1.0)
    with pytest.raises(OverflowError):
        store.write(session, [CHILD, _sample(CHILD, 1001.0, rss=2**64)])
    # WHEN another process, then the child again, are written
    store.write(session, [MASTER, _sample(MASTER, 1002.0, rss=1)])
    store.write(session, [CHILD, _sample(CHILD, 1003.0, rss=2)])
    snapshot = read_snapshot(store.connection)
    store.close()
    # THEN each process has exactly its own samples
    rss = {p.info.pid: [s.rss_bytes for s in p.samples] for p in snapshot.processes}
    assert rss == {MASTER.pid: [1], CHILD.pid: [2]}


def test_two_wardens_creating_one_store_at_once_both_succeed(tmp_path: Path) -> None:
    """Two first opens of the same new store race for the migration; both succeed."""
    path = tmp_path / "warden.db"
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            Store.open(path).close()
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_a_path_with_uri_characters_is_read_as_given(tmp_path: Path) -> None:
    """A store path holding `#`, `%` or `?` is opened read-only where it is."""
    path = tmp_path / "odd#name%20?.db"
    store = Store.open(path)
    store.begin_session("run", "x", 1.0)
    store.close()
    reader = Store.open(path, readonly=True)
    assert reader.connection.execute("SELECT count(*) FROM sessions").fetchone() == (1,)
    reader.close()


def test_an_empty_session_is_not_kept(tmp_path: Path) -> None:
    """A session that saw no process is dropped when it ends."""
    store = Store.open(tmp_path / "warden.db")
    session = store.begin_session("run", "true", 1.0)
    store.end_session(session, 0, 0)
    assert store.connection.execute("SELECT count(*) FROM sessions").fetchone() == (0,)
    store.close()


def test_a_record_the_store_refuses_loses_only_itself(tmp_path: Path) -> None:
    """One bad record in a batch (text SQLite cannot encode) costs only that record."""
    from celery_warden.session import Session

    store = Store.open(tmp_path / "w.db")
    session = Session(store, mode="run", command="test", with_probe=False)
    session.session_id = store.begin_session("run", "test", 1.0)
    child = ProcessInfo(7, 70, 1, Role.CHILD, 1.0, "celery worker", 1)
    bad = TaskStarted(7, 70, "id-\ud800", "proj.add", 2.0)
    good = TaskStarted(7, 70, "id-2", "proj.add", 3.0)
    session._write([child, bad, good])
    rows = store.connection.execute("SELECT task_id FROM tasks").fetchall()
    assert rows == [("id-2",)]
    assert store.connection.execute("SELECT count(*) FROM processes").fetchone() == (1,)
    assert session.store_errors == 1
    store.close()


def test_a_version_1_store_with_history_is_migrated_and_still_read(tmp_path: Path) -> None:
    """A store written by the previous release gains the per-call columns; its rows stay
    and read back with the new fields empty."""
    import sqlite3

    from celery_warden.store._schema import MIGRATIONS

    # GIVEN a version 1 store holding a session, a process and a finished call
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
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
        " ended_at, wall_seconds, state, rss_after_bytes)"
        " VALUES (1, 11, 101, 'id', 'proj.add', 1001.0, 1001.5, 0.5, 'success', 4096)"
    )
    conn.commit()
    conn.close()
    # WHEN the current release opens it
    store = Store.open(path)
    # THEN it is at the current version and the call reads back, new fields empty
    assert store.connection.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    (process,) = read_snapshot(store.connection, 1).processes
    (call,) = process.tasks
    assert (call.name, call.rss_after_bytes, call.cpu_seconds, call.retries) == (
        "proj.add",
        4096,
        None,
        0,
    )
    store.close()


def test_a_diagnosis_is_stored_with_its_session_and_read_back(tmp_path: Path) -> None:
    """A diagnosis of a process a session watched joins that session; one of a process
    no session knows is kept apart; a row this version cannot read is skipped."""
    from celery_warden._records import DiagnosisRecord, Verdict

    store = Store.open(tmp_path / "w.db")
    session = store.begin_session("run", "celery -A proj worker", 1.0)
    store.write(
        session,
        [ProcessInfo(11, 101, 10, Role.CHILD, 1000.0, "celery -A proj worker", 10)],
    )
    document = {"verdict": "leak", "trace": {"task": "proj.add", "sites": []}}
    kept = DiagnosisRecord(11, 101, 1010.0, "proj.add", Verdict.LEAK, False, document)
    stray = DiagnosisRecord(99, 909, 1011.0, None, Verdict.STABLE, False, {})
    store.add_diagnosis(kept)
    store.add_diagnosis(stray)
    store.connection.execute(
        "INSERT INTO diagnoses (session_id, pid, start_ticks, at, verdict, document)"
        " VALUES (?, 11, 101, 1012.0, 'from-the-future', '{}')",
        (session,),
    )
    (read,) = read_snapshot(store.connection, session).diagnoses
    assert read == kept
    store.close()
