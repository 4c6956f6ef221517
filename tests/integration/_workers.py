"""Helpers to start real Celery workers under the warden and read what it stored."""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

__all__ = [
    "APP_DIR",
    "BROKERS",
    "marked_line",
    "query",
    "warden_command",
    "worker_command",
    "worker_env",
]

APP_DIR = Path(__file__).parent / "app"
BROKERS = {
    "redis": "redis://127.0.0.1:6379/15",
    "amqp": "amqp://guest:guest@127.0.0.1:5672//",
}


def warden_command(*args: str) -> list[str]:
    """The CLI as a user runs it, through the installed console script's module."""
    return [sys.executable, "-m", "celery_warden", *args]


def worker_command(queue: str, concurrency: int = 2, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "warden_testapp", "worker",
        "--pool", "prefork", "-c", str(concurrency), "-Q", queue, "-n", f"{queue}@%h",
        "-l", "info", "--without-gossip", "--without-mingle", "--without-heartbeat", *extra,
    ]  # fmt: skip


def worker_env(broker: str) -> dict[str, str]:
    env = dict(os.environ)
    env["WARDEN_TEST_BROKER"] = broker
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP_DIR), env.get("PYTHONPATH")]))
    return env


def query(store: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    """Read the store the way `report` does: a read-only connection beside the writer."""
    if not store.exists():
        return []
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []  # the schema is not there yet
    finally:
        conn.close()


def marked_line(path: Path, name: str) -> int:
    """The number of the line of ``path`` ending in ``# line: NAME`` (the test apps mark
    the lines a stack dump must name)."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.rstrip().endswith(f"# line: {name}"):
            return number
    raise AssertionError(f"no line {name} in {path}")
