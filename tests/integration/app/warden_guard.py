"""Tasks for the guard's tests: they sleep, hang in Python or in C, hold memory, spawn
programs, or replace their process. The comment ``# line: NAME`` marks a line a test
expects to see in a stack dump.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

from celery import Celery

app = Celery("warden_guard", broker=os.environ["WARDEN_TEST_BROKER"])
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)

_HELD: list[bytearray] = []


@app.task(name="guard.sleep_for")
def sleep_for(seconds: float) -> float:
    """Sleeps (the GIL released), as a task waiting on IO does."""
    time.sleep(seconds)  # line: sleep_for
    return seconds


@app.task(name="guard.spin_c")
def spin_c() -> int:
    """Hours in one C call holding the GIL: Python's signal handlers never run."""
    return sum(range(10**14))  # line: spin_c


@app.task(name="guard.wait_forever")
def wait_forever() -> None:
    """Waits on an event nobody sets: a hang in Python, on a lock in C."""
    threading.Event().wait()  # line: wait_forever


@app.task(name="guard.alloc_mib")
def alloc_mib(mib: int, keep: bool) -> int:
    """Allocates and touches ``mib`` MiB; keeps it for the process's life if ``keep``."""
    block = bytearray(mib * 1024 * 1024)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    if keep:
        _HELD.append(block)
    return len(block)


@app.task(name="guard.spawn_sleep")
def spawn_sleep(seconds: float) -> int:
    """Starts ``sleep`` as a program of its own, not waited for; its pid."""
    return subprocess.Popen(["sleep", str(seconds)]).pid


@app.task(name="guard.execv_sleep")
def execv_sleep() -> None:
    """Replaces the pool child itself with ``sleep 300``."""
    os.execv("/bin/sleep", ["sleep", "300"])  # noqa: S606


@app.task(name="guard.late_ack", acks_late=True)
def late_ack() -> None:
    """Acked after it runs, unlike the app's other tasks: the settings tests look for it."""
