"""The probe's side of the channel: newline-framed messages on a unix stream socket
that never block the task.

A stream socket, not datagrams: Linux queues at most ``net.unix.max_dgram_qlen``
datagrams (10 by default) per receiver, so a burst of short tasks would drop messages
while the warden's thread waits for the GIL; a stream socket buffers ~200 KB per
connection. The socket is non-blocking: when the buffer is full the message is
dropped and counted, and when the warden is gone the probe retries the connection at
most once a second. The task never waits and the probe's memory stays bounded.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import weakref
from collections.abc import Callable

__all__ = ["Channel", "renew_locks_after_fork"]

_RETRY_SECONDS = 1.0
_MAX_PENDING = 64 * 1024  # the unsent tail of a message cut short by a full buffer


def renew_locks_after_fork(owner: object, *names: str) -> None:
    """Give ``owner`` fresh locks ``names`` in a forked child: a task that forks while
    another thread holds one (the heartbeat sending) would hand the child a lock nobody
    will ever release."""
    ref = weakref.ref(owner)

    def renew() -> None:
        alive = ref()
        if alive is not None:
            for name in names:
                setattr(alive, name, threading.Lock())

    os.register_at_fork(after_in_child=renew)


class Channel:
    """Sends messages to the warden listening on ``path``; drops what cannot go now."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sent = 0
        self.dropped = 0
        self._sock: socket.socket | None = None
        self._pid = 0
        self._pending = b""
        self._retry_at = 0.0
        self._lock = threading.Lock()
        renew_locks_after_fork(self, "_lock")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._pending = b""

    def _socket(self) -> socket.socket | None:
        pid = os.getpid()
        if self._pid != pid:
            # A forked pool child inherits its master's connection: writing to it would
            # interleave with the master's messages, so each process opens its own.
            self._pid, self.sent, self.dropped = pid, 0, 0
            self.close()
        if self._sock is None and time.monotonic() >= self._retry_at:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(self.path)  # a unix socket connects at once or fails at once
            except OSError:
                sock.close()
                self._retry_at = time.monotonic() + _RETRY_SECONDS
                return None
            self._sock = sock
        return self._sock

    def send(self, data: bytes) -> bool:
        """Send one message (``data`` ends with a newline); False when it was dropped.

        Thread-safe: with ``--pool threads`` several tasks end at once, and two partial
        writes interleaved would break the framing.
        """
        with self._lock:
            return self._send(data)

    def send_built(self, build: Callable[[], bytes]) -> bool:
        """Build a message and send it under the same lock, so no other message of
        this process is sent between the two."""
        with self._lock:
            return self._send(build())

    def _send(self, data: bytes) -> bool:
        sock = self._socket()
        if sock is None:
            self.dropped += 1
            return False
        try:
            if self._pending:
                # Finish the message a full buffer cut short, or the stream is garbage.
                self._pending = self._pending[sock.send(self._pending, socket.MSG_NOSIGNAL) :]
                if self._pending:
                    self.dropped += 1
                    return False
            written = sock.send(data, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            self.dropped += 1
            return False
        except OSError:  # the warden went away: reconnect later
            self.close()
            self._retry_at = time.monotonic() + _RETRY_SECONDS
            self.dropped += 1
            return False
        if written < len(data):
            self._pending = data[written:]
            if len(self._pending) > _MAX_PENDING:
                self.close()
        self.sent += 1
        return True
