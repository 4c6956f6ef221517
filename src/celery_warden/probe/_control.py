"""The probe's control channel: ``celery-warden diagnose`` asks a live worker process
for its heap, its allocator's state, or a trace of its next calls of one task name.

Who may ask: a unix stream socket ``<pid>.sock`` with mode 0600, in a directory of the
worker's user with mode 0700, and on every connection the peer's credentials from the
kernel (``SO_PEERCRED``): only the worker's own user or root is answered. Never Celery's
remote control, which anyone holding the broker URL can send.

Where: the first of :func:`control_dirs` that is, or can be made, private. The client
tries the same list for the target's user and checks, again by ``SO_PEERCRED``, that the
process answering is the one it asked for (a stale socket of a dead process whose PID
was reused is refused, not believed).

What: one JSON request line (at most ``MAX_REQUEST`` bytes), one JSON reply line. Each
connection is served on a thread of its own (at most ``MAX_CONNECTIONS`` at once, so a
long trace does not keep a memory query waiting); a handler's failure becomes an
``{"error": ...}`` reply. A handler whose action can end the process (``recycle``) puts
it in its reply under ``AFTER_REPLY``: it runs once the reply is sent, so the process
cannot exit before its answer is out. Nothing here can raise into the worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "AFTER_REPLY",
    "CONTROL_DIR_ENV",
    "MAX_REPLY",
    "MAX_REQUEST",
    "ControlError",
    "ControlServer",
    "control_dirs",
    "peer_credentials",
    "private_dir",
    "socket_name",
]

CONTROL_DIR_ENV = "CELERY_WARDEN_CONTROL_DIR"
MAX_REQUEST = 64 * 1024
MAX_REPLY = 16 * 1024 * 1024
MAX_CONNECTIONS = 4
READ_TIMEOUT_SECONDS = 10.0

Handler = Callable[[dict[str, Any]], dict[str, Any]]
AFTER_REPLY = "_after_reply"  # a reply's key for what to run once it is sent

_log = logging.getLogger("celery_warden.probe")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlError(Exception):
    """The control channel cannot be set up or used; the message is one line."""


def control_dirs(uid: int) -> list[str]:
    """Where ``uid``'s control sockets may be, in the order they are tried.

    It depends on nothing the worker and a later shell might see differently (``TMPDIR``,
    ``XDG_RUNTIME_DIR``), only on the override and on what exists.
    """
    dirs = []
    override = os.environ.get(CONTROL_DIR_ENV)
    if override:
        dirs.append(override)
    runtime = f"/run/user/{uid}"
    with contextlib.suppress(OSError):
        if os.stat(runtime).st_uid == uid:
            dirs.append(f"{runtime}/celery-warden")
    dirs.append(f"/tmp/celery-warden-{uid}")  # noqa: S108 - checked private below
    return dirs


def private_dir(path: str) -> str:
    """Make ``path`` a directory only this user can enter, or check that it is one.

    A symlink, a file, another user's directory or one others may enter is refused:
    in a shared ``/tmp`` the name can be taken before us.
    """
    uid = os.geteuid()
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise ControlError(f"cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ControlError(f"{path} is taken by something that is not a directory")
    if info.st_uid != uid:
        raise ControlError(f"{path} belongs to uid {info.st_uid}, not to this user ({uid})")
    if info.st_mode & 0o077:
        raise ControlError(f"{path} is open to other users (mode {info.st_mode & 0o777:o})")
    return path


def socket_name(pid: int) -> str:
    return f"{pid}.sock"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """The (pid, uid, gid) the kernel vouches for at the other end of ``sock``."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


