"""Planted memory faults for ``celery-warden diagnose`` (tests/integration/test_diagnose_live.py).

Each task keeps memory in a way real code does; the comment ``# site: NAME`` marks the
line that allocates what it keeps, and the test reads the line number from here.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
from typing import Any

from celery import Celery

app = Celery("warden_faults", broker=os.environ["WARDEN_TEST_BROKER"])
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)

_counter = itertools.count()


class Record:
    """What a task remembers about each call."""

    __slots__ = ("number", "payload")

    def __init__(self, number: int, payload: bytes) -> None:
        self.number = number
        self.payload = payload


RECORDS: list[Record] = []


@app.task(name="faults.records")
def records() -> int:
    """A module-level list of records that only grows."""
    RECORDS.append(Record(next(_counter), os.urandom(4096)))  # site: records
    return len(RECORDS)


class Profile:
    """What the cached lookup returns."""

    def __init__(self, key: int) -> None:
        self.key = key
        self.blob = bytearray(3000)


@functools.cache
def lookup(key: int) -> Profile:
    return Profile(key)  # site: cache


@app.task(name="faults.cache")
def cache() -> int:
    """An unbounded lru_cache called with a new key every time."""
    return lookup(next(_counter)).key


LISTENERS: list[Any] = []


@app.task(name="faults.listeners")
def listeners() -> int:
    """A registry of closures, each holding its call's buffer."""
    buffer = bytearray(3500)  # site: listeners

    def on_event() -> int:
        return len(buffer)

    LISTENERS.append(on_event)
    return len(LISTENERS)


class Snapshot:
    """What the failing call had in hand."""

    def __init__(self) -> None:
        self.rows = [bytearray(1000) for _ in range(4)]


ERRORS: list[BaseException] = []


@app.task(name="faults.errors")
def errors() -> int:
    """Stores the exception of every failure: its traceback keeps the frame alive."""
    try:
        state = Snapshot()  # site: errors
        raise ValueError(f"bad input {len(state.rows)}")
    except ValueError as exc:
        ERRORS.append(exc)
    return len(ERRORS)


_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]


@app.task(name="faults.native")
def native() -> None:
    """A C allocation never freed (64 KiB, below glibc's mmap threshold), touched."""
    address = _libc.malloc(64 * 1024)
    ctypes.memset(address, 1, 64 * 1024)


_PIN: list[bytearray] = []


@app.task(name="faults.churn")
def churn() -> int:
    """Builds ~100 MB of medium objects and frees them; one small object allocated
    after them (replaced every call) keeps glibc from trimming the top of its heap, as
    any long-lived allocation would. Not a leak: a high-water plateau."""
    rows = [bytearray(700) for _ in range(140_000)]
    _PIN[:] = [bytearray(700)]
    size = len(rows)
    del rows
    return size


@app.task(name="faults.noop")
def noop() -> None:
    """Does nothing."""
