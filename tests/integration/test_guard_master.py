"""A master that stops consuming while its queue has work (the guard's
``hang.master_idle_seconds``), and the probe's ``queues`` operation it relies on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from celery_warden import control
from tests._support import wait_until
from tests.integration._workers import BROKERS, query, warden_command, worker_env

pytestmark = pytest.mark.integration

Spawn = Callable[..., subprocess.Popen[bytes]]


def _worker(queue: str, concurrency: int) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "warden_guard", "worker", "--pool", "prefork",
        "-c", str(concurrency), "-Q", queue, "-n", f"{queue}@%h", "-l", "warning",
        "--prefetch-multiplier", "1",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def _env(broker: str) -> dict[str, str]:
    env = worker_env(broker)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent / "app"), env["PYTHONPATH"]])
    return env


def _send(broker: str, queue: str, name: str, count: int, *args: object) -> None:
    from celery import Celery

    app = Celery("warden_guard_client", broker=broker)
    app.conf.broker_connection_retry_on_startup = True
    try:
        with app.producer_or_acquire() as producer:
            for _ in range(count):
                app.send_task(name, args=args, queue=queue, producer=producer)
    finally:
        app.close()


def _master(store: Path) -> int:
    rows = query(store, "SELECT pid FROM processes WHERE role = 'master' AND ended_at IS NULL")
    return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]


def _start(spawn: Spawn, tmp_path: Path, broker: str, queue: str, *flags: str) -> Path:
    store = tmp_path / "warden.db"
    argv = warden_command("run", "--store", str(store), *flags, "--", *_worker(queue, 1))
    spawn(argv, env=_env(broker))
    wait_until(lambda: _master(store), what="the worker's master")
    master = _master(store)
    wait_until(lambda: _can_ask(master), what="the master's probe")
    return store


def _can_ask(pid: int) -> bool:
    try:
        control.ask(pid, {"op": "hello"}, timeout=2)
    except control.WardenError:
        return False
    return True


@pytest.mark.parametrize("broker_name", sorted(BROKERS))
def test_the_master_says_how_many_messages_wait(
    spawn: Spawn, tmp_path: Path, queue: str, broker_name: str
) -> None:
    """One child, prefetch 1: one task runs, one is reserved, the rest wait in the queue."""
    broker = BROKERS[broker_name]
    # GIVEN a one-child worker that consumes from its own queue
    store = _start(spawn, tmp_path, broker, queue)
    master = _master(store)
    # WHEN five long tasks are sent
    _send(broker, queue, "guard.sleep_for", 5, 8)
    # THEN the master counts those still in the queue (one runs, at most one is reserved)
    reply: dict[str, object] = {}

    def counted() -> bool:
        reply.update(control.ask(master, {"op": "queues"}, timeout=10))
        return reply["queues"] == {queue: 3}

    wait_until(counted, timeout=6, what=f"3 messages waiting in {queue}, got {reply}")
    # AND a pool child, which consumes nothing, refuses the question
    child = query(store, "SELECT pid FROM processes WHERE role = 'child' AND ended_at IS NULL")
    with pytest.raises(control.ControlFailed, match="master"):
        control.ask(int(child[0][0]), {"op": "queues"}, timeout=5)  # type: ignore[call-overload]


def test_a_stopped_master_with_work_waiting_is_reported(
    spawn: Spawn, tmp_path: Path, queue: str
) -> None:
    """Every child idle while the master is frozen (SIGSTOP): it cannot consume or even
    answer, and the guard says so, once, without sending it anything."""
    broker = BROKERS["redis"]
    # GIVEN a one-child worker with a short idle limit
    config = tmp_path / "guard.toml"
    config.write_text("[hang]\nmaster_idle_seconds = 2\n")
    config.chmod(0o600)
    store = _start(spawn, tmp_path, broker, queue, "--config", str(config))
    master = _master(store)
    try:
        # WHEN the master freezes and work arrives
        os.kill(master, signal.SIGSTOP)
        _send(broker, queue, "guard.sleep_for", 3, 0.1)
        # THEN a master-stuck incident is stored, naming the unanswered question
        wait_until(
            lambda: query(store, "SELECT reason FROM incidents WHERE kind = 'master-stuck'"),
            timeout=40,
            what="a master-stuck incident",
        )
    finally:
        os.kill(master, signal.SIGCONT)
    rows = query(store, "SELECT pid, outcome, reason FROM incidents WHERE kind = 'master-stuck'")
    assert len(rows) == 1
    pid, outcome, reason = rows[0]
    assert (pid, outcome) == (master, "reported")
    assert "does not answer" in str(reason)
    # AND nothing was sent to the master for it
    assert not query(store, "SELECT 1 FROM signals WHERE pid = ?", master)


def test_an_idle_master_with_nothing_to_do_is_not_stuck(
    spawn: Spawn, tmp_path: Path, queue: str
) -> None:
    """Idle children and an empty queue: nothing to report."""
    config = tmp_path / "guard.toml"
    config.write_text("[hang]\nmaster_idle_seconds = 1\n")
    config.chmod(0o600)
    store = _start(spawn, tmp_path, BROKERS["redis"], queue, "--config", str(config))
    master = _master(store)
    # WHEN the master was asked at least once (it answers: nothing waits)
    wait_until(lambda: _idle_seconds(store) > 4, timeout=30, what="a few idle seconds")
    reply = control.ask(master, {"op": "queues"}, timeout=10)
    assert reply["queues"].get(queue, 0) == 0  # Redis has no list for an empty queue
    # THEN no incident
    assert not query(store, "SELECT 1 FROM incidents WHERE kind = 'master-stuck'")


def _idle_seconds(store: Path) -> float:
    rows = query(store, "SELECT max(t) - min(t) FROM samples")
    return float(rows[0][0] or 0) if rows else 0.0  # type: ignore[arg-type]
