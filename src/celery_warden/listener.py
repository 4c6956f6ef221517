"""The warden's side of the probe channel: a unix stream socket in a private directory.

The directory is created 0700 (``tempfile.mkdtemp``) and the socket is bound under a
0177 umask, so only the warden's own user, or root, can connect; each connection's
peer credentials are checked again (``SO_PEERCRED``), in case the directory is ever
widened. Each worker process keeps one connection and writes newline-framed messages.
Anything that does not decode is counted and skipped: a bad client never stops the
warden.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import struct
import threading
from collections.abc import Callable

from celery_warden.probe import wire

__all__ = ["ProbeListener", "bind_server"]

log = logging.getLogger("celery_warden")

_READ_SIZE = 256 * 1024
_GATHER_SECONDS = 0.02
_MAX_CLIENTS = 4096  # more pool processes than any host runs
_UCRED = struct.Struct("3i")  # pid, uid, gid


def bind_server(path: str) -> socket.socket:
    """A unix stream socket bound at ``path`` (owner-only) and listening."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(path)
    finally:
        os.umask(old_umask)
    server.listen(128)
    return server


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(creds)[1])


class ProbeListener:
    """Receives probe messages on ``path`` and hands each to ``deliver`` (a thread)."""

    def __init__(
        self,
        path: str,
        deliver: Callable[[wire.Message], None],
        *,
        server: socket.socket | None = None,
    ) -> None:
        """Bind ``path``, or take ``server``, a socket already bound there and listening
        (``install(app)`` binds it in the worker before any child forks, so no early
        message is lost while the collector starts)."""
        self.path = path
        self.received = 0
        self.malformed = 0
        self.refused = 0
        # The latest dropped count each process reported (the counts are cumulative).
        self._dropped: dict[tuple[int, int], int] = {}
        self._deliver = deliver
        self._server = server or bind_server(path)
        self._server.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ)
        self._buffers: dict[socket.socket, bytes] = {}
        self._skipping: set[socket.socket] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="warden-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._poll(0.2):
                # Let messages gather before reading again: a wake-up per message costs
                # the warden more than decoding it, and the kernel buffers ~200 KB per
                # process, seconds of messages even for the shortest tasks.
                self._stop.wait(_GATHER_SECONDS)

    def _poll(self, timeout: float) -> int:
        events = self._selector.select(timeout)
        for key, _ in events:
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is self._server:
                self._accept()
            else:
                self._read(sock)
        return len(events)

    def _accept(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        if len(self._buffers) >= _MAX_CLIENTS or _peer_uid(conn) not in (0, os.getuid()):
            self.refused += 1
            conn.close()
            return
        conn.setblocking(False)
        self._buffers[conn] = b""
        self._selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        *lines, rest = (self._buffers[conn] + data).split(b"\n")
        if conn in self._skipping:  # inside a line too long to be a probe's
            if lines:
                self._skipping.discard(conn)
                lines = lines[1:]  # its end
            else:
                rest = b""
        if len(rest) > wire.MAX_LINE:
            # No probe writes a line this long: count it and read on from the next
            # newline, rather than close the connection and lose what follows.
            self.malformed += 1
            self._skipping.add(conn)
            rest = b""
        self._buffers[conn] = rest
        for line in lines:
            if len(line) > wire.MAX_LINE:
                self.malformed += 1
            else:
                self._handle(line)

    def _drop(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        self._buffers.pop(conn, None)
        self._skipping.discard(conn)
        conn.close()

    def _handle(self, line: bytes) -> None:
        try:
            message, dropped = wire.decode(line)
        except Exception:  # noqa: BLE001 - any bad line (even RecursionError) is skipped
            self.malformed += 1
            return
        self.received += 1
        if dropped:
            self._dropped[message.pid, message.start_ticks] = dropped
        try:
            self._deliver(message)
        except Exception:
            log.exception("could not hand over a probe message")

    @property
    def dropped_by_probes(self) -> int:
        """Messages the probes could not send, as they last reported."""
        return sum(self._dropped.values())

    def stop(self) -> None:
        """Stop after reading what the probes already sent."""
        self._stop.set()
        self._thread.join(timeout=2)
        for _ in range(1000):  # bounded: a client that never stops writing cannot hold us
            if not (self._poll(0) and self._buffers):
                break
        for conn in list(self._buffers):
            self._drop(conn)
        self._selector.close()
        self._server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
