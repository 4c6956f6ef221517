"""Start workers under the warden (``run``) or attach to running ones (``watch``).

Signals: the worker is started in its own session, so a Ctrl-C in the terminal or a
SIGTERM from a process manager reaches the warden only; the warden forwards it to each
worker's *master* only. A signal to the whole group would hit the pool children too and
kill their in-flight tasks at once: that defeats Celery's warm shutdown
(RELIABILITY.md, points 1 and 7).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import IO, TYPE_CHECKING

from celery_warden import _procs, _sdnotify
from celery_warden._records import EndReason, ProcessEnd, Role
from celery_warden.exceptions import CommandNotFound, NoCommand, NoWorkerFound
from celery_warden.guard.signals import Target
from celery_warden.session import Session
from celery_warden.store import Record

if TYPE_CHECKING:
    from celery_warden.guard import Guard

__all__ = ["FORWARDED_SIGNALS", "forward_to_masters", "run_workers", "watch_workers"]

log = logging.getLogger("celery_warden")

# INT and TERM are Celery's warm shutdown, QUIT its cold shutdown. HUP (the terminal
# closed) becomes a warm shutdown too: the worker, in its own session, would otherwise
# outlive its warden unwatched. Celery's own HUP (re-exec the worker) is not forwarded.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP)


def _forwarded(signum: int) -> int:
    return signal.SIGTERM if signum == signal.SIGHUP else signum


@contextlib.contextmanager
def _handling(signals: Sequence[int], handler: Callable[[int], None]) -> Iterator[None]:
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        handler(signum)

    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be handled in the main thread (tests drive us there)
        return
    previous = {signum: signal.signal(signum, on_signal) for signum in signals}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def forward_to_masters(
    session: Session, signum: int, fallback: Sequence[subprocess.Popen[bytes]]
) -> None:
    """Send ``signum`` to every watched worker master, through the pidfd verified when
    it was discovered, by the session's audited signaller."""
    masters = session.masters()
    for info in masters:
        handle = session.handle(info.pid, info.start_ticks)
        target = Target(handle, Role.MASTER) if handle is not None else None
        try:
            session.signaller.send(target, signum, detail="forwarded to the worker master")
        finally:
            if target is not None:
                target.close()
    if not masters:
        # No worker master seen yet (it is still starting): the commands we started are
        # our own children, unreaped, so their PIDs cannot have been reused.
        for proc in fallback:
            if proc.poll() is not None:
                continue
            try:
                handle = _procs.open_verified(proc.pid, _procs.read_stat(proc.pid).start_ticks)
            except (_procs.Vanished, ValueError):
                continue
            target = Target(handle, Role.MASTER)
            try:
                session.signaller.send(target, signum, detail="forwarded to the started command")
            finally:
                target.close()


def _under_systemd(session: Session) -> None:
    """Under a ``Type=notify`` unit: ready once sampling starts, a watchdog ping after
    every sweep (nothing happens elsewhere)."""
    session.on_sweep(_sdnotify.Watchdog().ping)
    session.on_sweep(_ready_once())


def _ready_once() -> Callable[[], None]:
    sent = False

    def ready() -> None:
        nonlocal sent
        if not sent:
            sent = True
            _sdnotify.notify("READY=1")

    return ready


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def check_commands(commands: Sequence[Sequence[str]]) -> None:
    """Refuse an empty command before anything is started or stored."""
    if not commands or not all(commands):
        raise NoCommand(
            "nothing to run after `--`; try `celery-warden run -- celery -A proj worker`"
        )


