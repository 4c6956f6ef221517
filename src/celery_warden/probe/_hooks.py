"""The in-worker probe: Celery signal receivers that record every task.

Rules every receiver here follows (Celery calls them inline, around every task):
- never raise into Celery: each body is wrapped, and a failure is counted, not logged;
- never block: the channel drops rather than waits;
- stay cheap (docs/benchmarks.md has the cost): per call, two reads of the thread's CPU
  clock and of the allocator's block count, a ``pread`` of ``/proc/self/statm`` through a
  descriptor kept open, and two messages; ``smaps_rollup`` (USS, PSS), which costs far
  more, at most once every ``SMAPS_SECONDS`` per process.

Receivers are connected with ``weak=False`` (Celery holds receivers weakly by default,
so a closure would vanish) and a ``dispatch_uid`` (connecting twice is harmless).

What is measured per pool: ``prefork`` and ``solo`` run one task at a time per process,
so every figure belongs to the task. ``threads`` runs several at once in one process:
CPU is still the task's own (the thread's clock), but RSS and the block count are the
process's, shared with the tasks that overlapped. ``gevent`` and ``eventlet`` run every
task on one thread: the thread's CPU clock would count the other greenlets too, so CPU
is not recorded there (None), and wall time includes waiting for other greenlets.
"""

from __future__ import annotations

import json
import json.encoder
import os
import random
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from celery_warden.probe import wire
from celery_warden.probe._channel import Channel, renew_locks_after_fork
from celery_warden.probe._control import ControlServer

if TYPE_CHECKING:
    from celery_warden.probe._trace import Trace

__all__ = ["BLOCKS_SAMPLE_ENV", "HEARTBEAT_ENV", "Probe", "connect"]

HEARTBEAT_ENV = "CELERY_WARDEN_HEARTBEAT_SECONDS"
CONTROL_ENV = "CELERY_WARDEN_CONTROL"  # "0": no control socket (no diagnose)
BLOCKS_SAMPLE_ENV = "CELERY_WARDEN_BLOCKS_SAMPLE"
HEARTBEAT_SECONDS = 5.0
SMAPS_SECONDS = 10.0  # at most one smaps_rollup read per process in this long

_EX_RECYCLE = 0x9B  # billiard's exit code for a child that leaves by its own limits
_MAX_RUNNING = 1024  # tasks remembered between prerun and postrun, per process
_MAX_NAMES = 4096  # task names whose JSON form is cached
BLOCKS_SAMPLE = 1 / 16  # the share of calls around which the allocator's blocks are counted

# The two per-call messages are formatted by hand (docs/benchmarks.md: json.dumps cost a
# third of the probe): numbers by repr, which is JSON for finite floats and for ints,
# strings by the json module's own C escaper.
_quote = json.encoder.encode_basestring_ascii
_POOL_NAMES = {"thread": "threads"}  # module name -> the name `--pool` takes
_GREEN_POOLS = frozenset({"gevent", "eventlet"})

# What prerun remembers of a call, in a list for speed (indexes below).
_T_EPOCH, _T_MONO, _T_CPU, _T_BLOCKS, _T_THREAD, _T_NAME, _T_EXC, _T_RETRIES = range(8)


def _read_start_ticks() -> int:
    with open("/proc/self/stat", "rb") as f:
        data = f.read()
    return int(data[data.rfind(b")") + 2 :].split()[19])


def _env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value >= 0 else default


def _parse_smaps_rollup(data: bytes) -> tuple[int | None, int | None]:
    """USS (private clean + dirty) and PSS, in bytes, from ``smaps_rollup``."""
    uss = pss = None
    for line in data.splitlines():
        if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
            uss = (uss or 0) + int(line.split()[1]) * 1024
        elif line.startswith(b"Pss:"):
            pss = int(line.split()[1]) * 1024
    return uss, pss


