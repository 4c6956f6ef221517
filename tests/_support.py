"""Helpers every test may use: wait for a condition, reap a process tree."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable

import psutil
import pytest

__all__ = ["reap_tree", "wait_until"]


def reap_tree(proc: subprocess.Popen[bytes], extra: list[int] | None = None) -> None:
    """Stop ``proc`` and everything below it (and ``extra`` PIDs), whatever state they are in."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for pid in extra or []:
        with contextlib.suppress(psutil.NoSuchProcess):
            family.append(psutil.Process(pid))
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(family, timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def wait_until(predicate: Callable[[], object], timeout: float = 60, what: str = "") -> object:
    """Poll ``predicate`` until it returns something truthy, or fail the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
