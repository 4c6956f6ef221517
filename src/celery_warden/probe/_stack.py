"""A stack dump on demand, even from a process whose task holds the GIL in C code.

Python's own signal handlers run between bytecodes, so a task stuck in C never runs
them; ``faulthandler`` writes the stacks from the C handler itself. The probe registers
it for ``STACK_SIGNAL``, a real-time signal nothing else in a worker uses (SIGUSR1 is
billiard's soft time limit in a pool child), writing to ``<control dir>/<pid>.stack``:
the same private directory as the control socket, so only the worker's user reads it.

The warden sends the signal only after ``/proc/PID/status`` shows a handler for it
(``celery_warden.stackdump.has_handler``): a real-time signal nobody handles ends the
process. It never truncates the file: it notes the size, signals, and reads what was
appended.

This module imports nothing from Celery, so the warden can import ``STACK_SIGNAL``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import stat

__all__ = ["STACK_ENV", "STACK_SIGNAL", "StackDump", "stack_name"]

STACK_ENV = "CELERY_WARDEN_STACK_SIGNAL"  # "0": no stack dump handler
# Not SIGRTMIN itself: libraries that take a real-time signal (timers, profilers) take
# the first ones. Resolved at run time, as libc numbers them (the worker's hello says it).
STACK_SIGNAL = int(signal.SIGRTMIN) + 7


def stack_name(pid: int) -> str:
    return f"{pid}.stack"


class StackDump:
    """This process's stack dump handler and the file it writes to."""

    def __init__(self) -> None:
        self.path: str | None = None
        self._fd = -1
        self._pid = 0
        os.register_at_fork(after_in_child=self._forget)

    def enable(self, directory: str) -> str | None:
        """Register the handler, writing to ``directory``/<pid>.stack (once per process);
        the file's path, or None when turned off or the file cannot be made."""
        pid = os.getpid()
        if self._pid == pid:
            return self.path
        self._pid = pid
        if os.environ.get(STACK_ENV) == "0":
            return None
        path = os.path.join(directory, stack_name(pid))
        # O_NOFOLLOW: a symlink planted at the name is refused, not followed. O_NONBLOCK:
        # a FIFO there cannot block the worker's start (it fails the regular-file test).
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(path, flags | os.O_NONBLOCK, 0o600)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise OSError(f"{path} is not a file of ours")
            os.fchmod(fd, 0o600)  # a file of ours left by a dead process keeps its mode
            faulthandler.register(STACK_SIGNAL, file=fd, all_threads=True, chain=False)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.path = fd, path
        return path

    def _forget(self) -> None:
        """In a forked child the handler still writes to the parent's file: remove it (a
        pool child registers its own at worker_process_init)."""
        if self._fd >= 0:
            faulthandler.unregister(STACK_SIGNAL)
            os.close(self._fd)
        self._fd, self.path = -1, None

    def close(self) -> None:
        """Unregister and remove the file (for tests and embedding; workers just exit)."""
        path = self.path
        self._forget()
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def remove_file(self) -> None:
        """Remove the file at exit, keeping the handler: a signal arriving in the last
        moments must still find one (a real-time signal nobody handles would end the
        process with another exit code than the one billiard chose)."""
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
