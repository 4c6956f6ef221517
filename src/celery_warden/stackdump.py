"""The warden's side of the probe's stack dump (``probe/_stack.py``): where a process's
dump file is, whether it can take the signal, and what it wrote.

Sending the signal is not done here: every signal the warden sends goes through its one
audited function. The order is: :func:`stack_file_for`, :func:`has_handler` (a real-time
signal with no handler ends the process), note the file's size, send
``probe._stack.STACK_SIGNAL``, then :func:`read_new` from that size. The file is never
truncated, so two dumps in a row cannot clobber each other.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import psutil

from celery_warden.probe._control import control_dirs
from celery_warden.probe._stack import stack_name

__all__ = ["MAX_DUMP", "has_handler", "read_new", "stack_file_for"]

MAX_DUMP = 4 * 1024 * 1024  # faulthandler writes at most 100 frames of at most 100 threads
_SETTLE_SECONDS = 0.05  # the dump is complete once the file stops growing this long
_POLL_SECONDS = 0.01


def stack_file_for(pid: int) -> Path | None:
    """``pid``'s stack dump file, checked: a regular file (not a symlink) of the
    process's user, in one of its control directories; None where there is none."""
    try:
        uid = psutil.Process(pid).uids().effective
    except (psutil.Error, ValueError):
        return None
    for directory in control_dirs(uid):
        path = os.path.join(directory, stack_name(pid))
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_uid == uid:
            return Path(path)
        return None  # something else took the name: not believed
    return None


def has_handler(pid: int, signum: int) -> bool:
    """Whether ``pid`` catches ``signum`` now, by the ``SigCgt`` mask of
    ``/proc/PID/status`` (bit ``signum - 1``); False if it cannot be read."""
    try:
        with open(f"/proc/{int(pid)}/status", "rb") as f:
            for line in f:
                if line.startswith(b"SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        return False
    return False


def read_new(path: Path | str, offset: int, timeout: float) -> str:
    """What was appended to ``path`` after ``offset``: waits until the file has grown
    and then stopped growing for a moment (faulthandler writes a dump in many small
    writes), or until ``timeout`` seconds have passed; "" if nothing came."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        size, settled_at = offset, None
        while True:
            now = time.monotonic()
            current = os.fstat(fd).st_size
            if current != size:
                size, settled_at = current, now + _SETTLE_SECONDS
            elif settled_at is not None and now >= settled_at:
                break
            if now >= deadline:
                break
            time.sleep(_POLL_SECONDS)
        if size <= offset:
            return ""
        data = os.pread(fd, min(size - offset, MAX_DUMP), offset)
    except OSError:
        return ""
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace")
