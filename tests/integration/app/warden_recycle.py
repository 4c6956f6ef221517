"""Tasks for the guard's recycling tests (RELIABILITY.md, section B).

Every task counts itself in Redis, in two hashes keyed by task id: ``<tag>:starts`` when
it starts and ``<tag>:done`` when it returns, so a test can tell a task that ran once
from one that was redelivered, and one that finished from one that was lost. ``tag`` is
the test's own key prefix (its queue name), passed as the first argument.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import redis
from celery import Celery, Task

app = Celery("warden_recycle", broker=os.environ["WARDEN_TEST_BROKER"])
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)

COUNTS_URL = os.environ.get("WARDEN_TEST_COUNTS", "redis://127.0.0.1:6379/14")
_CLIENTS: dict[int, redis.Redis] = {}  # by pid: a connection is never shared across a fork


def _redis() -> redis.Redis:
    client = _CLIENTS.get(os.getpid())
    if client is None:
        client = _CLIENTS[os.getpid()] = redis.Redis.from_url(COUNTS_URL)
    return client


def _started(task: Task, tag: str) -> int:
    """Count this run of ``task``; the number of times its id has started, this one too."""
    return int(_redis().hincrby(f"{tag}:starts", task.request.id, 1))


def _done(task: Task, tag: str) -> None:
    _redis().hincrby(f"{tag}:done", task.request.id, 1)


def _hold(mib: int) -> bytearray:
    """``mib`` MiB, every page touched: private memory of this process until freed."""
    block = bytearray(mib * 1024 * 1024)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    return block


@app.task(name="recycle.fat_sleep", bind=True, acks_late=False)
def fat_sleep(self: Task, tag: str, mib: int, seconds: float) -> int:
    """Holds ``mib`` MiB while it sleeps, then frees them. Acked before it runs: a child
    killed under it loses it for good, so any interruption shows."""
    _started(self, tag)
    block = _hold(mib)
    time.sleep(seconds)
    size = len(block)
    del block
    _done(self, tag)
    return size


@app.task(name="recycle.short", bind=True, acks_late=True, reject_on_worker_lost=True)
def short(self: Task, tag: str, seconds: float) -> None:
    """A short task that a lost child would have redelivered (and so run twice)."""
    _started(self, tag)
    time.sleep(seconds)
    _done(self, tag)


def _hog_once(self: Task, tag: str, mib: int, seconds: float) -> None:
    """The first run holds ``mib`` MiB for ``seconds`` (long enough to be recycled hard
    in the middle); a redelivered run returns at once."""
    if _started(self, tag) == 1:
        block = _hold(mib)
        time.sleep(seconds)
        del block
    _done(self, tag)


@app.task(name="recycle.hog_redelivered", bind=True, acks_late=True, reject_on_worker_lost=True)
def hog_redelivered(self: Task, tag: str, mib: int, seconds: float) -> None:
    _hog_once(self, tag, mib, seconds)


@app.task(name="recycle.hog_lost", bind=True, acks_late=True)
def hog_lost(self: Task, tag: str, mib: int, seconds: float) -> None:
    """acks_late without reject_on_worker_lost: Celery acks it when its child dies."""
    _hog_once(self, tag, mib, seconds)


@app.task(name="recycle.limited", bind=True, time_limit=3)
def limited(self: Task, tag: str) -> None:
    """Hangs in Python, past its own hard time limit: Celery's to end."""
    _started(self, tag)
    threading.Event().wait()


@app.task(name="recycle.hang_redelivered", bind=True, acks_late=True, reject_on_worker_lost=True)
def hang_redelivered(self: Task, tag: str) -> None:
    """Hangs in Python at every run; each kill of its child puts it back in the queue."""
    _started(self, tag)
    threading.Event().wait()


@app.task(name="recycle.hold", bind=True, acks_late=False)
def hold(self: Task, tag: str, mib: int, seconds: float, deaf: bool = False) -> None:
    """Sleeps, then allocates ``mib`` MiB that its process keeps for life: the process
    is over its threshold only once it is idle again. ``deaf``: the process ignores
    SIGTERM from then on, as one stuck in C code would (it takes the grace and a KILL)."""
    _started(self, tag)
    time.sleep(seconds)
    _HELD.append(_hold(mib))
    if deaf:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _done(self, tag)


@app.task(name="recycle.carry", bind=True, acks_late=True)
def carry(self: Task, tag: str, payload: Any, seconds: float) -> int:
    """Sleeps with a large argument: the master holds the message while it runs."""
    _started(self, tag)
    time.sleep(seconds)
    _done(self, tag)
    return len(payload)


_HELD: list[bytearray] = []
