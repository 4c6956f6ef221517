"""The probe in real workers: heartbeats, per-call figures, every way of attaching it,
and the pools it supports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from celery_warden.live import Activity
from celery_warden.probe import SITE_DIR
from celery_warden.probe._boot import PACKAGE_ENV, SOCKET_ENV
from celery_warden.probe._hooks import BLOCKS_SAMPLE_ENV, HEARTBEAT_ENV
from celery_warden.session import Session
from celery_warden.store import Store
from tests._support import reap_tree, wait_until
from tests.integration._workers import query, warden_command, worker_command, worker_env

pytestmark = pytest.mark.integration

Spawn = Callable[..., subprocess.Popen[bytes]]


def _count(store: Path, sql: str, *params: object) -> int:
    rows = query(store, sql, *params)
    return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    """A warden session in this process, so a test can read its live view."""
    store = Store.open(tmp_path / "warden.db")
    session = Session(store, mode="run", command="test")
    session.start()
    yield session
    session.stop(exit_code=0)
    store.close()


def _running(session: Session, name: str) -> list[tuple[Activity, float | None, float]]:
    return [
        (activity, task.cpu_seconds, task.since)
        for activity in session.activity()
        for task in activity.running
        if task.name == name and activity.heartbeat_at is not None
    ]


def test_heartbeats_tell_which_task_each_child_runs_and_since_when(
    session: Session, spawn: Spawn, send: Callable[..., None], broker: str, queue: str
) -> None:
    """While a child runs a long task, the warden's live view names the task, when it
    started and how much CPU its thread has burnt; once it ends, the child is idle."""
    # GIVEN a prefork worker whose probe beats every 0.2 s
    env = worker_env(broker)
    probe_env = session.probe_environment()
    env.update({name: probe_env[name] for name in (SOCKET_ENV, PACKAGE_ENV)})
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), env["PYTHONPATH"]])
    env[HEARTBEAT_ENV] = "0.2"
    worker = spawn(worker_command(queue), env=env, start_new_session=True)
    session.add_anchor(worker.pid)
    # WHEN one child spins for 6 s and the other sleeps for 6 s
    sent_at = time.time()
    send("testapp.spin", 1, 6.0)
    send("testapp.nap", 1, 6.0)
    spinning = wait_until(lambda: _running(session, "testapp.spin"), what="a spin heartbeat")
    napping = wait_until(lambda: _running(session, "testapp.nap"), what="a nap heartbeat")
    # THEN both are seen in two different children, since they started
    (spin_activity, _, spin_since), *_ = spinning  # type: ignore[misc]
    (nap_activity, _, nap_since), *_ = napping  # type: ignore[misc]
    assert spin_activity.pid != nap_activity.pid
    assert {spin_activity.pid, nap_activity.pid} <= {
        c.pid for c in psutil.Process(worker.pid).children()
    }
    assert sent_at - 1 <= spin_since <= time.time()
    assert sent_at - 1 <= nap_since <= time.time()
    # AND the spinning task's CPU grows while the sleeping one's stays near zero
    wait_until(
        lambda: any((cpu or 0) > 1.0 for _, cpu, _ in _running(session, "testapp.spin")),
        what="a second of CPU in the spinning task",
    )
    assert all((cpu or 0) < 0.5 for _, cpu, _ in _running(session, "testapp.nap"))
    # AND once both have ended, the children are idle and still beating
    wait_until(
        lambda: all(not a.running for a in session.activity()) and len(session.activity()) >= 2,
        timeout=30,
        what="both children idle",
    )
    beats = {a.pid: a.heartbeat_at for a in session.activity()}
    wait_until(
        lambda: all((a.heartbeat_at or 0) > (beats.get(a.pid) or 0) for a in session.activity()),
        what="newer heartbeats",
    )
    reap_tree(worker)


def test_each_call_records_cpu_memory_exceptions_and_retries(
    spawn: Spawn, send: Callable[..., None], broker: str, queue: str, tmp_path: Path
) -> None:
    """Under `run`, every call carries its thread's CPU, its RSS, the allocator's change,
    the exception type of a failure, the retry count; odd names and tasks that fork are
    recorded like any other."""
    # GIVEN a worker under the warden
    store = tmp_path / "warden.db"
    argv = warden_command("run", "--store", str(store), "--", *worker_command(queue))
    # (the allocator's blocks are counted around every call, not a sample of them)
    warden = spawn(argv, env=worker_env(broker) | {BLOCKS_SAMPLE_ENV: "1"})
    wait_until(
        lambda: _count(store, "SELECT count(*) FROM processes WHERE role = 'child'") == 2,
        what="two pool children",
    )
    # WHEN CPU-bound, sleeping, failing, retried, forking and oddly named tasks run
    send("testapp.spin", 3, 0.3)
    send("testapp.nap", 3, 0.3)
    send("testapp.fail", 2)
    send("testapp.retry_once", 1)
    send("testapp.forks", 3)
    send('testapp.odd "näme"\t/\\', 1)
    wait_until(
        lambda: _count(store, "SELECT count(*) FROM tasks WHERE ended_at IS NOT NULL") >= 14,
        what="14 finished calls",
    )
    warden.send_signal(signal.SIGTERM)
    assert warden.wait(timeout=60) == 0
    # THEN CPU tells the spinning calls from the sleeping ones
    cpu = dict(
        query(store, "SELECT name, avg(cpu_seconds / wall_seconds) FROM tasks GROUP BY name")
    )
    assert cpu["testapp.spin"] > 0.5  # type: ignore[operator]
    assert cpu["testapp.nap"] < 0.2  # type: ignore[operator]
    # AND every call has its RSS, a block count change, and failures their exception type
    assert _count(store, "SELECT count(*) FROM tasks WHERE rss_after_bytes IS NULL") == 0
    assert _count(store, "SELECT count(*) FROM tasks WHERE py_blocks_delta IS NULL") == 0
    assert query(store, "SELECT DISTINCT exception FROM tasks WHERE name = 'testapp.fail'") == [
        ("builtins.ValueError",)
    ]
    retried = query(
        store, "SELECT state, retries, exception FROM tasks WHERE name = 'testapp.retry_once'"
    )
    assert sorted(retried) == [  # type: ignore[type-var]
        ("retry", 0, "builtins.ConnectionError"),
        ("success", 1, None),
    ]
    assert query(store, "SELECT state FROM tasks WHERE name = ?", 'testapp.odd "näme"\t/\\') == [
        ("success",)
    ]
    assert query(store, "SELECT DISTINCT state FROM tasks WHERE name = 'testapp.forks'") == [
        ("success",)
    ]
    # AND USS/PSS were read at a bounded rate: at least once, not on every call
    with_smaps = _count(store, "SELECT count(*) FROM tasks WHERE uss_after_bytes IS NOT NULL")
    assert 1 <= with_smaps < _count(store, "SELECT count(*) FROM tasks")


def _installed_worker(queue: str, *extra: str) -> list[str]:
    argv = worker_command(queue, 2, *extra)
    argv[argv.index("warden_testapp")] = "warden_installed"
    return argv


def test_install_records_a_worker_started_without_the_warden(
    spawn: Spawn, send: Callable[..., None], broker: str, queue: str, tmp_path: Path
) -> None:
    """`celery_warden.install(app)` in the app module: a worker started plainly starts
    a collector beside itself, and the store ends up with what `run` would record."""
    # GIVEN a plain worker whose app calls install(app), storing into a test store
    store = tmp_path / "installed.db"
    env = worker_env(broker) | {"CELERY_WARDEN_STORE": str(store)}
    worker = spawn(_installed_worker(queue), env=env)
    wait_until(
        lambda: _count(store, "SELECT count(*) FROM processes WHERE role = 'child'") == 2,
        what="the collector to record two pool children",
    )
    collector = [
        p for p in psutil.Process(worker.pid).children() if "collect" in " ".join(p.cmdline())
    ]
    assert len(collector) == 1
    argv = collector[0].cmdline()
    private_dir = Path(argv[argv.index("--socket") + 1]).parent
    # WHEN tasks run and the worker is stopped
    send("testapp.leak", 20, 10_000)
    send("testapp.fail", 2)
    wait_until(
        lambda: _count(store, "SELECT count(*) FROM tasks WHERE ended_at IS NOT NULL") == 22,
        what="22 finished calls",
    )
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    # THEN the collector closes the session and leaves
    collector[0].wait(timeout=30)
    rows = query(store, "SELECT mode, ended_at IS NOT NULL FROM sessions")
    assert rows == [("install", 1)]
    roles = dict(query(store, "SELECT role, count(*) FROM processes GROUP BY role"))
    assert roles == {"master": 1, "child": 2}  # and never the collector itself
    assert _count(store, "SELECT count(*) FROM processes WHERE pid = ?", collector[0].pid) == 0
    states = dict(query(store, "SELECT state, count(*) FROM tasks GROUP BY state"))
    assert states == {"success": 20, "failure": 2}
    assert _count(store, "SELECT count(*) FROM tasks WHERE cpu_seconds IS NULL") == 0
    assert _count(store, "SELECT count(*) FROM processes WHERE ended_at IS NULL") == 0
    # AND its private socket directory is gone
    assert not private_dir.exists()


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_the_celery_plugin_runs_a_worker_under_the_warden(
    spawn: Spawn,
    send: Callable[..., None],
    broker: str,
    queue: str,
    tmp_path: Path,
    pool: str,
) -> None:
    """`celery -A app warden run worker ...` is `celery-warden run -- celery -A app
    worker ...`; the solo and threads pools run tasks in the master and are recorded too."""
    # GIVEN a worker started through Celery's own CLI, with the solo or threads pool
    store = tmp_path / "warden.db"
    worker = worker_command(queue, 2)
    worker_args = worker[worker.index("worker") :]
    worker_args[worker_args.index("prefork")] = pool
    argv = [
        *worker[: worker.index("-A")],
        "-A",
        "warden_testapp",
        "warden",
        "run",
        "--store",
        str(store),
        *worker_args,
    ]
    warden = spawn(argv, env=worker_env(broker))
    wait_until(
        lambda: _count(store, "SELECT count(*) FROM workers WHERE pool = ?", pool) == 1,
        what=f"a {pool} worker",
    )
    # WHEN CPU-bound and sleeping tasks run
    send("testapp.spin", 4, 0.2)
    send("testapp.nap", 4, 0.2)
    wait_until(
        lambda: _count(store, "SELECT count(*) FROM tasks WHERE ended_at IS NOT NULL") == 8,
        what="8 finished calls",
    )
    warden.send_signal(signal.SIGTERM)
    assert warden.wait(timeout=60) == 0
    # THEN the calls ran in the master, each with its own thread's CPU
    (master,) = query(store, "SELECT pid FROM processes WHERE role = 'master'")
    assert {row[0] for row in query(store, "SELECT DISTINCT pid FROM tasks")} == {master[0]}
    cpu = dict(
        query(store, "SELECT name, max(cpu_seconds / wall_seconds) FROM tasks GROUP BY name")
    )
    assert cpu["testapp.spin"] > 0.3  # type: ignore[operator] - two spin at once, one GIL
    assert cpu["testapp.nap"] < 0.2  # type: ignore[operator]


def test_install_survives_a_sighup_restart_with_one_collector(
    spawn: Spawn, send: Callable[..., None], broker: str, queue: str, tmp_path: Path
) -> None:
    """A worker without a terminal restarts on SIGHUP by re-executing itself (same PID):
    the new image finds the collector already running, and tasks after the restart
    are recorded in the same session, by the same single collector."""
    # GIVEN a plain worker with install(app), recorded by its collector
    store = tmp_path / "installed.db"
    env = worker_env(broker) | {"CELERY_WARDEN_STORE": str(store)}
    # The `celery` script, not `python -m celery`: Celery re-executes `sys.argv`, and
    # `celery/__main__.py` run as a script fails on its relative import.
    argv = _installed_worker(queue)
    argv[: argv.index("-A")] = [str(Path(sys.executable).parent / "celery")]
    worker = spawn(argv, env=env, stdin=subprocess.DEVNULL)
    wait_until(
        lambda: _count(store, "SELECT count(*) FROM processes WHERE role = 'child'") == 2,
        what="two pool children",
    )

    def collectors() -> list[psutil.Process]:
        return [
            p for p in psutil.Process(worker.pid).children() if "collect" in " ".join(p.cmdline())
        ]

    (collector,) = collectors()
    send("testapp.noop", 5)
    wait_until(lambda: _count(store, "SELECT count(*) FROM tasks") == 5, what="5 calls")
    # WHEN the worker is told to restart
    worker.send_signal(signal.SIGHUP)
    wait_until(
        lambda: _count(store, "SELECT count(*) FROM processes WHERE role = 'child'") == 4,
        timeout=60,
        what="two new pool children after the restart",
    )
    send("testapp.noop", 5)
    # THEN the calls after it are recorded too, by the one collector, in one session
    wait_until(lambda: _count(store, "SELECT count(*) FROM tasks") == 10, what="10 calls")
    assert [p.pid for p in collectors()] == [collector.pid]
    assert _count(store, "SELECT count(*) FROM sessions") == 1
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    collector.wait(timeout=30)
