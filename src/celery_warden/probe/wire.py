"""The wire format between the probe (inside the worker) and the warden.

One line is one message: a compact JSON array whose first element names its kind,
ended by a newline (JSON escapes newlines inside strings, so framing is safe). JSON keeps
the probe free of dependencies and any odd task name safe; task names are truncated to
``MAX_NAME`` so a message stays small.

=====  ==================================================================
kind   fields
=====  ==================================================================
``w``  pid, start_ticks, nodename, pool, concurrency, max_tasks, max_mem_kb, settings
``c``  pid, start_ticks, ppid, t, cmdline                (a pool child starts)
``s``  pid, start_ticks, task_id, name, t_start
``f``  pid, start_ticks, task_id, name, t_start, t_end, wall_seconds, state, rss_bytes,
       cpu_seconds, uss_bytes, pss_bytes, py_blocks_delta, exception, retries
``h``  pid, start_ticks, t, dropped, [[task_id, name, t_start, cpu_seconds], ...]
``x``  pid, start_ticks, t, exit_code, reason, dropped
=====  ==================================================================

``h`` is a heartbeat: every few seconds each process that has run a task says which
tasks it is running now (none when idle), since when, and how much CPU each has used
so far. It repeats the state rather than an event, so a message dropped or a warden
restarted mends itself at the next beat.

``settings`` in ``w`` is a JSON object of the app's settings the guard's self-check
reads (``_hooks.worker_settings`` lists them), its ``tasks`` an object of objects; a
probe older than the field sends none, which decodes as None.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from celery_warden._records import (
    EndReason,
    Heartbeat,
    ProcessEnd,
    ProcessInfo,
    Role,
    RunningTask,
    TaskFinished,
    TaskStarted,
    TaskState,
    WorkerInfo,
)

__all__ = ["MAX_LINE", "MAX_NAME", "Message", "decode", "encode"]

MAX_NAME = 200
MAX_LINE = 16 * 1024  # a longer line is not a probe message
Message = WorkerInfo | ProcessInfo | TaskStarted | TaskFinished | ProcessEnd | Heartbeat
MAX_RUNNING = 256  # tasks one heartbeat may list (a threads pool of that many is rare)

# The decoder's C scanner (set in its __init__, untyped in typeshed): json.loads adds an
# encoding sniff and two Python layers per message.
_scan: Callable[[str, int], tuple[object, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]

_STATES = {state.value: state for state in TaskState}
_REASONS = {reason.value: reason for reason in EndReason}


def encode(kind: str, *fields: object) -> bytes:
    """Encode one message (the probe side: no validation, it must stay cheap)."""
    return json.dumps([kind, *fields], separators=(",", ":")).encode() + b"\n"


_MAX_INT = 2**63 - 1  # what SQLite's INTEGER holds


def _str(value: object, limit: int = MAX_LINE) -> str:
    """Text as SQLite can store it: a lone surrogate (valid in JSON, not in UTF-8)
    is escaped rather than failing a whole batch of writes."""
    if type(value) is str and len(value) <= limit and value.isascii():
        return value  # the common case, at once
    text = str(value)[:limit]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _int(value: object) -> int:
    if type(value) is int and -_MAX_INT <= value <= _MAX_INT:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"not an integer: {value}")
    number: int = int(value)  # type: ignore[call-overload]
    if not -_MAX_INT <= number <= _MAX_INT:
        raise ValueError(f"integer out of range: {number}")
    return number


def _opt_int(value: object) -> int | None:
    return None if value is None else _int(value)


def _opt_float(value: object) -> float | None:
    return None if value is None else _float(value)


def _float(value: object) -> float:
    if type(value) is float and math.isfinite(value):
        return value
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueError("number out of range") from None
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {number}")
    return number


def _settings(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("settings must be an object")
    tasks = value.get("tasks")
    if tasks is not None and not (
        isinstance(tasks, dict) and all(isinstance(own, dict) for own in tasks.values())
    ):
        raise ValueError("settings' tasks must map names to objects")
    return value


def decode(data: bytes) -> tuple[Message, int]:
    """Decode one message into a record and the probe's dropped-message count.

    Raises ValueError or TypeError for anything malformed; the caller counts and
    skips it, since the socket may be written by any process of the same user.
    """
    text = data.decode("utf-8")
    try:
        message, stop = _scan(text, 0)  # the C scanner, without json.loads's layers
    except StopIteration:
        raise ValueError("not JSON") from None
    if stop != len(text) and text[stop:].strip():
        raise ValueError("extra data after the message")
    if not isinstance(message, list) or not message:
        raise ValueError("not a message")
    kind, fields = message[0], message[1:]
    if kind == "f":
        pid, ticks, task_id, name, t_start, t_end, wall, state, rss, *more = fields
        cpu, uss, pss, blocks, exception, retries = (*more, None, None, None, None, None, 0)[:6]
        return (
            TaskFinished(
                _int(pid),
                _int(ticks),
                _str(task_id, MAX_NAME),
                _str(name, MAX_NAME),
                _float(t_end),
                _float(wall),
                _STATES.get(str(state).lower(), TaskState.FAILURE),
                _opt_int(rss),
                _float(t_start),
                cpu_seconds=_opt_float(cpu),
                uss_after_bytes=_opt_int(uss),
                pss_after_bytes=_opt_int(pss),
                py_blocks_delta=_opt_int(blocks),
                exception=None if exception is None else _str(exception, MAX_NAME),
                retries=_int(retries or 0),
            ),
            0,
        )
    if kind == "h":
        pid, ticks, t, dropped, running = fields
        if not isinstance(running, list) or len(running) > MAX_RUNNING:
            raise ValueError("bad running list")
        tasks = tuple(
            RunningTask(
                _str(task_id, MAX_NAME),
                _str(name, MAX_NAME),
                _float(since),
                _opt_float(cpu),
            )
            for task_id, name, since, cpu in running
        )
        return Heartbeat(_int(pid), _int(ticks), _float(t), tasks), _int(dropped)
    if kind == "s":
        pid, ticks, task_id, name, t_start = fields
        return TaskStarted(
            _int(pid), _int(ticks), _str(task_id, MAX_NAME), _str(name, MAX_NAME), _float(t_start)
        ), 0
    if kind == "x":
        pid, ticks, t, code, reason, dropped = fields
        end = ProcessEnd(
            _int(pid),
            _int(ticks),
            _float(t),
            _REASONS.get(str(reason), EndReason.EXITED),
            _opt_int(code),
        )
        return end, _int(dropped)
    if kind == "c":
        pid, ticks, ppid, t, cmdline = fields
        child = ProcessInfo(
            _int(pid),
            _int(ticks),
            _int(ppid),
            Role.CHILD,
            _float(t),
            _str(cmdline, 1000),
            _int(ppid),
        )
        return child, 0
    if kind == "w":
        pid, ticks, node, pool, concurrency, max_tasks, max_mem, *more = fields
        settings = (*more, None)[0]
        info = WorkerInfo(
            _int(pid),
            _int(ticks),
            _str(node, MAX_NAME),
            _str(pool, MAX_NAME),
            _int(concurrency),
            _opt_int(max_tasks),
            _opt_int(max_mem),
            _settings(settings),
        )
        return info, 0
    raise ValueError(f"unknown message kind {kind!r}")
