"""The guard app (``warden_guard``) with the hooks and tasks the orphan, hang and memory
tests need; start workers with ``-A warden_orphans``.

Environment, read when a worker imports it:

- ``CW_NO_PDEATHSIG=1``: each pool child clears ``PR_SET_PDEATHSIG`` in
  ``worker_process_init`` (Celery sets it to SIGKILL just before): children that outlive
  a killed master, as with Celery < 5.2 or the fork/prctl race (RELIABILITY.md, point 4);
- ``CW_VISIBILITY_TIMEOUT=N``: Redis ``visibility_timeout`` of N seconds;
- ``CW_MASTER_MIB=N``: the master allocates and touches N MiB at import, before it forks
  its children, which share those pages copy-on-write.

Tasks that start a process or run long write a pid into the file they are given (the
app ignores results), with a rename so that a reader never sees half a number.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from typing import Any

from celery import signals
from warden_guard import app

__all__ = ["app"]

_PR_SET_PDEATHSIG = 1

if os.environ.get("CW_VISIBILITY_TIMEOUT"):
    app.conf.broker_transport_options = {
        "visibility_timeout": float(os.environ["CW_VISIBILITY_TIMEOUT"])
    }

# Held for the master's life; every pool child inherits it copy-on-write.
_SHARED = bytearray(int(os.environ.get("CW_MASTER_MIB") or 0) * 1024 * 1024)
for _offset in range(0, len(_SHARED), 4096):
    _SHARED[_offset] = 1


if os.environ.get("CW_NO_PDEATHSIG") == "1":

    @signals.worker_process_init.connect
    def _no_pdeathsig(**_kwargs: Any) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))


def _write_pid(path: str, pid: int) -> None:
    with open(f"{path}.tmp", "w") as f:
        f.write(str(pid))
    os.replace(f"{path}.tmp", path)


@app.task(name="orphans.late_sleep", acks_late=True)
def late_sleep(seconds: float, path: str) -> None:
    """An acks_late task that writes its child's pid, then sleeps."""
    _write_pid(path, os.getpid())
    time.sleep(seconds)  # line: late_sleep


@app.task(name="orphans.spawn")
def spawn(argv: list[str], path: str) -> None:
    """Starts ``argv`` as a program of its own, not waited for, and writes its pid."""
    _write_pid(path, subprocess.Popen(argv).pid)


@app.task(name="orphans.alloc_mib")
def alloc_mib(mib: int, path: str) -> None:
    """Allocates and touches ``mib`` MiB, frees it, then writes its child's pid."""
    block = bytearray(mib * 1024 * 1024)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    del block
    _write_pid(path, os.getpid())
