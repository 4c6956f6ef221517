"""The warden's side of the control channel: ask one live worker process a question.

The probe listens on ``<control dir>/<pid>.sock`` (``probe/_control.py`` says who may
connect and where the socket lives). Here, before a byte is sent: the target must exist,
belong to this user (or we are root), and the process answering on the socket must be
the target itself, by the kernel's ``SO_PEERCRED``, not whatever now holds a stale path.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from typing import Any

import psutil

from celery_warden.exceptions import NotAWorker, ProcessNotFound, WardenError
from celery_warden.probe._control import MAX_REPLY, control_dirs, peer_credentials, socket_name

__all__ = ["ControlFailed", "NoProbe", "ask", "socket_for"]

INSTALL_HINT = (
    "start the worker under `celery-warden run -- celery -A proj worker ...`, or call "
    "`celery_warden.install(app)` in the app"
)


class NoProbe(WardenError):
    """The process has no probe to answer (not started under the warden)."""

    exit_code = 1


class ControlFailed(WardenError):
    """The probe was reached but the question could not be answered."""

    exit_code = 1


def _owner(pid: int) -> int:
    if pid <= 0:
        raise ProcessNotFound(f"{pid} is not a process id")
    try:
        return psutil.Process(pid).uids().real
    except psutil.NoSuchProcess:
        raise ProcessNotFound(f"no process with PID {pid}; check it with `ps -p {pid}`") from None
    except psutil.AccessDenied:
        raise NotAWorker(f"PID {pid} cannot be read by this user") from None


def socket_for(pid: int) -> str:
    """The control socket of ``pid``, checked: ours to ask, and really a socket."""
    uid = _owner(pid)
    me = os.geteuid()
    if me not in (uid, 0):
        raise NotAWorker(f"PID {pid} belongs to uid {uid}; only that user or root may diagnose it")
    looked = []
    for directory in control_dirs(uid):
        path = os.path.join(directory, socket_name(pid))
        looked.append(directory)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ControlFailed(f"cannot read {path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(info.st_mode):
            raise ControlFailed(f"{path} is not a socket (something else took the name)")
        if info.st_uid != uid:
            raise ControlFailed(f"{path} belongs to uid {info.st_uid}, not to the worker's user")
        return path
    raise NoProbe(
        f"PID {pid} has no celery-warden probe listening (looked in {', '.join(looked)}): "
        + INSTALL_HINT
    )


def ask(pid: int, request: dict[str, Any], *, timeout: float = 30.0) -> dict[str, Any]:
    """Send ``request`` to ``pid``'s probe and return its reply; every failure is one
    line (a :class:`WardenError`)."""
    path = socket_for(pid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            # Left by a probe that was killed, in this process or in an earlier one
            # that had this PID: either way, nothing listens here now.
            raise NoProbe(
                f"PID {pid} has no celery-warden probe listening (its control socket "
                f"{path} is stale): " + INSTALL_HINT
            ) from None
        peer_pid, _uid, _gid = peer_credentials(sock)
        if peer_pid != pid:
            raise ControlFailed(
                f"{path} is answered by PID {peer_pid}, not {pid}: a stale socket, refused"
            )
        sock.sendall(json.dumps(request, separators=(",", ":")).encode() + b"\n")
        data = _read_line(sock, pid)
    except TimeoutError:
        raise ControlFailed(f"PID {pid} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise ControlFailed(f"talking to PID {pid} failed: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlFailed(f"PID {pid} sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise ControlFailed(f"PID {pid} sent a malformed reply")
    if reply.get("error"):
        raise ControlFailed(f"PID {pid}: {reply['error']}")
    return reply


def _read_line(sock: socket.socket, pid: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            if psutil.pid_exists(pid):
                raise ControlFailed(f"PID {pid} closed the connection without an answer")
            raise ControlFailed(f"PID {pid} exited before it answered")
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            return b"".join(chunks).partition(b"\n")[0]
        if size > MAX_REPLY:
            raise ControlFailed(f"PID {pid}'s reply is larger than {MAX_REPLY} bytes")
