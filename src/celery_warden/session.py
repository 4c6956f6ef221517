"""One warden session: the sampler, the probe listener and the store writer, wired up.

Three threads, and the arrows point one way::

    sampler thread ----\\
                        >-- queue --> writer thread --> SQLite (WAL)
    listener thread ---/

The sampler and the listener never touch SQLite, so a slow disk or a reader holding
the database can delay the writer but never a sweep; a failed write is counted and the
session goes on (supervision matters more than history).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import celery_warden
from celery_warden import _procs
from celery_warden._config import Retention, SamplerConfig
from celery_warden._records import (
    Heartbeat,
    ProcessEnd,
    ProcessInfo,
    Sample,
    TaskFinished,
    TaskStarted,
)
from celery_warden.guard.signals import Signaller
from celery_warden.listener import ProbeListener
from celery_warden.live import Activity, LiveView
from celery_warden.probe import SITE_DIR, wire
from celery_warden.probe._boot import PACKAGE_ENV, SOCKET_ENV
from celery_warden.sampler import Sampler
from celery_warden.store import Record, Store

__all__ = ["Session"]

log = logging.getLogger("celery_warden")

_MAX_BATCHES_PER_WRITE = 4096
_GATHER_SECONDS = 0.2  # how long the writer gathers records into one transaction


def _without_superseded_starts(records: list[Record]) -> list[Record]:
    """Drop the start of every call whose end is in the same batch: the end's row says
    all the start would, and one write per call halves the writer's work."""
    ended = {
        (r.pid, r.start_ticks, r.task_id, r.started_at)
        for r in records
        if isinstance(r, TaskFinished)
    }
    if not ended:
        return records
    return [
        r
        for r in records
        if not (isinstance(r, TaskStarted) and (r.pid, r.start_ticks, r.task_id, r.t) in ended)
    ]


