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

import contextlib
import json
import json.encoder
import math
import os
import random
import select
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from celery_warden.probe import wire
from celery_warden.probe._channel import Channel, renew_locks_after_fork
from celery_warden.probe._control import ControlServer
from celery_warden.probe._stack import StackDump

if TYPE_CHECKING:
    from celery_warden.probe._trace import Trace

__all__ = ["BLOCKS_SAMPLE_ENV", "HEARTBEAT_ENV", "Probe", "connect"]

HEARTBEAT_ENV = "CELERY_WARDEN_HEARTBEAT_SECONDS"
CONTROL_ENV = "CELERY_WARDEN_CONTROL"  # "0": no control socket (no diagnose)
BLOCKS_SAMPLE_ENV = "CELERY_WARDEN_BLOCKS_SAMPLE"
HEARTBEAT_SECONDS = 5.0
SMAPS_SECONDS = 10.0  # at most one smaps_rollup read per process in this long

_EX_RECYCLE = 0x9B  # billiard's exit code for a child that leaves by its own limits
# The room the per-task settings may take in the worker's message, which must stay under
# the wire's line limit: about 300 names of 20 characters with one override each.
_SETTINGS_TASKS_BYTES = wire.MAX_LINE - 4096
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


# The app-wide settings a hard kill's outcome depends on, and each task's own override
# of them (by the task's attribute name).
_APP_SETTINGS = (
    "task_acks_late",
    "task_reject_on_worker_lost",
    "task_retry_on_worker_lost",
    "task_time_limit",
    "task_soft_time_limit",
    "worker_max_tasks_per_child",
    "worker_max_memory_per_child",
)
_TASK_SETTINGS = {
    "acks_late": "task_acks_late",
    "reject_on_worker_lost": "task_reject_on_worker_lost",
    "retry_on_worker_lost": "task_retry_on_worker_lost",
    "time_limit": "task_time_limit",
    "soft_time_limit": "task_soft_time_limit",
}
# The worker's effective value where its command line can override the app's setting.
_WORKER_OVERRIDES = {
    "task_time_limit": "time_limit",
    "task_soft_time_limit": "soft_time_limit",
    "worker_max_tasks_per_child": "max_tasks_per_child",
    "worker_max_memory_per_child": "max_memory_per_child",
}
_TRANSPORT_OPTIONS = ("visibility_timeout", "unacked_restore_interval", "unacked_restore_throttle")