def run_workers(
    session: Session,
    commands: Sequence[Sequence[str]],
    *,
    stdout: IO[bytes] | None = None,
    stderr: IO[bytes] | None = None,
    guard: Guard | None = None,
) -> int:
    """Start each command as a child of the warden, watch until all exit.

    Returns the exit code of the (first) command, shell style: 128 + N when killed by
    signal N. With a ``guard``, what outlived the worker of its lineage (orphans) is
    dealt with before returning.
    """
    check_commands(commands)
    procs: list[subprocess.Popen[bytes]] = []
    _under_systemd(session)
    session.start()
    if guard is not None:
        guard.start()
    env = session.probe_environment()
    try:
        for argv in commands:
            try:
                proc = subprocess.Popen(
                    list(argv), env=env, start_new_session=True, stdout=stdout, stderr=stderr
                )
            except OSError as exc:
                raise CommandNotFound(
                    f"cannot start {argv[0]!r}: {exc.strerror}; check the command and PATH"
                ) from None
            procs.append(proc)
            session.add_anchor(proc.pid)
            log.info("started %s as PID %d", " ".join(argv), proc.pid)
        ticks = {p.pid: _procs.read_stat(p.pid).start_ticks for p in procs}
        with _handling(
            FORWARDED_SIGNALS, lambda s: forward_to_masters(session, _forwarded(s), procs)
        ):
            while any(p.poll() is None for p in procs):
                time.sleep(0.1)
            if guard is not None:
                _settle(session, guard)
    except BaseException:
        for proc in procs:
            if proc.poll() is None:
                forward_to_masters(session, signal.SIGTERM, procs)
                break
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if guard is not None:
            guard.stop(timeout=0)
        session.stop(exit_code=1)
        raise
    if guard is not None:
        guard.stop()
    final: list[Record] = []
    for proc in procs:
        # Popen's returncode already is the store's convention: the code, or -signum.
        reason = EndReason.KILLED if proc.returncode < 0 else EndReason.EXITED
        final.append(ProcessEnd(proc.pid, ticks[proc.pid], time.time(), reason, proc.returncode))
    code = _exit_code(procs[0].returncode)
    session.stop(exit_code=code, final=final)
    return code


def _settle(session: Session, guard: Guard) -> None:
    """The worker has exited: give its orphans (what tasks spawned, pool children
    without PDEATHSIG) their grace and let the guard reap them before the session ends."""
    cfg = guard.config
    deadline = time.monotonic() + cfg.orphans.grace_seconds + cfg.recycle.grace_seconds + 10
    time.sleep(2 * session.config.interval_seconds)  # a sweep sees the master's end
    while time.monotonic() < deadline and session.tracked():
        if cfg.orphans.action != "kill" and not guard.orphans_pending():
            break
        time.sleep(0.2)


def resolve_masters(pids: Sequence[int], pattern: str | None) -> list[int]:
    """The worker masters to watch: those named by ``pids``, else all that match."""
    if pids:
        return sorted({_procs.describe_worker_pid(pid) for pid in pids})
    masters = _procs.find_worker_masters(pattern)
    if not masters:
        seen = len(_procs.list_pids())
        what = f" matching {pattern!r}" if pattern else ""
        raise NoWorkerFound(
            f"no Celery worker{what} found among {seen} processes; "
            "pass --pid to point at one, or start it with `celery-warden run`"
        )
    return masters


def watch_workers(
    session: Session,
    masters: Sequence[int],
    pattern: str | None,
    *,
    follow: bool,
    duration_seconds: float | None = None,
    guard: Guard | None = None,
) -> int:
    """Sample the worker ``masters`` until stopped (SIGINT/SIGTERM), or for a duration.

    Without ``follow`` it ends when their trees are gone; with it, it keeps looking for
    new workers matching ``pattern``, so a restarted worker is picked up again.
    """
    masters = list(masters)
    stop = threading.Event()
    for pid in masters:
        session.add_anchor(pid)
    _under_systemd(session)
    session.start()
    if guard is not None:
        guard.start()
    deadline = None if duration_seconds is None else time.monotonic() + duration_seconds
    next_lookup = time.monotonic() + session.config.rescan_seconds
    with _handling((signal.SIGINT, signal.SIGTERM), lambda _s: stop.set()):
        while not stop.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not follow:
                if session.sweeps and not session.tracked():
                    break  # every process of the watched trees has ended
            elif time.monotonic() >= next_lookup:
                next_lookup = time.monotonic() + session.config.rescan_seconds
                for pid in _procs.find_worker_masters(pattern):
                    if pid not in masters:
                        masters.append(pid)
                        session.add_anchor(pid)
    if guard is not None:
        guard.stop()
    session.stop(exit_code=0)
    return 0
