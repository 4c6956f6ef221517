"""The warden's side of the probe channel survives whatever a client sends."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from celery_warden.listener import ProbeListener
from celery_warden.probe import wire
from tests._support import wait_until


def test_bad_lines_are_counted_and_the_listener_goes_on(tmp_path: Path) -> None:
    """Malformed lines (even ones that blow the JSON parser's stack) are counted and
    skipped; good lines before and after are delivered."""
    # GIVEN a listening warden
    delivered: list[wire.Message] = []
    listener = ProbeListener(str(tmp_path / "probe.sock"), delivered.append)
    listener.start()
    good = wire.encode("s", 1, 2, "id", "proj.add", 3.0)
    try:
        # WHEN a client sends a good line, garbage, a too-deep line, and a good line
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(listener.path)
            client.sendall(good + b"garbage\n" + b"[" * 15000 + b"\n" + good)
            wait_until(lambda: len(delivered) == 2, timeout=10, what="two good messages")
        # THEN both good messages arrived and the two bad ones were counted
        assert listener.malformed == 2
        assert listener.received == 2
    finally:
        listener.stop()


def test_a_line_longer_than_any_message_is_skipped_not_buffered(tmp_path: Path) -> None:
    """A line past the size limit is counted and skipped without holding it in memory;
    the connection stays, and the next line is read."""
    delivered: list[wire.Message] = []
    listener = ProbeListener(str(tmp_path / "probe.sock"), delivered.append)
    listener.start()
    good = wire.encode("s", 1, 2, "id", "proj.add", 3.0)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(listener.path)
            client.sendall(b"x" * (wire.MAX_LINE + 10))
            wait_until(lambda: listener.malformed == 1, timeout=10, what="the long line")
            client.sendall(b"x" * (3 * wire.MAX_LINE))  # still the same line
            time.sleep(0.1)
            client.sendall(b"x\n" + good)
            wait_until(lambda: delivered, timeout=10, what="the line after it")
        assert listener.malformed == 1
        assert listener.received == 1
    finally:
        listener.stop()
