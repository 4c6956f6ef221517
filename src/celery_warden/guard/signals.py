"""The one function through which the warden signals any process.

Every signal the warden sends, forwards or would send in a dry run goes through
:meth:`Signaller.send`, which

- sends only through a pidfd opened and verified when the process was *discovered*
  (``_procs.open_verified``): a PID reused since, even within one clock tick, cannot be
  hit (RELIABILITY.md, point 6 and test A1); there is no path from a bare PID to a signal;
- refuses PIDs 0, 1, 2 and anything not positive, the warden itself and its parent (the
  descriptor could not name them, but the rule is checked before any syscall anyway);
- refuses what a Celery process must never get: USR1 (a pool child's soft time limit),
  USR2, HUP, or a real-time signal whose handler is not installed (``SigCgt``) — a
  child is sent TERM, KILL and the configured stack signal only (point 2, test A10);
- writes one :class:`SignalAudit` per call, whatever happened, before returning.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from celery_warden import _procs
from celery_warden._records import Role, SignalAudit
from celery_warden.stackdump import has_handler

__all__ = ["Signaller", "Target", "signal_name"]

log = logging.getLogger("celery_warden")

_NEVER = frozenset({0, 1, 2})  # "every process", init, kthreadd
# What each role may be sent. A master also takes INT and QUIT: the warden forwards a
# Ctrl-C or a cold shutdown to it (Celery's meanings), never to a child.
_ALLOWED = {
    Role.MASTER: frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGKILL}),
    Role.CHILD: frozenset({signal.SIGTERM, signal.SIGKILL}),
    Role.DESCENDANT: frozenset({signal.SIGTERM, signal.SIGKILL}),
}


def signal_name(signum: int) -> str:
    """``SIGTERM``, or ``SIGRTMIN+7`` for a real-time signal."""
    if signal.SIGRTMIN <= signum <= signal.SIGRTMAX:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True, slots=True)
class Target:
    """A process the warden may signal: its verified pidfd and what it is."""

    handle: _procs.ProcessHandle
    role: Role

    @property
    def pid(self) -> int:
        return self.handle.pid

    @property
    def start_ticks(self) -> int:
        return self.handle.start_ticks

    def close(self) -> None:
        self.handle.close()


class Signaller:
    """Sends (or, in a dry run, records) signals, and audits every call.

    ``stack_signal`` is the real-time signal the probe registers a faulthandler on
    (0: none); it may go to any role, and only to a process that catches it.
    """

    def __init__(
        self,
        *,
        dry_run: bool,
        audit: Callable[[SignalAudit], None],
        stack_signal: int = 0,
    ) -> None:
        self.dry_run = dry_run
        self._audit = audit
        self._stack_signal = stack_signal
        self._lock = threading.Lock()
        self.sent = 0

    def _refusal(self, target: Target | None, signum: int) -> str | None:
        if target is None:
            return "not discovered: the warden signals only processes it found in a worker tree"
        pid = target.pid
        if pid in _NEVER or pid < 0:
            return f"PID {pid} is never a target"
        if pid == os.getpid():
            return "that is the warden itself"
        if pid == os.getppid():
            return "that is the warden's parent"
        if signum == self._stack_signal and signum:
            if not has_handler(pid, signum):
                return f"{signal_name(signum)} has no handler there (SigCgt); it would kill it"
            return None
        if signum not in _ALLOWED.get(target.role, frozenset()):
            return f"{signal_name(signum)} is never sent to a {target.role}"
        return None

    def send(
        self,
        target: Target | None,
        signum: int,
        *,
        incident_id: str | None = None,
        detail: str = "",
    ) -> str:
        """Send ``signum`` to ``target``; return ``sent``, ``gone`` (it had exited),
        ``dry-run``, or ``refused: <why>``. Never raises for a process that vanished."""
        refusal = self._refusal(target, signum)
        if refusal is not None:
            result = f"refused: {refusal}"
        elif self.dry_run:
            result = "dry-run"
        else:
            assert target is not None
            try:
                signal.pidfd_send_signal(target.handle.fd, signum)
            except ProcessLookupError:
                result = "gone"
            except OSError as exc:  # EPERM: another user's process; EBADF: a bug of ours
                result = f"refused: {exc.strerror or exc}"
            else:
                result = "sent"
                self.sent += 1
        pid = target.pid if target is not None else -1
        ticks = target.start_ticks if target is not None else -1
        record = SignalAudit(
            t=time.time(),
            pid=pid,
            start_ticks=ticks,
            signal=signal_name(signum),
            result=result,
            incident_id=incident_id,
            detail=detail,
        )
        log.info(
            "signal %s to PID %d: %s%s", record.signal, pid, result, f" ({detail})" * bool(detail)
        )
        with self._lock:
            try:
                self._audit(record)
            except Exception:
                log.exception("could not record the signal audit")
        return result