def _bind(path: str) -> socket.socket:
    """Bind a listening socket at ``path``; a stale socket of ours there is replaced,
    anything else there is refused."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid():
            raise ControlError(f"{path} is taken by something that is not our socket")
        os.unlink(path)  # our dead process's socket: this PID is ours now
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(8)
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


class ControlServer:
    """Answers control requests for this process on a daemon thread.

    ``handlers`` maps an ``op`` to a function of the request returning the reply.
    """

    def __init__(self, handlers: dict[str, Handler]) -> None:
        self.handlers = handlers
        self.path: str | None = None
        self.error: str | None = None
        self._sock: socket.socket | None = None
        self._pid = 0
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """In a forked child the listening socket is the parent's: close our copy (the
        child binds its own when it starts serving)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self.path = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def start(self) -> str | None:
        """Listen for this process (once per process); the socket's path, or None with
        the reason in ``error`` (logged once: the worker goes on without it)."""
        pid = os.getpid()
        if self._pid == pid:
            return self.path
        self._pid = pid
        self.error = None
        for directory in control_dirs(os.geteuid()):
            try:
                sock = _bind(os.path.join(private_dir(directory), socket_name(pid)))
            except ControlError as exc:
                self.error = str(exc)
                continue
            self._sock, self.path, self.error = sock, sock.getsockname(), None
            thread = threading.Thread(
                target=self._serve, args=(sock,), name="celery-warden-control", daemon=True
            )
            thread.start()
            return self.path
        _log.warning("celery-warden: no control socket for pid %d: %s", pid, self.error)
        return None

    def close(self) -> None:
        sock, path = self._sock, self.path
        self._forget()
        if path is not None and sock is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _serve(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed
            slots = self._slots  # released to the same semaphore, even if close() renews it
            try:
                if not slots.acquire(blocking=False):
                    _reply(conn, {"error": "busy: too many diagnoses of this process at once"})
                    conn.close()
                    continue
                threading.Thread(
                    target=self._answer,
                    args=(conn, slots),
                    name="celery-warden-control-conn",
                    daemon=True,
                ).start()
            except Exception:
                conn.close()

    def _answer(self, conn: socket.socket, slots: threading.BoundedSemaphore) -> None:
        try:
            with conn:
                _pid, uid, _gid = peer_credentials(conn)
                if uid not in (os.geteuid(), 0):
                    _reply(conn, {"error": f"uid {uid} may not diagnose this process"})
                    return
                request = _read_request(conn)
                if isinstance(request, str):
                    _reply(conn, {"error": request})
                    return
                request["_closed"] = lambda: _peer_closed(conn)
                handler = self.handlers.get(str(request.get("op")))
                if handler is None:
                    _reply(conn, {"error": f"unknown op {str(request.get('op'))[:40]!r}"})
                    return
                try:
                    reply = handler(request)
                except Exception as exc:  # a diagnosis failing must not end the worker
                    reply = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                after = reply.pop(AFTER_REPLY, None)
                try:
                    _reply(conn, reply)
                finally:
                    if after is not None:
                        after()
        except Exception:
            _log.debug("celery-warden: control connection failed", exc_info=True)
        finally:
            slots.release()


def _read_request(conn: socket.socket) -> dict[str, Any] | str:
    """One request line, or why there is none."""
    conn.settimeout(READ_TIMEOUT_SECONDS)
    data = b""
    while b"\n" not in data:
        try:
            chunk = conn.recv(MAX_REQUEST + 1 - len(data))
        except TimeoutError:
            return "request not finished in time"
        if not chunk:
            return "truncated request (no end of line)"
        data += chunk
        if len(data) > MAX_REQUEST:
            return f"request larger than {MAX_REQUEST} bytes"
    line = data.partition(b"\n")[0]
    try:
        request = json.loads(line)
    except ValueError:
        return "malformed request (not JSON)"
    if not isinstance(request, dict):
        return "malformed request (not a JSON object)"
    return request


# Combined once, here: combining flags makes a new enum member, which the enum caches for
# good; made during a trace, it would show among what the traced call kept.
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


def _peer_closed(conn: socket.socket) -> bool:
    """Whether the client has hung up (a long trace stops early then)."""
    try:
        return conn.recv(1, _PEEK_NOW) == b""
    except (BlockingIOError, InterruptedError, TimeoutError):
        return False
    except OSError:
        return True


def _reply(conn: socket.socket, reply: dict[str, Any]) -> None:
    data = json.dumps(reply, separators=(",", ":"), default=str).encode() + b"\n"
    if len(data) > MAX_REPLY:
        data = json.dumps({"error": f"reply larger than {MAX_REPLY} bytes"}).encode() + b"\n"
    conn.settimeout(READ_TIMEOUT_SECONDS)
    with contextlib.suppress(OSError):
        conn.sendall(data)
