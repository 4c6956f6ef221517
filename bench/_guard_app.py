"""The tasks bench_guard.py runs in real prefork workers: each writes one JSON line of
marks (its pid, wall-clock times) to the file it is given, so the benchmark knows the
exact moment a threshold was crossed from inside the child.

Worker: ``celery -A _guard_app worker`` with ``bench/`` on ``PYTHONPATH``; the broker is
``$WARDEN_TEST_BROKER`` (default Redis db 13).
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import threading
import time
from typing import Any

from celery import Celery

app = Celery("_guard_app", broker=os.environ.get("WARDEN_TEST_BROKER", "redis://127.0.0.1:6379/13"))
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)

_MIB = 1024 * 1024
_PAGE = 4096


def _mark(path: str, **marks: Any) -> None:
    """Append one line of marks; O_APPEND keeps concurrent children's lines whole."""
    line = json.dumps({"pid": os.getpid(), **marks}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _memory(metric: str) -> int:
    """This process's USS (as celery-warden reads it) or RSS (what ru_maxrss follows)."""
    if metric == "uss":
        with open("/proc/self/smaps_rollup", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines()[1:])
        return sum(int(fields[k].split()[0]) * 1024 for k in (b"Private_Clean", b"Private_Dirty"))
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@app.task(name="bench_guard.ready")
def ready(path: str) -> None:
    """Says which child is up (the benchmark waits for it before measuring)."""
    _mark(path, kind="ready", t=time.time())


@app.task(name="bench_guard.alloc_hold")
def alloc_hold(
    path: str, tag: str, limit_mib: float, metric: str, over_mib: int, hold: float
) -> int:
    """Touches memory page by page until ``metric`` is ``over_mib`` past ``limit_mib``,
    marking the moment it crosses ``limit_mib`` (read, not estimated), then holds it all
    while it runs ``hold`` seconds more."""
    start = time.time()
    limit = limit_mib * _MIB
    baseline = _memory(metric)
    size = max(int(limit - baseline) + over_mib * _MIB, _MIB)
    # Private anonymous memory: a page is resident (and private) once written, not before
    # (bytearray(n) would zero, so touch, all of it at once).
    block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    cross = None
    reads = 0
    for chunk in range(0, size, _MIB):
        for offset in range(chunk, min(chunk + _MIB, size), _PAGE):
            block[offset] = 1
        # Estimated from what was touched; read for real within 4 MiB of the limit.
        if cross is None and baseline + chunk + _MIB > limit - 4 * _MIB:
            reads += 1
            if _memory(metric) > limit:
                cross = time.time()
    touched = time.time()
    after = _memory(metric)
    _mark(
        path, kind="alloc", tag=tag, start=start, cross=cross, touched=touched,
        baseline_mib=baseline / _MIB, after_mib=after / _MIB, reads=reads,
    )  # fmt: skip
    time.sleep(hold)
    _mark(path, kind="alloc-done", tag=tag, t=time.time())
    block.close()
    return size


@app.task(name="bench_guard.hang")
def hang(path: str, tag: str) -> None:
    """Marks its start, then waits on an event nobody sets (a hang in Python)."""
    _mark(path, kind="hang", tag=tag, start=time.time())
    threading.Event().wait()


@app.task(name="bench_guard.spawn_sleep")
def spawn_sleep(path: str, seconds: float) -> None:
    """Starts ``sleep`` as a program of its own, not waited for, and marks its pid."""
    proc = subprocess.Popen(["sleep", str(seconds)])
    _mark(path, kind="spawn", sleep_pid=proc.pid, t=time.time())