def _plain(value: object) -> bool | int | float | str | None:
    """A setting as JSON can carry it and the wire may hold it."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)[: wire.MAX_NAME]


def _transport(app: Any) -> str | None:
    """The broker's kombu transport, by its driver ("redis", "amqp"), never its URL,
    which can hold a password. Nothing is connected: kombu only parses the URL."""
    from kombu.transport import get_transport_cls

    connection = app.connection_for_write()
    try:
        alias = connection.transport_cls
    finally:
        connection.release()
    cls = get_transport_cls(alias) if isinstance(alias, str) else alias
    driver = getattr(cls, "driver_type", None) or alias
    return driver[: wire.MAX_NAME] if isinstance(driver, str) else None


def worker_settings(instance: Any) -> dict[str, Any]:
    """The settings the guard's startup self-check reads, from the worker's app.

    App-wide: whether a hard kill loses a task (acks late, reject or retry on worker
    lost), Celery's own limits (the worker's effective values, its command line
    included), the broker's transport and the options that decide when Redis redelivers
    (None: the transport's default). Per task name (Celery's own ``celery.*`` left
    out), only the settings that differ from those app-wide values, in name order until
    the message's size limit; ``tasks_truncated`` says when names were left out.
    """
    app = instance.app
    conf = app.conf
    settings: dict[str, Any] = {name: _plain(conf.get(name)) for name in _APP_SETTINGS}
    for name, attribute in _WORKER_OVERRIDES.items():
        if hasattr(instance, attribute):
            settings[name] = _plain(getattr(instance, attribute))
    try:
        settings["broker_transport"] = _transport(app)
    except Exception:
        settings["broker_transport"] = None
    options = conf.get("broker_transport_options")
    options = options if isinstance(options, dict) else {}
    for name in _TRANSPORT_OPTIONS:
        settings[name] = _plain(options.get(name))
    tasks: dict[str, dict[str, Any]] = {}
    size, truncated = 0, False
    for name, task in sorted(app.tasks.items()):
        if str(name).startswith("celery."):
            continue
        own = {}
        for attribute, setting in _TASK_SETTINGS.items():
            value = _plain(getattr(task, attribute, None))
            if value is not None and value != settings[setting]:  # None: the app-wide one
                own[attribute] = value
        if not own:
            continue
        key = str(name)[: wire.MAX_NAME]
        size += len(json.dumps([key, own], separators=(",", ":")))
        if size > _SETTINGS_TASKS_BYTES:
            truncated = True
            break
        tasks[key] = own
    settings["tasks"] = tasks
    settings["tasks_truncated"] = truncated
    return settings


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
        self.app: Any = None  # the worker's app, in its master (for the ``queues`` op)
        self._master_pid = 0  # the process celeryd_after_setup ran in
        self.trace: Trace | None = None  # a diagnosis tracing a task name here
        self._control: ControlServer | None = None
        self.stack = StackDump()
        self.recycle_requested = False  # the warden asked this pool child to leave...
        self._holds = 0  # ...but diagnoses in progress here need it until they answer
        self._holds_lock = threading.Lock()
        self._recycle_pipe = (-1, -1)  # written to wake an idle child that should leave
        self._recycle_pid = 0  # the process whose billiard loop the wrapper is in
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
        """Serve ``celery-warden diagnose`` in this process (once per process), and
        register the stack dump handler beside its socket."""
        if not self.control:
            return None
        try:
            if self._control is None:
                from celery_warden.probe._ops import operations

                self._control = ControlServer(operations(self))
            path = self._control.start()
        except Exception:
            self.errors += 1
            return None
        # Not in a prefork master: its children would inherit the handler, writing to the
        # master's file until they register their own.
        if path is not None and not (self.is_master() and self.pool_name == "prefork"):
            try:
                self.stack.enable(os.path.dirname(path))
            except Exception:
                self.errors += 1
        return path

    def can_recycle(self) -> bool:
        """Whether this process is a pool child that ``recycle`` can end between tasks."""
        return self._recycle_pipe[1] >= 0 and self._recycle_pid == os.getpid()

    def request_recycle(self) -> bool:
        """Have this pool child leave before its next task (at once when idle); False
        where there is no billiard loop to leave (a master, the solo or threads pool)."""
        if not self.can_recycle():
            return False
        self.recycle_requested = True  # set before the wake-up, which the loop reads after
        with contextlib.suppress(OSError):  # a full pipe: the loop was woken already
            os.write(self._recycle_pipe[1], b"r")
        return True

    def hold(self) -> None:
        """Keep this child from leaving on a recycle request until :meth:`release`: a
        trace needs its calls, and its answer must be out before the process ends."""
        with self._holds_lock:
            self._holds += 1

    def release(self) -> None:
        """End a :meth:`hold`; a recycle asked meanwhile happens now."""
        with self._holds_lock:
            self._holds -= 1
            free = self._holds == 0
        if free and self.recycle_requested:
            self.request_recycle()  # wakes the loop, which leaves

    def held(self) -> bool:
        return self._holds > 0

    def _arm_recycle(self) -> None:
        """Let ``request_recycle`` end this pool child between tasks, by billiard's own
        way out: the one a child at ``max_tasks_per_child`` takes.

        billiard's ``workloop`` reads ``Worker.wait_for_job`` into a local when it starts,
        which is after worker_process_init: the wrapper put there now is what the loop
        calls before each job. Once a recycle is asked, it calls ``sys.exit(EX_RECYCLE)``
        (billiard's ``Worker.__call__`` patched ``sys.exit`` to record the code), so the
        master counts a normal recycle, not a crash towards ``RestartFreqExceeded``, and a
        job written to this child but never read is put back for another child. An idle
        child blocks reading its job pipe; the wrapper waits on that pipe and on a wake-up
        pipe of its own, so an idle child leaves as soon as it is asked, not at its next
        job. A child held by a diagnosis keeps serving until the diagnosis has answered
        (a trace needs its calls; :meth:`release` wakes the loop). Outside a billiard
        pool child it does nothing.
        """
        from billiard import pool, process

        worker = getattr(process.current_process(), "_target", None)
        if not isinstance(worker, pool.Worker):
            return
        original = worker.wait_for_job
        jobs = worker.inq._reader.fileno()
        wake_reader, wake_writer = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        waiter = select.poll()
        waiter.register(jobs, select.POLLIN)
        waiter.register(wake_reader, select.POLLIN)

        def wait_for_job() -> Any:
            while True:
                if self.recycle_requested and not self.held():
                    sys.exit(pool.EX_RECYCLE)  # looked up now: billiard's recording exit
                ready = {fd for fd, _event in waiter.poll()}
                if jobs in ready or wake_reader not in ready:
                    return original()  # a job, or the pipe closed: billiard reads it
                with contextlib.suppress(OSError):  # woken: drained, then judged again
                    os.read(wake_reader, 64)

        worker.wait_for_job = wait_for_job
        self._recycle_pipe, self._recycle_pid = (wake_reader, wake_writer), os.getpid()

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
        self.stack.close()
        self._close_files()
        for fd in self._recycle_pipe:
            if fd >= 0:
                os.close(fd)
        self._recycle_pipe = (-1, -1)

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
            self.app = getattr(instance, "app", None)  # the master's queues can be asked for
            self.green = pool_name in _GREEN_POOLS
            concurrency = int(getattr(instance, "concurrency", 0) or 0)
            self.start_control()  # the master too: its own memory can be asked for
            settings = None
            try:
                settings = worker_settings(instance)
            except Exception:
                self.errors += 1  # the worker is still described, without its settings
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
                    settings,
                )
            )
        except Exception:
            self.errors += 1

    def on_process_init(self, **_: Any) -> None:
        """worker_process_init: a pool child announces itself, so the warden knows every
        child even if it lives less than one sweep (a recycle every few tasks)."""
        try:
            # Armed before the control socket opens: a child the warden can ask is a
            # child that can leave.
            self._arm_recycle()
        except Exception:
            self.errors += 1
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
            self.stack.remove_file()
        except Exception:
            self.errors += 1

    def _exit_reason(self, exitcode: int | None) -> str:
        if exitcode is not None and exitcode < 0:
            return "killed"
        if exitcode != _EX_RECYCLE:
            return "exited"
        if self.recycle_requested:
            return "recycled"  # the warden asked
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
