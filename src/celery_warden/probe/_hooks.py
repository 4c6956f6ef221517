"""The in-worker probe: Celery signal receivers that record every task.

Rules every receiver here follows (Celery calls them inline, around every task):
- never raise into Celery: each body is wrapped, and a failure is counted, not logged;
- never block: the channel drops rather than waits;
- stay cheap: a clock read, a ``pread`` of ``/proc/self/statm`` through a descriptor
  kept open, and one datagram per task event.

Receivers are connected with ``weak=False`` (Celery holds receivers weakly by default,
so a closure would vanish) and a ``dispatch_uid`` (connecting twice is harmless).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery_warden.probe import wire
from celery_warden.probe._channel import Channel

__all__ = ["Probe", "connect"]

_EX_RECYCLE = 0x9B  # billiard's exit code for a child that leaves by its own limits
_MAX_RUNNING = 1024  # tasks remembered between prerun and postrun, per process


def _read_start_ticks() -> int:
    with open("/proc/self/stat", "rb") as f:
        data = f.read()
    return int(data[data.rfind(b")") + 2 :].split()[19])


class Probe:
    """Per-process state of the probe; survives fork by re-reading its identity."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.errors = 0
        self.tasks_done = 0
        self.max_tasks_per_child: int | None = None
        self.max_memory_per_child_kb: int | None = None
        self._pid = 0
        self._ticks = 0
        self._statm = -1
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        self._running: dict[str, tuple[float, float]] = {}

    def _identity(self) -> tuple[int, int]:
        pid = os.getpid()
        if pid != self._pid:  # first use, or we are a freshly forked child
            if self._statm >= 0:
                os.close(self._statm)
            self._pid, self._ticks = pid, _read_start_ticks()
            # /proc/self is resolved at open time: open it in *this* process.
            self._statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
            self._running.clear()
            self.tasks_done = 0
        return self._pid, self._ticks

    def close(self) -> None:
        """Release the descriptors (for tests and embedding; workers just exit)."""
        self.channel.close()
        if self._statm >= 0:
            os.close(self._statm)
            self._statm = -1

    def rss_bytes(self) -> int | None:
        """Current RSS from statm's second field, read without reopening the file."""
        try:
            return int(os.pread(self._statm, 64, 0).split()[1]) * self._page_size
        except (OSError, IndexError, ValueError):
            return None

    # -- receivers -------------------------------------------------------------------

    def on_worker_ready(self, sender: Any = None, instance: Any = None, **_: Any) -> None:
        """celeryd_after_setup: the master describes the worker once."""
        try:
            pid, ticks = self._identity()
            self.max_tasks_per_child = getattr(instance, "max_tasks_per_child", None) or None
            self.max_memory_per_child_kb = getattr(instance, "max_memory_per_child", None) or None
            pool = getattr(instance, "pool_cls", None)
            pool_name = getattr(pool, "__module__", str(pool)).rsplit(".", 1)[-1]
            concurrency = int(getattr(instance, "concurrency", 0) or 0)
            self.channel.send(
                wire.encode(
                    "w",
                    pid,
                    ticks,
                    str(sender),
                    pool_name,
                    concurrency,
                    self.max_tasks_per_child,
                    self.max_memory_per_child_kb,
                )
            )
        except Exception:
            self.errors += 1

    def on_process_init(self, **_: Any) -> None:
        """worker_process_init: a pool child announces itself, so the warden knows every
        child even if it lives less than one sweep (a recycle every few tasks)."""
        try:
            pid, ticks = self._identity()
            with open("/proc/self/cmdline", "rb") as f:
                argv = f.read().rstrip(b"\0").replace(b"\0", b" ")
            cmdline = argv.decode("utf-8", "replace")[:1000]
            self.channel.send(wire.encode("c", pid, ticks, os.getppid(), time.time(), cmdline))
        except Exception:
            self.errors += 1

    def on_task_prerun(self, task_id: str = "", task: Any = None, **_: Any) -> None:
        """task_prerun: remember when the task started and say so."""
        try:
            pid, ticks = self._identity()
            started = time.time()
            if len(self._running) >= _MAX_RUNNING:
                self._running.clear()  # bounded: lost postruns must not grow this
            self._running[task_id] = (started, time.monotonic())
            name = str(getattr(task, "name", "?"))[: wire.MAX_NAME]
            self.channel.send(wire.encode("s", pid, ticks, task_id, name, started))
        except Exception:
            self.errors += 1

    def on_task_postrun(
        self, task_id: str = "", task: Any = None, state: str | None = None, **_: Any
    ) -> None:
        """task_postrun: how it ended, how long it took, and the RSS right after."""
        try:
            pid, ticks = self._identity()
            ended, now = time.time(), time.monotonic()
            # A postrun without its prerun (the table was cleared) still counts, with
            # a zero duration, rather than being lost.
            started_at, started = self._running.pop(task_id, (ended, now))
            self.tasks_done += 1
            name = str(getattr(task, "name", "?"))[: wire.MAX_NAME]
            message = wire.encode(
                "f",
                pid,
                ticks,
                task_id,
                name,
                started_at,
                ended,
                now - started,
                state or "",
                self.rss_bytes(),
            )
            self.channel.send(message)
        except Exception:
            self.errors += 1

    def on_process_shutdown(self, pid: int = 0, exitcode: int | None = None, **_: Any) -> None:
        """worker_process_shutdown: a pool child leaves; say why when we can tell."""
        try:
            own_pid, ticks = self._identity()
            reason = self._exit_reason(exitcode)
            if exitcode is not None and exitcode < 0:
                # billiard exits with -(256 - signum) when a signal stopped the child.
                exitcode = -(256 + exitcode) if exitcode <= -128 else exitcode
            self.channel.send(
                wire.encode(
                    "x", own_pid, ticks, time.time(), exitcode, reason, self.channel.dropped
                )
            )
        except Exception:
            self.errors += 1

    def _exit_reason(self, exitcode: int | None) -> str:
        if exitcode is not None and exitcode < 0:
            return "killed"
        if exitcode != _EX_RECYCLE:
            return "exited"
        # billiard exits with EX_RECYCLE for both limits; tell them apart by the count.
        if self.max_tasks_per_child and self.tasks_done >= self.max_tasks_per_child:
            return "max-tasks"
        if self.max_memory_per_child_kb:
            return "max-memory"
        return "recycled"


_probe: Probe | None = None


def connect(socket_path: str) -> Probe:
    """Connect the probe's receivers to Celery's signals (idempotent).

    Celery's signals are module-level objects, so connecting before the app is even
    imported covers every app the process will load.
    """
    global _probe  # noqa: PLW0603 - one probe per process, by design
    if _probe is not None:
        return _probe
    from celery import signals

    probe = Probe(Channel(socket_path))
    pairs = [
        (signals.celeryd_after_setup, probe.on_worker_ready),
        (signals.worker_process_init, probe.on_process_init),
        (signals.task_prerun, probe.on_task_prerun),
        (signals.task_postrun, probe.on_task_postrun),
        (signals.worker_process_shutdown, probe.on_process_shutdown),
    ]
    for signal, receiver in pairs:
        signal.connect(receiver, weak=False, dispatch_uid=f"celery_warden.{receiver.__name__}")
    _probe = probe
    return probe
