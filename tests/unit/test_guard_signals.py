"""The one audited signal function (RELIABILITY.md A3, A6, A10, F28): what it refuses,
what a dry run does, and that every call leaves an audit record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from celery_warden import _procs
from celery_warden._records import Role, SignalAudit
from celery_warden.guard.signals import Signaller, Target
from celery_warden.stackdump import has_handler

STACK = signal.SIGRTMIN + 7


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _target(proc: subprocess.Popen[bytes], role: Role = Role.CHILD) -> Target:
    ticks = _procs.read_stat(proc.pid).start_ticks
    return Target(_procs.open_verified(proc.pid, ticks, _procs.read_cmdline(proc.pid)), role)


def _signaller(audits: list[SignalAudit], *, dry_run: bool = False) -> Signaller:
    return Signaller(dry_run=dry_run, audit=audits.append, stack_signal=STACK)


def test_term_is_sent_through_the_pidfd_and_audited(sleeper: subprocess.Popen[bytes]) -> None:
    audits: list[SignalAudit] = []
    target = _target(sleeper)
    assert _signaller(audits).send(target, signal.SIGTERM, incident_id="i1") == "sent"
    assert sleeper.wait(timeout=10) == -signal.SIGTERM
    assert [(a.pid, a.signal, a.result, a.incident_id) for a in audits] == [
        (sleeper.pid, "SIGTERM", "sent", "i1")
    ]
    target.close()


def test_a_process_that_exited_is_gone_never_an_error(sleeper: subprocess.Popen[bytes]) -> None:
    audits: list[SignalAudit] = []
    target = _target(sleeper)
    sleeper.kill()
    sleeper.wait()  # reaped: its PID is free for anyone now
    assert _signaller(audits).send(target, signal.SIGKILL) == "gone"
    assert audits[-1].result == "gone"
    target.close()


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT])
def test_a_child_never_gets_what_celery_reads_as_a_command(
    sleeper: subprocess.Popen[bytes], signum: int
) -> None:
    audits: list[SignalAudit] = []
    result = _signaller(audits).send(_target(sleeper), signum)
    assert result.startswith("refused: ")
    assert sleeper.poll() is None  # nothing reached it
    assert audits[-1].result == result


def test_the_stack_signal_goes_only_where_a_handler_waits(
    sleeper: subprocess.Popen[bytes],
) -> None:
    audits: list[SignalAudit] = []
    assert not has_handler(sleeper.pid, STACK)
    result = _signaller(audits).send(_target(sleeper), STACK)
    assert "no handler" in result
    assert sleeper.poll() is None  # its default action would have killed it


def test_undiscovered_and_dangerous_targets_are_refused_before_any_syscall() -> None:
    audits: list[SignalAudit] = []
    signaller = _signaller(audits)
    assert "not discovered" in signaller.send(None, signal.SIGTERM)
    for pid in (0, -1, 1, 2, os.getpid(), os.getppid()):
        fake = Target(_procs.ProcessHandle(pid, 0, -1), Role.CHILD)  # fd -1: a syscall fails
        assert signaller.send(fake, signal.SIGKILL).startswith("refused: "), pid
    assert len(audits) == 7
    assert all(a.result.startswith("refused") for a in audits)


def test_a_dry_run_sends_nothing_and_says_what_it_would_have(
    sleeper: subprocess.Popen[bytes],
) -> None:
    audits: list[SignalAudit] = []
    assert _signaller(audits, dry_run=True).send(_target(sleeper), signal.SIGKILL) == "dry-run"
    assert sleeper.poll() is None
    assert audits[-1].result == "dry-run"


def test_open_verified_refuses_a_changed_identity(sleeper: subprocess.Popen[bytes]) -> None:
    ticks = _procs.read_stat(sleeper.pid).start_ticks
    with pytest.raises(_procs.IdentityMismatch):
        _procs.open_verified(sleeper.pid, ticks + 1, _procs.read_cmdline(sleeper.pid))
    with pytest.raises(_procs.IdentityMismatch):
        _procs.open_verified(sleeper.pid, ticks, ["something", "else"])
    with pytest.raises(ValueError, match="refusing"):
        _procs.open_verified(1, 0, [])
