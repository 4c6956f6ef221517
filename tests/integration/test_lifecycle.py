"""Process lives and signals on real workers: watch, Celery's own recycling, warm
shutdown through the warden, and a warden that dies."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import redis

from tests._support import wait_until
from tests.integration._workers import (
    BROKERS,
    query,
    warden_command,
    worker_command,
    worker_env,
)

pytestmark = pytest.mark.integration

Spawn = Callable[..., subprocess.Popen[bytes]]


def _run(
    spawn: Spawn, store: Path, broker: str, queue: str, *extra: str
) -> subprocess.Popen[bytes]:
    argv = warden_command("run", "--store", str(store), "--", *worker_command(queue, 2, *extra))
    warden = spawn(argv, env=worker_env(broker))
    wait_until(
        lambda: (
            _count(store, "SELECT count(*) FROM processes WHERE role = 'master'") == 1
            and _count(store, "SELECT count(*) FROM processes WHERE role = 'child'") >= 2
        ),
        what="the worker's master and pool children",
    )
    return warden


def _count(store: Path, sql: str, *params: object) -> int:
    rows = query(store, sql, *params)
    return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]


def test_watch_attaches_to_a_running_worker_by_pid_and_by_match(
    spawn: Spawn, queue: str, tmp_path: Path
) -> None:
    """`watch` finds a worker started elsewhere, by its master's PID, a child's PID or
    its command line, and records its whole tree."""
    # GIVEN a worker started outside the warden
    worker = spawn(worker_command(queue), env=worker_env(BROKERS["redis"]), start_new_session=True)
    wait_until(lambda: len(psutil.Process(worker.pid).children()) == 2, what="two children")
    child = psutil.Process(worker.pid).children()[0].pid
    for how, args in {
        "master": ("--pid", str(worker.pid)),
        "child": ("--pid", str(child)),
        "match": ("--match", queue),
    }.items():
        store = tmp_path / f"{how}.db"
        # WHEN the warden watches it for a few seconds
        result = subprocess.run(
            warden_command("watch", *args, "--duration", "3", "--store", str(store)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # THEN it recorded the master and both children, with samples
        assert result.returncode == 0, result.stderr
        roles = dict(query(store, "SELECT role, count(*) FROM processes GROUP BY role"))
        assert roles == {"master": 1, "child": 2}, how
        masters = query(store, "SELECT pid FROM processes WHERE role = 'master'")
        assert masters == [(worker.pid,)]
        assert _count(store, "SELECT count(*) FROM samples") >= 6


def test_a_wrapper_that_execs_the_worker_becomes_its_master(
    spawn: Spawn, queue: str, tmp_path: Path
) -> None:
    """`run -- sh -c '...; exec celery ...'` (a container entrypoint) records the exec'd
    shell as the master, and SIGTERM reaches it, not its pool children."""
    # GIVEN a worker started through a shell that execs it a moment later
    store = tmp_path / "warden.db"
    inner = " ".join(worker_command(queue))
    argv = warden_command("run", "--store", str(store), "--", "sh", "-c", f"sleep 1; exec {inner}")
    warden = spawn(argv, env=worker_env(BROKERS["redis"]))
    wait_until(
        lambda: _count(store, "SELECT count(*) FROM processes WHERE role = 'child'") == 2,
        what="two pool children",
    )
    # WHEN the warden is asked to stop
    warden.send_signal(signal.SIGTERM)
    # THEN the worker shut down warmly, and the shell's PID was its one master
    assert warden.wait(timeout=60) == 0
    assert query(store, "SELECT pid FROM processes WHERE role = 'master'") == [
        (warden_child(store),)
    ]
    assert _count(store, "SELECT count(*) FROM processes WHERE role = 'child'") == 2
    assert _count(store, "SELECT count(*) FROM processes WHERE end_reason = 'killed'") == 0


def warden_child(store: Path) -> int:
    """The PID of the command the warden started: the parent of the pool children."""
    (ppid,) = query(store, "SELECT DISTINCT ppid FROM processes WHERE role = 'child'")[0]
    return int(ppid)  # type: ignore[call-overload]


def test_watch_ends_by_itself_when_its_worker_stops(
    spawn: Spawn, queue: str, tmp_path: Path
) -> None:
    """`watch --pid` exits 0 once the worker it watches has stopped, its processes ended."""
    # GIVEN a worker watched by PID with no time limit
    worker = spawn(worker_command(queue), env=worker_env(BROKERS["redis"]), start_new_session=True)
    wait_until(lambda: len(psutil.Process(worker.pid).children()) == 2, what="two children")
    store = tmp_path / "warden.db"
    watch = spawn(warden_command("watch", "--pid", str(worker.pid), "--store", str(store)))
    wait_until(
        lambda: _count(store, "SELECT count(*) FROM processes") == 3, what="the worker's tree"
    )
    # WHEN the worker stops
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=30)
    # THEN the watch ends on its own and every process has its end
    assert watch.wait(timeout=30) == 0
    assert _count(store, "SELECT count(*) FROM processes WHERE ended_at IS NULL") == 0


def test_celery_max_tasks_recycling_is_recorded_as_such(
    spawn: Spawn, send: Callable[..., None], broker: str, queue: str, tmp_path: Path
) -> None:
    """Children that Celery recycles after --max-tasks-per-child end with that reason."""
    # GIVEN a worker recycling its children every 20 tasks, under the warden
    store = tmp_path / "warden.db"
    warden = _run(spawn, store, broker, queue, "--max-tasks-per-child", "20")
    # WHEN it runs 100 tasks
    send("testapp.noop", 100)
    wait_until(
        lambda: _count(store, "SELECT count(*) FROM tasks WHERE state = 'success'") >= 100,
        what="100 tasks",
    )
    warden.send_signal(signal.SIGTERM)
    assert warden.wait(timeout=60) == 0
    # THEN every child was seen, even those that lived less than a sweep, and the
    # recycled ones ended as `max-tasks` with billiard's recycle code
    recycled = query(
        store,
        "SELECT count(*), min(exit_code), max(exit_code) FROM processes"
        " WHERE role = 'child' AND end_reason = 'max-tasks'",
    )[0]
    assert recycled[0] >= 3
    assert recycled[1:] == (0x9B, 0x9B)
    children = set(query(store, "SELECT pid FROM processes WHERE role = 'child'"))
    ran_tasks = set(query(store, "SELECT DISTINCT pid FROM tasks"))
    assert ran_tasks <= children, query(store, "SELECT * FROM processes")
    assert len(ran_tasks) >= 5  # 100 tasks, at most 20 per child


def test_sigterm_to_the_warden_lets_the_running_task_finish(
    spawn: Spawn, send: Callable[..., None], broker: str, queue: str, tmp_path: Path
) -> None:
    """SIGTERM to the warden reaches the worker's master only: Celery's warm shutdown
    lets the task in flight finish instead of killing its child."""
    # GIVEN a worker under the warden running a 3-second task
    store = tmp_path / "warden.db"
    warden = _run(spawn, store, broker, queue)
    send("testapp.nap", 1, 3.0)
    wait_until(
        lambda: _count(store, "SELECT count(*) FROM tasks WHERE state = 'started'"),
        what="the task to start",
    )
    # WHEN the warden is asked to stop
    warden.send_signal(signal.SIGTERM)
    # THEN the task completes and the worker exits cleanly
    assert warden.wait(timeout=60) == 0
    assert query(store, "SELECT name, state FROM tasks") == [("testapp.nap", "success")]
    assert _count(store, "SELECT count(*) FROM processes WHERE end_reason = 'killed'") == 0


def test_a_worker_keeps_working_when_its_warden_is_killed(
    spawn: Spawn, send: Callable[..., None], broker: str, queue: str, tmp_path: Path
) -> None:
    """kill -9 of the warden leaves the worker running, and processing tasks as fast as
    before: the probe drops what it cannot send instead of waiting."""
    # GIVEN a worker under a warden
    store = tmp_path / "warden.db"
    warden = _run(spawn, store, broker, queue)
    (master,) = query(store, "SELECT pid FROM processes WHERE role = 'master'")[0]
    family = [master, *(p.pid for p in psutil.Process(int(master)).children())]  # type: ignore[call-overload]
    marks = redis.Redis.from_url("redis://127.0.0.1:6379/14")
    keys = [f"warden-test-{uuid.uuid4().hex}" for _ in range(2)]

    def seconds_for(key: str, count: int) -> float:
        started = time.monotonic()
        send("testapp.mark", count, key)
        wait_until(lambda: int(marks.get(key) or 0) == count, what=f"{count} tasks")
        return time.monotonic() - started

    try:
        with_warden = seconds_for(keys[0], 300)
        # WHEN the warden is killed and tasks keep coming
        os.kill(warden.pid, signal.SIGKILL)
        warden.wait(timeout=10)
        without_warden = seconds_for(keys[1], 300)
        # THEN the worker runs them all, at the pace it had (a probe that waited on the
        # dead socket would stall every call; twice as slow is the generous bound)
        assert psutil.pid_exists(int(master))  # type: ignore[call-overload]
        assert without_warden < 2 * with_warden + 1
    finally:
        marks.delete(*keys)
        marks.close()
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)  # type: ignore[call-overload]
        psutil.wait_procs([p for p in map(_process, family) if p], timeout=10)


def _process(pid: object) -> psutil.Process | None:
    try:
        return psutil.Process(int(pid))  # type: ignore[call-overload]
    except psutil.NoSuchProcess:
        return None
