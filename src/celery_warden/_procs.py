"""Everything the warden reads about processes: the only module that reads ``/proc``
(the probe reads its own ``/proc/self/statm`` from inside the worker) or imports psutil.

The hot path (a sweep every second over every process of every watched tree) reads
``/proc/PID/stat`` directly: one read gives state, parent, CPU, threads, start time and
RSS, about 10 us, where psutil reading the same fields costs nearly twice as much. psutil is
used where its portability is worth more than microseconds (boot time, owner).

Processes vanish at any moment. Every reader raises :class:`Vanished` when the process
is gone (``ENOENT`` on open, or ``ESRCH`` on read when it died between the two) and lets
``PermissionError`` through, so callers record *why* a figure is missing.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil

from celery_warden._argv import is_pool_title, is_worker_argv
from celery_warden.exceptions import NotAWorker, ProcessNotFound

__all__ = [
    "CLK_TCK",
    "PAGE_SIZE",
    "IdentityMismatch",
    "ProcessHandle",
    "Smaps",
    "Stat",
    "Vanished",
    "age_seconds",
    "count_open_fds",
    "describe_worker_pid",
    "find_worker_masters",
    "has_exited",
    "last_pid",
    "list_pids",
    "open_verified",
    "owner_uid",
    "read_cmdline",
    "read_peak_rss",
    "read_smaps",
    "read_stat",
    "start_epoch",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_BOOT_TIME = psutil.boot_time()
_PROC = "/proc"


class Vanished(Exception):
    """The process is gone."""


class IdentityMismatch(Exception):
    """The PID now names another process than the one the warden saw (reused)."""


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of ``/proc/PID/stat`` the warden uses (see proc(5))."""

    pid: int
    comm: str  # the executable's name (changes on exec)
    state: str  # one letter: R S D Z T t X I
    ppid: int
    utime_ticks: int
    stime_ticks: int
    threads: int
    start_ticks: int
    rss_pages: int
    exit_status: int | None  # waitpid-style status, readable while a zombie (Linux 3.5+)

    @property
    def rss_bytes(self) -> int:
        return self.rss_pages * PAGE_SIZE

    @property
    def cpu_user_seconds(self) -> float:
        return self.utime_ticks / CLK_TCK

    @property
    def cpu_system_seconds(self) -> float:
        return self.stime_ticks / CLK_TCK


@dataclass(frozen=True, slots=True)
class Smaps:
    """Memory figures from ``/proc/PID/smaps_rollup``, in bytes.

    USS is private clean + private dirty, as psutil defines it: what the kernel would
    free if the process exited now. Shared is shared clean + shared dirty.
    """

    rss_bytes: int
    pss_bytes: int
    uss_bytes: int
    swap_bytes: int
    shared_bytes: int


def _read(path: str) -> bytes:
    # os.open/os.read, not open(): no buffered file object to build, which halves the
    # cost of a /proc read (about 10 us instead of 20 here, docs/benchmarks.md).
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError) as exc:  # ESRCH: it is exiting
        raise Vanished(path) from exc
    try:
        chunks = []
        while chunk := os.read(fd, 8192):
            chunks.append(chunk)
        return b"".join(chunks)
    except ProcessLookupError as exc:  # ESRCH: it died between open() and read()
        raise Vanished(path) from exc
    finally:
        os.close(fd)


def read_stat(pid: int) -> Stat:
    """Read ``/proc/PID/stat``; raises :class:`Vanished` if the process is gone."""
    data = _read(f"{_PROC}/{pid}/stat")
    # The command name (field 2) is in parentheses and may itself hold spaces or
    # parentheses, so split after the *last* closing parenthesis.
    close = data.rfind(b")")
    rest = data[close + 2 :].split()
    if not rest:
        raise Vanished(pid)
    return Stat(
        pid=pid,
        comm=data[data.find(b"(") + 1 : close].decode("utf-8", "replace"),
        state=rest[0].decode("ascii", "replace"),
        ppid=int(rest[1]),
        utime_ticks=int(rest[11]),
        stime_ticks=int(rest[12]),
        threads=int(rest[17]),
        start_ticks=int(rest[19]),
        rss_pages=int(rest[21]),
        exit_status=int(rest[49]) if len(rest) > 49 else None,
    )


