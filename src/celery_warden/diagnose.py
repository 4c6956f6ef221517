"""Diagnose a live worker process: ask its probe, judge, store. Used by the
``diagnose`` command and, automatically, by ``run`` when attribution names a leak.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery_warden import _procs, control
from celery_warden._records import DiagnosisRecord, Role, Verdict
from celery_warden.analysis.diagnosis import classify
from celery_warden.analysis.report import build_report
from celery_warden.exceptions import StoreError, UsageError, WardenError
from celery_warden.store import Store, read_snapshot

__all__ = ["AutoDiagnoser", "diagnose", "store_diagnosis"]

log = logging.getLogger(__name__)

_REPLY_MARGIN_SECONDS = 120.0  # beyond the trace's own timeout, for its result and roots


def _finite(value: Any) -> Any:
    """The document with NaN and infinities as null (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def diagnose(
    pid: int,
    *,
    task: str | None = None,
    calls: int = 50,
    frames: int = 10,
    timeout: float = 600.0,
    trim: bool = False,
    show_values: bool = False,
    census: bool = True,
    on_armed: Any = None,
) -> dict[str, Any]:
    """Ask ``pid``'s probe where its memory is and, with ``task``, what the next
    ``calls`` calls of that name keep; the document, with its verdict, evidence and
    advice. ``census=False`` skips the whole-heap census (a walk of the heap first).
    Every failure is a :class:`WardenError` of one line."""
    hello = control.ask(pid, {"op": "hello"}, timeout=10)
    if task and hello.get("master") and hello.get("pool") == "prefork":
        raise UsageError(
            f"PID {pid} is the master of a prefork pool: its children run the tasks; "
            "pass a child's PID, or --worker NAME"
        )
    document: dict[str, Any] = {
        "pid": hello["pid"],
        "start_ticks": hello["start_ticks"],
        "pool": hello.get("pool"),
        "master": bool(hello.get("master")),
        "at": time.time(),
        "request": {"task": task, "calls": calls, "frames": frames, "trim": trim},
        "show_values": show_values,
    }
    memory = control.ask(
        pid, {"op": "memory", "trim": trim and not task, "census": census}, timeout=60
    )
    document["breakdown"] = memory.get("breakdown")
    document["census"] = memory.get("census")
    document["trim"] = memory.get("trim")
    if task:
        if on_armed is not None:
            on_armed()
        request = {
            "op": "trace",
            "task": task,
            "calls": calls,
            "frames": frames,
            "timeout": timeout,
            "trim": trim,
            "show_values": show_values,
        }
        traced = control.ask(pid, request, timeout=timeout + _REPLY_MARGIN_SECONDS)
        for key in ("trace", "before", "after"):
            document[key] = traced.get(key)
        if trim:
            document["trim"] = traced.get("trim")
    finding = classify(document)
    document["verdict"] = finding.verdict.value
    document["evidence"] = list(finding.evidence)
    document["advice"] = list(finding.advice)
    result: dict[str, Any] = _finite(document)
    return result


def store_diagnosis(path: Path, document: dict[str, Any]) -> int:
    """Record a diagnosis document for ``report``; its id. A :class:`StoreError` when
    the store cannot take it (the diagnosis itself is not lost: the caller has it)."""
    record = DiagnosisRecord(
        pid=int(document["pid"]),
        start_ticks=int(document["start_ticks"]),
        at=float(document["at"]),
        task_name=(document.get("request") or {}).get("task"),
        verdict=Verdict(document["verdict"]),
        show_values=bool(document.get("show_values")),
        document=document,
    )
    store = Store.open(path)
    try:
        return store.add_diagnosis(record)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot record the diagnosis in {path}: {exc}") from None
    finally:
        store.close()


class AutoDiagnoser:
    """In ``run``: when attribution names a leaking task name, trace it in the live
    child that ran it most, once per name per ``cooldown_seconds``, one at a time.

    It reads the session from the store every ``check_seconds`` (the same analysis as
    ``report``), on a thread of its own; the worker never waits for it. A diagnosis
    that fails is logged and tried again after the cooldown.
    """

    CHECK_ENV = "CELERY_WARDEN_AUTO_DIAGNOSE_SECONDS"

    def __init__(
        self,
        store_path: Path,
        session_id: Callable[[], int],
        *,
        check_seconds: float = 600.0,
        cooldown_seconds: float = 3600.0,
        calls: int = 50,
        timeout: float = 1800.0,
    ) -> None:
        self.store_path = store_path
        self.session_id = session_id
        self.check_seconds = check_seconds
        self.cooldown_seconds = cooldown_seconds
        self.calls = calls
        self.timeout = timeout
        self._last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="celery-warden-autodiagnose", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.check_seconds):
            try:
                self.check()
            except Exception:  # a failed check must not end the warden
                log.warning("automatic diagnosis failed", exc_info=True)

    def check(self) -> None:
        """One look at the session: diagnose the first leaking name due."""
        session_id = self.session_id()
        if not session_id:
            return  # the session has not started yet
        store = Store.open(self.store_path, readonly=True)
        try:
            snapshot = read_snapshot(store.connection, session_id)
        finally:
            store.close()
        report = build_report(snapshot)
        now = time.monotonic()
        for task in report.tasks:
            if task.memory is None or not task.leaks or task.diagnosis is not None:
                continue
            if now - self._last.get(task.name, -math.inf) < self.cooldown_seconds:
                continue
            target = self._busiest_live_runner(snapshot, task.name)
            if target is None:
                continue
            self._last[task.name] = now
            log.warning(
                "%s leaks (about %s B per call): tracing its next %d calls in PID %d",
                task.name,
                f"{task.memory.retained_bytes_per_call or 0:.0f}",
                self.calls,
                target,
            )
            try:
                document = diagnose(target, task=task.name, calls=self.calls, timeout=self.timeout)
                store_diagnosis(self.store_path, document)
                log.warning(
                    "diagnosis of %s: %s; `celery-warden report` shows it",
                    task.name,
                    document["verdict"],
                )
            except WardenError as exc:
                log.warning("could not diagnose %s: %s", task.name, exc)
            return  # one per check: a trace waits for calls, the next check goes on

    @staticmethod
    def _busiest_live_runner(snapshot: Any, name: str) -> int | None:
        best: tuple[int, int] | None = None
        for history in snapshot.processes:
            info = history.info
            if history.ended_at is not None or info.role is Role.DESCENDANT:
                continue
            count = sum(1 for t in history.tasks if t.name == name)
            if not count:
                continue
            try:
                if _procs.read_stat(info.pid).start_ticks != info.start_ticks:
                    continue  # that life ended; its PID is someone else's now
            except (_procs.Vanished, PermissionError):
                continue
            if best is None or count > best[0]:
                best = (count, info.pid)
        return None if best is None else best[1]
