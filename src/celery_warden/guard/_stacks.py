"""Capture a hung child's stack before it is killed (RELIABILITY.md, E23).

py-spy reads the stacks from outside through ptrace, even while a task holds the GIL
in C code; it runs under a timeout, so a py-spy that hangs cannot delay the kill. Where
ptrace is not permitted (another user without CAP_SYS_PTRACE, Yama scope 3), the
probe's faulthandler, registered on a real-time signal, writes the stacks from a C
signal handler into a file the warden reads; that signal is sent only after ``SigCgt``
shows the handler is there (otherwise its default action would kill the child).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from celery_warden import _procs, stackdump
from celery_warden.guard.signals import Signaller, Target
from celery_warden.probe._stack import STACK_SIGNAL

__all__ = ["Stack", "capture", "find_py_spy"]


@dataclass(frozen=True, slots=True)
class Stack:
    """The stacks captured (``text``), by what (``method``), or why none (``unavailable``)."""

    text: str | None
    method: str | None
    unavailable: str | None = None

    def stored(self) -> str:
        """What the incident keeps: the stacks, or ``dump_unavailable: <why>``."""
        return self.text if self.text else f"dump_unavailable: {self.unavailable}"


def find_py_spy() -> str | None:
    """py-spy on PATH, or beside this Python (the ``stacks`` extra installs it there)."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return shutil.which("py-spy") or (beside if os.access(beside, os.X_OK) else None)


def _py_spy(pid: int, timeout: float, *, nonblocking: bool) -> tuple[str | None, str]:
    spy = find_py_spy()
    if spy is None:
        return None, "py-spy is not installed (pip install 'celery-warden[stacks]')"
    try:
        done = subprocess.run(
            [spy, "dump", "--pid", str(pid), *["--nonblocking"] * nonblocking],
            env={**os.environ, "RUST_BACKTRACE": "0", "RUST_LIB_BACKTRACE": "0"},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"py-spy did not finish within {timeout:g} s"
    except OSError as exc:
        return None, f"py-spy could not start: {exc.strerror or exc}"
    if done.returncode != 0 or not done.stdout.strip():
        return None, f"py-spy: {_py_spy_error(done.stderr)}"
    return done.stdout, ""


def _py_spy_error(stderr: str) -> str:
    """py-spy's own reason: its ``Error:`` line and the causes under it, without the
    backtrace ``RUST_BACKTRACE`` adds."""
    lines = [line.strip() for line in stderr.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("Error:"):
            causes = []
            for cause in lines[i + 1 :]:
                if cause.startswith("Stack backtrace:"):
                    break
                if cause and cause != "Caused by:":
                    causes.append(cause.lstrip("0123456789: "))
            return "; ".join([line.removeprefix("Error:").strip(), *causes])
    return next((line for line in lines if line), "no output")


def _faulthandler(
    signaller: Signaller, target: Target, timeout: float, incident_id: str | None
) -> tuple[str | None, str]:
    path = stackdump.stack_file_for(target.pid)
    if path is None:
        return None, "the probe registered no faulthandler file for this process"
    if not stackdump.has_handler(target.pid, STACK_SIGNAL):
        return None, "no faulthandler on the stack signal (SigCgt)"
    try:
        offset = path.stat().st_size
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror}"
    result = signaller.send(target, STACK_SIGNAL, incident_id=incident_id, detail="stack dump")
    if result != "sent":
        return None, f"stack signal {result}"
    text = stackdump.read_new(path, offset, timeout)
    return (text, "") if text.strip() else (None, "the faulthandler wrote nothing")


def capture(
    signaller: Signaller,
    target: Target,
    method: str,
    timeout: float,
    *,
    stopped: bool = False,
    incident_id: str | None = None,
) -> Stack:
    """The stacks of ``target`` by ``method`` (``auto``: py-spy, then faulthandler;
    a dry run sends no signal, so py-spy alone). A ``stopped`` process (SIGSTOP) cannot
    be suspended again nor run a signal handler: py-spy reads it without pausing."""
    if method == "none":
        return Stack(None, None, "stack capture is turned off (hang.stack = none)")
    reasons = []
    if method in ("auto", "py-spy"):
        # py-spy takes a bare PID: checked through the pidfd before and after, so the
        # stacks of a process that took over the PID are never stored as this one's.
        if _procs.has_exited(target.handle):
            return Stack(None, None, "it exited before its stack was read")
        # A dry run reads without pausing the process (py-spy --nonblocking).
        nonblocking = signaller.dry_run or stopped
        text, why = _py_spy(target.pid, timeout, nonblocking=nonblocking)
        if _procs.has_exited(target.handle):
            return Stack(None, None, "it exited while its stack was read")
        if text:
            return Stack(text, "py-spy")
        reasons.append(why)
    if method in ("auto", "faulthandler") and not signaller.dry_run and not stopped:
        text, why = _faulthandler(signaller, target, min(timeout, 5.0), incident_id)
        if text:
            return Stack(text, "faulthandler")
        reasons.append(why)
    return Stack(None, None, "; ".join(reasons))
