"""A small Celery app for the integration tests; the broker comes from the environment."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

app = Celery("warden_testapp", broker=os.environ["WARDEN_TEST_BROKER"])
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=4,
)

_KEPT: list[bytes] = []


@app.task(name="testapp.leak")
def leak(size_bytes: int = 100_000) -> int:
    """Keeps ``size_bytes`` per call for good."""
    _KEPT.append(os.urandom(size_bytes))
    return len(_KEPT)


@app.task(name="testapp.noop")
def noop() -> None:
    """Does nothing."""


@app.task(name="testapp.nap")
def nap(seconds: float = 0.01) -> None:
    """Sleeps, as an IO-bound task waits."""
    time.sleep(seconds)


@app.task(name="testapp.mark")
def mark(key: str) -> None:
    """Counts a call in Redis, so a test can see tasks run with no warden at all."""
    import redis

    redis.Redis.from_url(os.environ.get("WARDEN_TEST_REDIS", "redis://127.0.0.1:6379/14")).incr(key)


@app.task(name="testapp.fail")
def fail() -> None:
    """Raises."""
    raise ValueError("planned failure")


@app.task(name="testapp.spin")
def spin(seconds: float = 0.05) -> int:
    """Burns CPU for ``seconds`` of wall time, as a CPU-bound task does."""
    deadline, n = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        n += sum(i * i for i in range(500))
    return n


@app.task(name="testapp.forks")
def forks() -> int:
    """Forks a child that exits at once, as tasks that fork helpers do."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return os.waitpid(pid, 0)[1]


@app.task(name="testapp.retry_once", bind=True, max_retries=1, default_retry_delay=0)
def retry_once(self: Any) -> int:
    """Asks to be retried once, then succeeds."""
    if self.request.retries == 0:
        raise self.retry(exc=ConnectionError("try again"), countdown=0)
    return int(self.request.retries)


@app.task(name='testapp.odd "näme"\t/\\')
def odd_name() -> None:
    """A task name with quotes, a tab, a slash, a backslash and non-ASCII."""


@app.task(name="testapp.churn")
def churn(size_bytes: int = 4_000_000) -> int:
    """Allocates ``size_bytes`` in small pieces and lets them all go: transient memory."""
    pieces = [bytes(4000) for _ in range(size_bytes // 4000)]
    return len(pieces)


@app.task(name="testapp.bulge")
def bulge(size_bytes: int = 8_000_000) -> int:
    """Fills ``size_bytes`` in one block and lets it go: one large transient allocation."""
    return len(b"\x01" * size_bytes)
