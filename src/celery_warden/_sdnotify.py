"""systemd's notify protocol, for the warden run as a ``Type=notify`` unit with a
``WatchdogSec=`` (docs/deployment.md): READY when it watches, a watchdog ping after every
sweep, STOPPING when it stops. If the sampler's loop stalls, the pings stop and systemd
restarts the warden; the worker, in its own unit or its own session, carries on.

One datagram per message to ``$NOTIFY_SOCKET``; without it every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["Watchdog", "notify"]


def notify(message: str) -> bool:
    """Send ``message`` (``READY=1``...) to systemd; False when not under systemd or the
    socket is gone (never an error: the warden's work does not depend on it)."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


class Watchdog:
    """Pings systemd's watchdog at most every half ``WatchdogSec`` (from
    ``$WATCHDOG_USEC``, when ``$WATCHDOG_PID`` is unset or this process)."""

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC", "")
        owner = os.environ.get("WATCHDOG_PID", "")
        mine = not owner or owner == str(os.getpid())
        self.every = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else 0.0
        self._last = -float("inf")

    def ping(self) -> None:
        """Call after each sweep: a sampler that stops sweeping stops pinging."""
        if self.every and time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            notify("WATCHDOG=1")
