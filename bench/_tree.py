"""A fake prefork worker tree for the benchmarks: real processes, no broker.

The master runs a script named ``celery`` with ``-A bench worker`` on its command line,
so celery-warden recognises it as a worker master, and forks N children without exec
(as billiard's prefork pool does), so they carry the master's command line and are
adopted as pool children. Each child writes to every page of a private buffer so that
its RSS, USS and the cost of ``smaps_rollup`` are those of a real, warmed-up child.

The tree runs in its own session; :func:`worker_tree` always ends it: SIGTERM to the
master (which SIGKILLs and reaps its children), then SIGKILL to the whole process
group, then reaps the master.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WorkerTree", "worker_tree"]

_SCRIPT = """\
import os, signal, sys

n, mb_min, mb_max, extra_fds = (int(a) for a in sys.argv[4:8])
# Descriptors every child inherits, like a pool child's pipes and sockets.
held = [os.pipe() for _ in range(extra_fds // 2)]
ready_r, ready_w = os.pipe()
kids = []


def child(index):
    os.close(ready_r)
    mb = mb_min + (mb_max - mb_min) * index // max(n - 1, 1)
    size = mb * 1024 * 1024
    buf = bytearray(size)
    pages = (size + 4095) // 4096
    buf[::4096] = b"\\x01" * pages  # a write fault on every page: private, resident
    os.write(ready_w, b"k")
    while True:
        signal.pause()


def stop(signum, frame):
    for pid in kids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in kids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    os._exit(0)


signal.signal(signal.SIGTERM, stop)
for index in range(n):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        child(index)
    kids.append(pid)
os.close(ready_w)
got = 0
while got < n:
    chunk = os.read(ready_r, n - got)
    if not chunk:
        break
    got += len(chunk)
print("ready", *kids, flush=True)
while True:
    signal.pause()
"""


@dataclass(frozen=True, slots=True)
class WorkerTree:
    """A running fake worker: the master's PID and its children's."""

    master: int
    children: tuple[int, ...]

    @property
    def pids(self) -> list[int]:
        return [self.master, *self.children]


def _stop(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the session's leader is the master
    proc.wait()


@contextlib.contextmanager
def worker_tree(
    children: int, mb_min: int = 30, mb_max: int = 30, extra_fds: int = 12
) -> Iterator[WorkerTree]:
    """Start a fake worker with ``children`` pool children and end it on exit.

    Children hold ``mb_min`` to ``mb_max`` MiB of private memory, spread evenly, and
    ``extra_fds`` inherited descriptors besides stdio.
    """
    with tempfile.TemporaryDirectory(prefix="warden-bench-") as tmp:
        script = Path(tmp) / "celery"
        script.write_text(_SCRIPT)
        argv = [sys.executable, str(script), "-A", "bench", "worker"]
        argv += [str(children), str(mb_min), str(mb_max), str(extra_fds)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            if not line or line[0] != "ready":
                raise RuntimeError(f"the fake worker did not start (exit {proc.poll()})")
            time.sleep(0.2)  # let the last children settle into pause()
            yield WorkerTree(proc.pid, tuple(int(pid) for pid in line[1:]))
        finally:
            _stop(proc)