class Session:
    """Watches worker trees and records them into ``store`` until :meth:`stop`."""

    def __init__(
        self,
        store: Store,
        *,
        mode: str,
        command: str,
        config: SamplerConfig | None = None,
        retention: Retention | None = None,
        with_probe: bool = True,
        on_task: Callable[[TaskFinished], None] | None = None,
        listen_on: tuple[str, socket.socket] | None = None,
    ) -> None:
        """``listen_on`` is a probe socket already bound and listening, with its path
        (``install(app)`` binds it in the worker; the session then owns its directory).
        """
        self.config = config or SamplerConfig()
        self.retention = retention or Retention()
        self.store = store
        self.mode, self.command = mode, command
        self.session_id = 0  # set by start()
        self.sampler = Sampler(self.config)
        self.store_errors = 0
        self.tasks_finished = 0
        self.sweeps = 0
        self._on_task = [on_task] if on_task is not None else []
        self._on_sweep: list[Callable[[], None]] = []
        self._latest: dict[int, Sample] = {}  # pid -> its latest sample (the guard reads it)
        self.live = LiveView()
        # Signals the session sends itself (a Ctrl-C forwarded to the masters), audited
        # into the store like the guard's.
        self.signaller = Signaller(dry_run=False, audit=lambda audit: self._queue.put([audit]))
        # Guards the sampler between its thread and callers; reentrant, as a signal
        # handler forwarding a Ctrl-C may run while the main thread holds it.
        self._lock = threading.RLock()
        self._queue: queue.SimpleQueue[list[Record] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._with_probe = with_probe
        self._listen_on = listen_on
        self._private_dir: str | None = None
        self.listener: ProbeListener | None = None
        self._started = False
        self._threads = [
            threading.Thread(target=self._sample_loop, name="warden-sampler", daemon=True),
            threading.Thread(target=self._write_loop, name="warden-writer", daemon=True),
        ]

    # -- wiring ----------------------------------------------------------------------

    def probe_environment(self) -> dict[str, str]:
        """The environment for a worker started under this (started) session: the probe
        attaches through a ``sitecustomize`` on ``PYTHONPATH``, with no change to user
        code."""
        env = dict(os.environ)
        if self.listener is None:
            return env
        paths = [str(SITE_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env[SOCKET_ENV] = self.listener.path
        env[PACKAGE_ENV] = str(Path(celery_warden.__file__).parent)
        return env

    def start(self) -> None:
        """Record the session, open the probe's socket and start the threads.

        Nothing is written or created before this, so a command that fails its checks
        leaves no empty session and no socket behind.
        """
        self.session_id = self.store.begin_session(
            self.mode, self.command, self.config.interval_seconds
        )
        self._started = True
        if self._listen_on is not None:
            path, server = self._listen_on
            # The directory install(app) made; only a directory it would have made is
            # ever removed (a hand-run `collect --socket ~/x/p.sock` keeps ~/x).
            if os.path.basename(os.path.dirname(path)).startswith("celery-warden-"):
                self._private_dir = os.path.dirname(path)
            self.listener = ProbeListener(path, self._deliver, server=server)
            self.listener.start()
        elif self._with_probe:
            self._private_dir = tempfile.mkdtemp(prefix="celery-warden-")  # mode 0700
            socket_path = os.path.join(self._private_dir, "probe.sock")
            self.listener = ProbeListener(socket_path, self._deliver)
            self.listener.start()
        for thread in self._threads:
            thread.start()

    def add_anchor(self, pid: int) -> None:
        with self._lock:
            self.sampler.add_anchor(pid)

    def masters(self) -> list[ProcessInfo]:
        with self._lock:
            return self.sampler.masters()

    def tracked(self) -> list[ProcessInfo]:
        with self._lock:
            return self.sampler.tracked

    def handle(self, pid: int, start_ticks: int) -> _procs.ProcessHandle | None:
        """A duplicate of the pidfd opened when this process was discovered (the caller
        closes it); None if it is not a process of the watched trees."""
        with self._lock:
            return self.sampler.handle(pid, start_ticks)

    def latest_samples(self) -> dict[int, Sample]:
        """The latest sample of every tracked process, by pid."""
        with self._lock:
            return dict(self._latest)

    def on_sweep(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every sweep, on the sampler's thread: keep it short."""
        self._on_sweep.append(callback)

    def on_task(self, callback: Callable[[TaskFinished], None]) -> None:
        """Call ``callback`` with every finished call, on the listener's thread."""
        self._on_task.append(callback)

    def activity(self) -> list[Activity]:
        """What each probed process is running now (the probe's heartbeats keep it)."""
        return self.live.activity()

    def _deliver(self, message: wire.Message) -> None:
        self.live.update(message)
        if isinstance(message, Heartbeat):
            return  # live state only: a heartbeat is not history
        self._queue.put([message])
        if isinstance(message, TaskFinished):
            self.tasks_finished += 1
            for callback in self._on_task:
                callback(message)

    # -- the two loops ---------------------------------------------------------------

    def _sample_loop(self) -> None:
        interval = self.config.interval_seconds
        deadline = time.monotonic()
        while True:
            self.sweep_now()
            deadline += interval
            # A sweep that overran its slot does not cause a burst of catch-up sweeps.
            deadline = max(deadline, time.monotonic())
            if self._stop.wait(deadline - time.monotonic()):
                return

    def sweep_now(self) -> None:
        """Run one sweep and queue its records."""
        try:
            with self._lock:
                records = self.sampler.sweep()
                self.sweeps += 1
                for record in records:
                    if isinstance(record, Sample):
                        self._latest[record.pid] = record
                    elif isinstance(record, ProcessEnd):
                        self._latest.pop(record.pid, None)
        except Exception:  # a sampler bug must not end supervision
            log.exception("sampler sweep failed")
            return
        if records:
            for record in records:
                if isinstance(record, ProcessEnd):
                    self.live.update(record)
            self._queue.put(records)
        for callback in self._on_sweep:
            callback()

    def _write_loop(self) -> None:
        # Retention runs at the start, every few minutes, and at the end, so short
        # sessions (a `watch --duration` from cron) keep the store bounded too.
        self._retain()
        last_retention = time.monotonic()
        done = False
        while not done:
            batches = [self._queue.get()]
            # Gather for a moment before writing: a commit costs far more than a row,
            # and at hundreds of tasks a second one transaction per message would cost
            # the warden more CPU than the whole probe costs the worker.
            deadline = time.monotonic() + _GATHER_SECONDS
            while batches[-1] is not None and len(batches) < _MAX_BATCHES_PER_WRITE:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batches.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
            done = any(batch is None for batch in batches)
            records = [record for batch in batches if batch is not None for record in batch]
            self._write(_without_superseded_starts(records))
            if done or time.monotonic() - last_retention >= self.retention.every_seconds:
                last_retention = time.monotonic()
                self._retain()

    def _write(self, records: list[Record]) -> None:
        if not records:
            return
        for attempt in (1, 2):
            try:
                self.store.write(self.session_id, records)
            except sqlite3.OperationalError as exc:  # locked, disk full: worth one retry
                self.store_errors += 1
                if attempt == 2:
                    log.warning("store write failed (%s); %d records lost", exc, len(records))
                else:
                    time.sleep(0.2)
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any bad record
                self._write_one_by_one(records, exc)
                return
            else:
                return

    def _write_one_by_one(self, records: list[Record], first: Exception) -> None:
        """A record the store refuses must not take its whole batch down with it."""
        lost = 0
        for record in records:
            try:
                self.store.write(self.session_id, [record])
            except Exception:  # noqa: BLE001 - as above
                lost += 1
        self.store_errors += 1
        log.warning("store write failed (%s); %d records lost", first, lost)

    def _retain(self) -> None:
        try:
            self.store.apply_retention(time.time(), self.retention)
        except sqlite3.Error as exc:
            self.store_errors += 1
            log.warning("store retention failed: %s", exc)

    # -- ending ----------------------------------------------------------------------

    def stop(self, exit_code: int | None, final: list[Record] | None = None) -> None:
        """Stop sampling, flush everything to the store and close the session."""
        if not self._started:
            return
        self._started = False
        self._stop.set()
        self._threads[0].join(timeout=10)
        if self.listener is not None:
            self.listener.stop()
        self.sweep_now()  # see the last exits
        with self._lock:
            self._queue.put(self.sampler.end_all())
        if final:
            self._queue.put(final)
        self._queue.put(None)
        self._threads[1].join(timeout=60)
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
        self._report_counters()
        if self._threads[1].is_alive():
            # Never share the connection with a writer still at work.
            log.warning("the store writer did not finish in time; session left open")
            return
        dropped = self.listener.dropped_by_probes if self.listener else 0
        try:
            self.store.end_session(self.session_id, exit_code, dropped)
        except sqlite3.Error as exc:
            log.warning("could not close the session in the store: %s", exc)

    def _report_counters(self) -> None:
        """Say what went wrong quietly during the session, if anything did."""
        listener = self.listener
        problems = {
            "failed store writes": self.store_errors,
            "messages the probes dropped": listener.dropped_by_probes if listener else 0,
            "malformed probe messages": listener.malformed if listener else 0,
            "refused probe connections": listener.refused if listener else 0,
        }
        for what, count in problems.items():
            if count:
                log.warning("%s: %d", what, count)
