"""systemd's notify protocol against a datagram socket of the test's own."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from celery_warden._sdnotify import Watchdog, notify


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    return sock


def test_messages_reach_systemd(systemd: socket.socket) -> None:
    assert notify("READY=1")
    assert systemd.recv(100) == b"READY=1"
    systemd.close()


def test_without_systemd_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert not notify("READY=1")  # a stale socket is not an error


def test_the_watchdog_pings_at_half_its_period(
    systemd: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")  # WatchdogSec=10
    watchdog = Watchdog()
    assert watchdog.every == 5.0
    watchdog.ping()
    watchdog.ping()  # too soon: one datagram only
    assert systemd.recv(100) == b"WATCHDOG=1"
    systemd.setblocking(False)
    with pytest.raises(BlockingIOError):
        systemd.recv(100)
    systemd.close()


def test_a_watchdog_meant_for_another_process_is_not_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert Watchdog().every == 0.0