def count_open_fds(pid: int) -> int:
    """Count ``/proc/PID/fd`` entries; needs the same user (or CAP_SYS_PTRACE)."""
    path = f"{_PROC}/{pid}/fd"
    try:
        # Since Linux 6.2 the directory's size is its number of open files ("proc:
        # report open files as size in stat() for /proc/pid/fd"): a stat instead of a
        # listing, 4 us instead of 15. Older kernels say 0: list it then.
        count = os.stat(path).st_size
        return count if count > 0 else len(os.listdir(path))
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise Vanished(pid) from exc


def read_smaps(pid: int) -> Smaps:
    """Read ``/proc/PID/smaps_rollup`` (Linux 4.14+): costs about 9 us per MB resident."""
    fields: dict[bytes, int] = {}
    for line in _read(f"{_PROC}/{pid}/smaps_rollup").splitlines()[1:]:
        key, _, value = line.partition(b":")
        parts = value.split()
        if parts:
            fields[key] = int(parts[0]) * 1024  # the kernel writes kB
    if not fields:  # a zombie or a kernel thread: no mappings
        raise Vanished(pid)
    return Smaps(
        rss_bytes=fields.get(b"Rss", 0),
        pss_bytes=fields.get(b"Pss", 0),
        uss_bytes=fields.get(b"Private_Clean", 0) + fields.get(b"Private_Dirty", 0),
        swap_bytes=fields.get(b"Swap", 0),
        shared_bytes=fields.get(b"Shared_Clean", 0) + fields.get(b"Shared_Dirty", 0),
    )


def read_peak_rss(pid: int) -> int | None:
    """``VmHWM`` from ``/proc/PID/status``: the peak RSS (what ``ru_maxrss`` reports)."""
    for line in _read(f"{_PROC}/{pid}/status").splitlines():
        if line.startswith(b"VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def read_cmdline(pid: int) -> list[str]:
    """The argument vector; empty for kernel threads and zombies."""
    raw = _read(f"{_PROC}/{pid}/cmdline")
    # setproctitle may overwrite argv with one string padded by NULs or spaces.
    return [part.decode("utf-8", "replace") for part in raw.rstrip(b"\0").split(b"\0") if part]


def list_pids() -> list[int]:
    """Every PID visible in this PID namespace, ascending."""
    return sorted(int(name) for name in os.listdir(_PROC) if name.isdigit())


def last_pid() -> int:
    """The PID the kernel allocated last (the last field of ``/proc/loadavg``).

    While it does not move, no process was created anywhere, so a sweep can skip the
    full scan for new descendants.
    """
    return int(_read(f"{_PROC}/loadavg").split()[-1])


def age_seconds(start_ticks: int) -> float:
    """How long ago a process started, on the boot-time clock (no wall-clock step
    changes it)."""
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / CLK_TCK)


def start_epoch(start_ticks: int) -> float:
    """Convert a start time in clock ticks since boot to epoch seconds."""
    return _BOOT_TIME + start_ticks / CLK_TCK


def iter_cmdlines() -> Iterator[tuple[int, list[str]]]:
    """Every process's PID and argument vector, skipping those that vanish mid-scan."""
    for pid in list_pids():
        try:
            yield pid, read_cmdline(pid)
        except (Vanished, PermissionError):
            continue


def find_worker_masters(pattern: str | None = None) -> list[int]:
    """PIDs of Celery worker masters whose command line contains ``pattern``.

    A pool child is forked without exec, so it carries its master's command line; a
    worker process whose parent has the same command line is a child, not a master.
    """
    argvs = dict(iter_cmdlines())
    masters = []
    for pid, argv in argvs.items():
        if not is_worker_argv(argv) or is_pool_title(argv):
            continue
        if pattern is not None and pattern not in " ".join(argv):
            continue
        try:
            ppid = read_stat(pid).ppid
        except (Vanished, PermissionError):
            continue
        if argvs.get(ppid) == argv:
            continue
        masters.append(pid)
    return masters


