"""What the control channel can ask a worker process (``celery-warden diagnose``).

- ``hello``: who this is (pid, start time, pool), what it runs now, whether ``recycle``
  can end it, and where its stack dump handler writes (``_stack.py``);
- ``memory``: where the memory is (``_alloc.breakdown``), the heap's census by type, and,
  only when asked (it holds the allocator's locks for a moment), what ``malloc_trim(0)``
  gives back, measured;
- ``trace``: trace the next ``calls`` calls of ``task`` (``_trace.Trace``) and answer
  when they are done or ``timeout`` seconds have passed, whichever comes first;
- ``recycle``: have this pool child leave after its current task, or at once when idle,
  by billiard's own way out (``Probe.request_recycle``): the soft recycle that never
  interrupts a task, as SIGTERM to a busy child would; a child being traced leaves
  when the trace is over. Asking again changes nothing;
- ``queues``: in a worker's master, how many messages wait in each queue it consumes
  from (a passive declare on a connection of its own): the guard asks when every child
  has sat idle for long, to tell "nothing to do" from "stopped consuming".

Every answer carries types, counts, sizes, file:line and attribute names, never object
contents or task arguments, unless the request says ``show_values`` (the client records
that it did).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery_warden.probe import _alloc, _heap
from celery_warden.probe._control import AFTER_REPLY
from celery_warden.probe._stack import STACK_SIGNAL
from celery_warden.probe._trace import Trace

if TYPE_CHECKING:
    from celery_warden.probe._hooks import Probe

__all__ = ["operations"]

MAX_CALLS = 1000
MAX_QUEUES = 50
MAX_FRAMES = 64
MAX_TIMEOUT_SECONDS = 86400.0


def _bounded(request: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = request.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a number")
    return min(max(float(value), low), high)


def operations(probe: Probe) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """The control handlers of ``probe``'s process."""
    busy = threading.Lock()  # one trace at a time per process

    def identity() -> dict[str, Any]:
        pid, ticks = probe.identity()
        return {"pid": pid, "start_ticks": ticks, "pool": probe.pool_name, "at": time.time()}

    def hello(request: dict[str, Any]) -> dict[str, Any]:
        stack_file = probe.stack.path
        return {
            **identity(),
            "master": probe.is_master(),
            "running": probe.running_names(),
            "tracing": busy.locked(),
            "can_recycle": probe.can_recycle(),
            "stack_signal": STACK_SIGNAL if stack_file is not None else None,
            "stack_file": stack_file,
        }

    def recycle(request: dict[str, Any]) -> dict[str, Any]:
        ticks = request.get("start_ticks")
        if ticks is not None and ticks != probe.identity()[1]:
            # The PID the warden meant was reused by this process: not the one to leave.
            return {"accepted": False, "error": "another process than the one asked for"}
        if not probe.can_recycle():
            return {
                "accepted": False,
                "error": "not a prefork pool child: there is no pool loop to leave here "
                "(a worker's master, or the solo or threads pool)",
            }
        # Requested once the reply is out: an idle child is gone within milliseconds
        # (billiard's master TERMs a child as soon as it says it is leaving). A child
        # being traced leaves when the trace is over.
        return {
            "accepted": True,
            "busy": probe.running_names(),
            "after_trace": probe.held(),
            AFTER_REPLY: probe.request_recycle,
        }

    def queues(request: dict[str, Any]) -> dict[str, Any]:
        app = probe.app
        if not probe.is_master() or app is None:
            return {"error": "not a worker's master: only the master consumes"}
        names = list(app.amqp.queues.consume_from)[:MAX_QUEUES]
        depths: dict[str, int] = {}
        missing: list[str] = []
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
            for name in names:
                # A channel per queue: AMQP closes the channel a passive declare of a
                # missing queue fails on.
                channel = conn.channel()
                try:
                    depths[name] = int(channel.queue_declare(queue=name, passive=True)[1])
                except conn.channel_errors:
                    missing.append(name)
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
        return {**identity(), "queues": depths, "missing": missing}

    def memory(request: dict[str, Any]) -> dict[str, Any]:
        limit = int(_bounded(request, "limit", 30, 1, 500))
        reply = identity()
        reply["breakdown"] = _alloc.breakdown()
        if request.get("census", True):
            started = time.perf_counter()
            reply["census"] = [list(row) for row in _heap.census(limit=limit)]
            reply["census_seconds"] = time.perf_counter() - started
        if request.get("trim"):
            reply["trim"] = _alloc.trim()
        return reply

    def trace(request: dict[str, Any]) -> dict[str, Any]:
        task = request.get("task")
        if not isinstance(task, str) or not task:
            raise ValueError("trace needs a task name")
        calls = int(_bounded(request, "calls", 50, 1, MAX_CALLS))
        frames = int(_bounded(request, "frames", 10, 1, MAX_FRAMES))
        timeout = _bounded(request, "timeout", 600, 0.1, MAX_TIMEOUT_SECONDS)
        closed: Callable[[], bool] = request.get("_closed") or (lambda: False)
        if not busy.acquire(blocking=False):
            return {"error": "a trace is already running in this process"}
        probe.hold()  # a recycle asked meanwhile waits for this answer to be out
        handed_over = False
        try:
            reply = identity()
            reply["before"] = _alloc.breakdown()
            job = Trace(task, calls, frames)
            probe.trace = job
            deadline = time.monotonic() + timeout
            try:
                while not job.done.wait(0.1):
                    job.close_if_idle()
                    if time.monotonic() >= deadline:
                        job.cancel(f"timed out after {timeout:g} s")
                    elif closed():
                        job.cancel("the client went away")
            finally:
                probe.trace = None
                job.cancel("stopped")  # closes a window still open
            reply["trace"] = job.result(show_values=bool(request.get("show_values")))
            reply["after"] = _alloc.breakdown()
            if request.get("trim"):
                reply["trim"] = _alloc.trim()
            reply[AFTER_REPLY] = probe.release
            handed_over = True
            return reply
        finally:
            busy.release()
            if not handed_over:  # no answer to send: let go now
                probe.release()

    return {
        "hello": hello,
        "memory": memory,
        "trace": trace,
        "recycle": recycle,
        "queues": queues,
    }