class Probe:
    """Per-process state of the probe; survives fork by re-reading its identity."""

    def __init__(
        self,
        channel: Channel,
        *,
        heartbeat_seconds: float | None = None,
        blocks_sample: float | None = None,
        control: bool = False,
    ) -> None:
        self.channel = channel
        self.control = control  # serve diagnoses (connect() turns it on)
        if blocks_sample is None:
            blocks_sample = _env_float(BLOCKS_SAMPLE_ENV, BLOCKS_SAMPLE)
        self.blocks_sample = blocks_sample
        self.errors = 0
        self.tasks_done = 0
        self.max_tasks_per_child: int | None = None
        self.max_memory_per_child_kb: int | None = None
        self.green = False  # gevent/eventlet: one thread runs every task
        self.pool_name = ""
        self._master_pid = 0  # the process celeryd_after_setup ran in
        self.trace: Trace | None = None  # a diagnosis tracing a task name here
        self._control: ControlServer | None = None
        if heartbeat_seconds is None:
            heartbeat_seconds = _env_float(HEARTBEAT_ENV, HEARTBEAT_SECONDS)
        self.heartbeat_seconds = heartbeat_seconds
        self._pid = 0
        self._ticks = 0
        self._statm = -1
        self._smaps = -1
        self._smaps_due = 0.0
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        # Keyed by task id and thread: a redelivered id may run twice at once (threads).
        self._running: dict[tuple[str, int], list[Any]] = {}
        self._quoted_names: dict[object, str] = {}
        self._beating_in = 0  # the pid whose heartbeat thread runs (threads die at fork)
        self._stop = threading.Event()
        self._heartbeat_lock = threading.Lock()
        self._identity_lock = threading.Lock()
        renew_locks_after_fork(self, "_heartbeat_lock", "_identity_lock")

    def _identity(self) -> tuple[int, int]:
        pid = os.getpid()
        if pid != self._pid:  # first use, or we are a freshly forked child
            # Locked: a threads pool may start its first calls at once, and a second
            # thread must not clear the call the first has just put down.
            with self._identity_lock:
                if pid != self._pid:
                    self._close_files()
                    ticks = _read_start_ticks()
                    # /proc/self is resolved at open time: open it in *this* process.
                    self._statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
                    self._running.clear()
                    self._smaps_due = 0.0
                    self.tasks_done = 0
                    self._ticks = ticks
                    self._pid = pid  # last: other threads go on once it is set
        return self._pid, self._ticks

    def identity(self) -> tuple[int, int]:
        """This process's pid and start time (clock ticks since boot)."""
        return self._identity()

    def is_master(self) -> bool:
        """Whether this is the worker's main process (a pool child is a fork of it)."""
        return os.getpid() == self._master_pid

    def running_names(self) -> list[str]:
        """The names of the tasks this process runs now."""
        return [json.loads(call[_T_NAME]) for call in list(self._running.values())]

    def start_control(self) -> str | None:
        """Serve ``celery-warden diagnose`` in this process (once per process)."""
        if not self.control:
            return None
        try:
            if self._control is None:
                from celery_warden.probe._ops import operations

                self._control = ControlServer(operations(self))
            return self._control.start()
        except Exception:
            self.errors += 1
            return None

    def _close_files(self) -> None:
        for fd in (self._statm, self._smaps):
            if fd >= 0:
                os.close(fd)
        self._statm = self._smaps = -1

    def close(self) -> None:
        """Stop the heartbeat and release the descriptors (for tests and embedding;
        workers just exit)."""
        self._stop.set()
        self.channel.close()
        if self._control is not None:
            self._control.close()
        self._close_files()

    def rss_bytes(self) -> int | None:
        """Current RSS from statm's second field, read without reopening the file."""
        try:
            return int(os.pread(self._statm, 64, 0).split()[1]) * self._page_size
        except (OSError, IndexError, ValueError):
            return None

    def smaps_if_due(self, now: float) -> tuple[int | None, int | None]:
        """USS and PSS, at most once every ``SMAPS_SECONDS``; (None, None) between."""
        if now < self._smaps_due:
            return None, None
        self._smaps_due = now + SMAPS_SECONDS
        try:
            if self._smaps < 0:
                self._smaps = os.open("/proc/self/smaps_rollup", os.O_RDONLY | os.O_CLOEXEC)
            return _parse_smaps_rollup(os.pread(self._smaps, 4096, 0))
        except (OSError, ValueError, IndexError):
            return None, None  # an old kernel without smaps_rollup: the sampler has it

    # -- receivers -------------------------------------------------------------------

    def on_worker_ready(self, sender: Any = None, instance: Any = None, **_: Any) -> None:
        """celeryd_after_setup: the master describes the worker once."""
        try:
            pid, ticks = self._identity()
            self.max_tasks_per_child = getattr(instance, "max_tasks_per_child", None) or None
            self.max_memory_per_child_kb = getattr(instance, "max_memory_per_child", None) or None
            pool = getattr(instance, "pool_cls", None)
            pool_name = getattr(pool, "__module__", str(pool)).rsplit(".", 1)[-1]
            pool_name = self.pool_name = _POOL_NAMES.get(pool_name, pool_name)
            self._master_pid = pid
            self.green = pool_name in _GREEN_POOLS
            concurrency = int(getattr(instance, "concurrency", 0) or 0)
            self.start_control()  # the master too: its own memory can be asked for
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
            self._start_heartbeat()
        except Exception:
            self.errors += 1

    def on_task_prerun(self, task_id: str = "", task: Any = None, **_: Any) -> None:
        """task_prerun: remember when and how the call started, and say so."""
        try:
            pid, ticks = self._pid, self._ticks
            if os.getpid() != pid:
                pid, ticks = self._identity()
            if self._beating_in != pid:
                self._start_heartbeat()  # solo and threads pools run tasks in the master
            started = time.time()
            if len(self._running) >= _MAX_RUNNING:
                self._running.clear()  # bounded: lost postruns must not grow this
            name = task.name
            quoted = self._quoted_names.get(name)
            if quoted is None:
                quoted = self._quote_name(name)
            retries = getattr(getattr(task, "request", None), "retries", 0)
            task_id = str(task_id)[: wire.MAX_NAME]
            thread = threading.get_ident()
            self._running[task_id, thread] = [
                started,
                time.monotonic(),
                time.thread_time(),
                # The allocator's block count walks its pools (it costs more as the heap
                # grows), so it is read around a random sample of calls: the mean per
                # call stays unbiased and the cost a fraction.
                sys.getallocatedblocks() if random.random() < self.blocks_sample else None,  # noqa: S311 - sampling, not secrets
                thread,
                quoted,
                None,
                retries if type(retries) is int else 0,
            ]
            self.channel.send(
                f'["s",{pid},{ticks},{_quote(task_id)},{quoted},{started!r}]\n'.encode()
            )
            trace = self.trace
            if trace is not None:
                trace.before_task(str(name))
        except Exception:
            self.errors += 1

    def _quote_name(self, name: object) -> str:
        """A task name as a JSON string, truncated; cached, there are few names."""
        if len(self._quoted_names) >= _MAX_NAMES:
            self._quoted_names.clear()
        quoted = self._quoted_names[name] = _quote(str(name)[: wire.MAX_NAME])
        return quoted

    def on_task_failure(
        self, task_id: str = "", exception: BaseException | None = None, **_: Any
    ) -> None:
        """task_failure (sent before postrun): keep the exception's type for postrun."""
        self._note_exception(task_id, exception)

    def on_task_retry(self, request: Any = None, reason: Any = None, **_: Any) -> None:
        """task_retry (sent before postrun): keep why the call asked to be retried (the
        exception Celery's ``Retry`` wraps, when it wraps one)."""
        self._note_exception(getattr(request, "id", ""), getattr(reason, "exc", None) or reason)

    def _note_exception(self, task_id: object, exception: object) -> None:
        try:
            call = self._running.get((str(task_id)[: wire.MAX_NAME], threading.get_ident()))
            if call is not None and isinstance(exception, BaseException):
                kind = type(exception)
                call[_T_EXC] = f"{kind.__module__}.{kind.__qualname__}"[: wire.MAX_NAME]
        except Exception:
            self.errors += 1

    def on_task_postrun(
        self, task_id: str = "", task: Any = None, state: str | None = None, **_: Any
    ) -> None:
        """task_postrun: how it ended, what it cost, and the memory right after."""
        try:
            trace = self.trace
            if trace is not None:
                trace.after_task(str(getattr(task, "name", "")))
            pid, ticks = self._pid, self._ticks
            if os.getpid() != pid:
                pid, ticks = self._identity()
            ended, now, cpu_now = time.time(), time.monotonic(), time.thread_time()
            task_id = str(task_id)[: wire.MAX_NAME]
            call = self._running.pop((task_id, threading.get_ident()), None)
            self.tasks_done += 1
            if call is None:
                # A postrun without its prerun (the table was cleared, or a process
                # forked inside the task) still counts, with what can be known.
                call = [ended, now, None, None, 0, self._quote_name(task.name), None, 0]
            cpu = "null"
            if call[_T_CPU] is not None and not self.green:
                cpu = repr(max(0.0, cpu_now - call[_T_CPU]))
            blocks = "null"
            if call[_T_BLOCKS] is not None:
                blocks = str(sys.getallocatedblocks() - call[_T_BLOCKS])
            uss = pss = None
            if now >= self._smaps_due:
                uss, pss = self.smaps_if_due(now)
            rss = self.rss_bytes()
            exception = call[_T_EXC]
            message = (
                f'["f",{pid},{ticks},{_quote(task_id)},{call[_T_NAME]},{call[_T_EPOCH]!r},'
                f"{ended!r},{now - call[_T_MONO]!r},{_quote(str(state or ''))},"
                f"{'null' if rss is None else rss},{cpu},{'null' if uss is None else uss},"
                f"{'null' if pss is None else pss},{blocks},"
                f"{'null' if exception is None else _quote(exception)},{call[_T_RETRIES]}]\n"
            )
            self.channel.send(message.encode())
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

    # -- heartbeats ------------------------------------------------------------------

    def heartbeat(self) -> bytes:
        """The heartbeat message: the tasks this process runs now, since when, and the
        CPU each one's thread has used so far. It stays within the listener's line
        limit: past it, the tasks that do not fit are left out of this beat."""
        pid, ticks = self._identity()
        alive = {thread.ident for thread in threading.enumerate()}
        running: list[list[Any]] = []
        size = 200
        for (task_id, thread), call in list(self._running.items())[: wire.MAX_RUNNING]:
            cpu = None
            # Only a live thread's clock may be read: a finished thread's id is stale.
            if not self.green and call[_T_CPU] is not None and thread in alive:
                try:
                    clock = time.pthread_getcpuclockid(thread)
                    cpu = max(0.0, time.clock_gettime(clock) - call[_T_CPU])
                except (OSError, OverflowError):
                    cpu = None  # the call ended under us
            size += len(task_id) + len(call[_T_NAME]) + 60
            if size > wire.MAX_LINE // 2:
                break
            name = json.loads(call[_T_NAME])  # kept JSON-quoted for the per-call messages
            running.append([task_id, name, call[_T_EPOCH], cpu])
        return wire.encode("h", pid, ticks, time.time(), self.channel.dropped, running)

    def _start_heartbeat(self) -> None:
        """Start this process's heartbeat thread (threads do not survive a fork, so a
        pool child starts its own)."""
        pid = os.getpid()
        self.start_control()  # at most once per process
        with self._heartbeat_lock:  # two first tasks at once in a threads pool
            if self._beating_in == pid or self.heartbeat_seconds <= 0:
                return
            self._beating_in = pid
        self._stop = threading.Event()
        thread = threading.Thread(
            target=self._beat, args=(self._stop,), name="celery-warden-heartbeat", daemon=True
        )
        thread.start()

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_seconds):
            try:
                # Built under the channel's lock, so a task's start or end message can
                # never overtake the snapshot of the running tasks it contradicts.
                self.channel.send_built(self.heartbeat)
            except Exception:
                self.errors += 1


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

    probe = Probe(Channel(socket_path), control=os.environ.get(CONTROL_ENV, "1") != "0")
    pairs = [
        (signals.celeryd_after_setup, probe.on_worker_ready),
        (signals.worker_process_init, probe.on_process_init),
        (signals.task_prerun, probe.on_task_prerun),
        (signals.task_failure, probe.on_task_failure),
        (signals.task_retry, probe.on_task_retry),
        (signals.task_postrun, probe.on_task_postrun),
        (signals.worker_process_shutdown, probe.on_process_shutdown),
    ]
    for signal, receiver in pairs:
        signal.connect(receiver, weak=False, dispatch_uid=f"celery_warden.{receiver.__name__}")
    _probe = probe
    return probe