def describe_worker_pid(pid: int) -> int:
    """Check ``pid`` names a Celery worker and return its master's PID.

    A pool child's PID is accepted and resolved to its master, since the whole tree is
    what the warden watches.
    """
    try:
        argv = read_cmdline(pid)
        stat = read_stat(pid)
    except Vanished:
        raise ProcessNotFound(f"no process with PID {pid}; check it with `ps -p {pid}`") from None
    except PermissionError:
        raise NotAWorker(
            f"PID {pid} belongs to another user and cannot be read; run as that user"
        ) from None
    if not is_worker_argv(argv):
        shown = " ".join(argv)[:80] or "(no command line)"
        raise NotAWorker(
            f"PID {pid} is not a Celery worker ({shown!r}); pass the PID of a "
            "`celery ... worker` process"
        )
    if is_pool_title(argv):  # setproctitle'd: "[celeryd: w1@host:ForkPoolWorker-3]"
        return stat.ppid
    with contextlib.suppress(Vanished, PermissionError):
        if read_cmdline(stat.ppid) == argv:
            return stat.ppid
    return pid


@dataclass(frozen=True, slots=True)
class ProcessHandle:
    """A pidfd opened on a process whose identity was verified after opening."""

    pid: int
    start_ticks: int
    fd: int

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


# A test hook: called with the PID between a scan's reads and the pidfd_open, so a test
# can reuse the PID in exactly that gap (RELIABILITY.md, A2). None in production.
before_open: Callable[[int], None] | None = None


def open_verified(pid: int, start_ticks: int, argv: list[str] | None = None) -> ProcessHandle:
    """Open a pidfd on the process a scan saw as ``(pid, start_ticks, argv)``.

    The start time and the command line (unless ``argv`` is None) are read again
    *after* the open: if either changed, the PID was reused between the scan and the
    open (or the process exec'd), and :class:`IdentityMismatch` is raised with the
    descriptor closed. From then on the pidfd names that one process whatever happens
    to the PID. Checking *before* the open would not do: psutil's (pid, create_time)
    check misses a reuse within one clock tick (RELIABILITY.md, point 6).
    """
    if before_open is not None:
        before_open(pid)
    if pid <= 2 or pid == os.getpid():
        raise ValueError(f"refusing to open a handle on PID {pid}")
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise Vanished(pid) from None
    try:
        stat = read_stat(pid)
        if stat.start_ticks != start_ticks:
            raise IdentityMismatch(
                f"PID {pid} started at tick {stat.start_ticks}, not {start_ticks}"
            )
        if argv is not None and stat.state != "Z":
            now = read_cmdline(pid)
            if now != argv:
                raise IdentityMismatch(f"PID {pid} runs {' '.join(now)[:80]!r} now")
    except BaseException:
        os.close(fd)
        raise
    return ProcessHandle(pid=pid, start_ticks=start_ticks, fd=fd)


def has_exited(handle: ProcessHandle, timeout_seconds: float = 0.0) -> bool:
    """Whether the process behind ``handle`` has exited (a pidfd turns readable when
    it does, zombie or reaped), waiting up to ``timeout_seconds``."""
    poller = select.poll()
    poller.register(handle.fd, select.POLLIN)
    deadline = time.monotonic() + timeout_seconds
    while True:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            return bool(poller.poll(remaining * 1000))
        except InterruptedError:  # pragma: no cover - PEP 475 retries, but be sure
            if time.monotonic() >= deadline:
                return False


def owner_uid(pid: int) -> int:
    """The real user of ``pid`` (the first ``Uid:`` of its status): ``/proc/PID`` is
    owned by the *effective* one, which a setuid-root program changes."""
    for line in _read(f"{_PROC}/{pid}/status").splitlines():
        if line.startswith(b"Uid:"):
            return int(line.split()[1])
    raise Vanished(pid)
