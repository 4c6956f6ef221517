"""The control channel, with real sockets and real processes: who may ask, where the
socket lives, and what a bad request gets."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_warden import control
from celery_warden.exceptions import NotAWorker, ProcessNotFound
from celery_warden.probe._control import (
    CONTROL_DIR_ENV,
    MAX_REQUEST,
    ControlServer,
    socket_name,
)

NOBODY = 65534


@pytest.fixture
def control_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "ctl"
    monkeypatch.setenv(CONTROL_DIR_ENV, str(directory))
    return directory


def _boom(request: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("the handler failed")


@pytest.fixture
def server(control_dir: Path) -> Iterator[ControlServer]:
    served = ControlServer({"echo": lambda request: {"got": request.get("value")}, "boom": _boom})
    assert served.start() is not None
    yield served
    served.close()


def _raw(path: str, data: bytes, *, shut: bool = False) -> dict[str, Any]:
    """Send raw bytes and read the one-line reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(path)
        # the server stops reading a request too large: its reply is there all the same
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    result: dict[str, Any] = json.loads(reply)
    return result


def test_the_socket_is_private_and_answers_its_own_user(
    server: ControlServer, control_dir: Path
) -> None:
    assert server.path == str(control_dir / socket_name(os.getpid()))
    assert stat.S_IMODE(control_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert control.ask(os.getpid(), {"op": "echo", "value": 7}) == {"got": 7}


def test_bad_requests_get_an_error_and_the_server_goes_on(server: ControlServer) -> None:
    assert server.path is not None
    too_big = b"{" + b" " * (MAX_REQUEST + 10) + b"}\n"
    assert "larger than" in _raw(server.path, too_big)["error"]
    assert "truncated" in _raw(server.path, b'{"op": "echo"', shut=True)["error"]
    assert "malformed" in _raw(server.path, b"not json\n")["error"]
    assert "not a JSON object" in _raw(server.path, b"[1, 2]\n")["error"]
    assert "unknown op" in _raw(server.path, b'{"op": "rm -rf"}\n')["error"]
    with pytest.raises(control.ControlFailed, match="the handler failed"):
        control.ask(os.getpid(), {"op": "boom"})
    assert control.ask(os.getpid(), {"op": "echo", "value": "still here"}) == {"got": "still here"}


@pytest.mark.parametrize("taken_by", ["file", "symlink", "open-dir"])
def test_a_taken_or_open_path_is_refused(control_dir: Path, tmp_path: Path, taken_by: str) -> None:
    """A name taken by a file or a symlink, or a directory others may enter: no socket,
    one reason, and the file there is left as it was."""
    if taken_by == "open-dir":
        control_dir.mkdir(mode=0o755)
        control_dir.chmod(0o755)
    else:
        control_dir.mkdir(mode=0o700)
        target = control_dir / socket_name(os.getpid())
        if taken_by == "file":
            target.write_text("precious")
        else:
            target.symlink_to(tmp_path / "elsewhere")
    served = ControlServer({})
    try:
        # the fallback directories of the real user may work: only ours is judged here
        path = served.start()
        assert path is None or not path.startswith(str(control_dir))
    finally:
        served.close()
    if taken_by == "file":
        assert (control_dir / socket_name(os.getpid())).read_text() == "precious"
    if taken_by == "symlink":
        assert (control_dir / socket_name(os.getpid())).is_symlink()


def _socket_nobody_listens_on(path: str) -> None:
    """What a probe killed with SIGKILL leaves behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)


def test_a_stale_socket_or_another_process_answering_is_refused(control_dir: Path) -> None:
    control_dir.mkdir(mode=0o700)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        path = str(control_dir / socket_name(sleeper.pid))
        _socket_nobody_listens_on(path)
        with pytest.raises(control.NoProbe, match="stale"):
            control.ask(sleeper.pid, {"op": "hello"})
        os.unlink(path)
        # this process listening under the sleeper's name
        squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        squatter.bind(path)
        squatter.listen(1)
        try:
            with pytest.raises(control.ControlFailed, match=f"not {sleeper.pid}"):
                control.ask(sleeper.pid, {"op": "hello"})
        finally:
            squatter.close()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_socket_older_than_its_process_is_a_leftover_of_the_pid_s_last_owner(
    control_dir: Path,
) -> None:
    """A worker killed with SIGKILL leaves its socket; a new process given the same PID
    later has no probe, and is told so (whatever the clocks say)."""
    control_dir.mkdir(mode=0o700)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        path = str(control_dir / socket_name(sleeper.pid))
        _socket_nobody_listens_on(path)
        hour_ago = time.time() - 3600
        os.utime(path, (hour_ago, hour_ago), follow_symlinks=False)
        with pytest.raises(control.NoProbe, match="no celery-warden probe listening"):
            control.ask(sleeper.pid, {"op": "hello"})
        assert os.path.exists(path)  # reading never deletes what it did not make
    finally:
        sleeper.kill()
        sleeper.wait()


def test_no_probe_and_no_process_are_one_line(control_dir: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(control.NoProbe, match="celery-warden run"):
            control.ask(sleeper.pid, {"op": "hello"})
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(ProcessNotFound):
        control.ask(sleeper.pid, {"op": "hello"})


def _in_child_as_nobody(action: Any) -> str:
    """Run ``action`` in a forked child that dropped to nobody; its outcome as text."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            outcome = str(action())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            outcome = f"{type(exc).__name__}: {exc}"
        os.write(write, outcome.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        outcome = f.read().decode()
    os.waitpid(pid, 0)
    return outcome


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_is_refused_by_the_client() -> None:
    """A user who is not the worker's (and not root) is told so before any connection."""
    me = os.getpid()
    outcome = _in_child_as_nobody(lambda: control.socket_for(me))
    assert outcome.startswith(NotAWorker.__name__), outcome
    assert "only that user or root" in outcome


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_is_refused_by_the_server() -> None:
    """Even on a socket others could reach, the server answers only its own user or
    root, by the kernel's peer credentials."""
    served = ControlServer({"echo": lambda request: {"got": 1}})
    directory = tempfile.mkdtemp()
    os.chmod(directory, 0o777)  # noqa: S103 - the point: a socket others can reach
    path = os.path.join(directory, "open.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o777)  # noqa: S103
    listener.listen(1)
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                os.write(write, json.dumps(_raw(path, b'{"op": "echo"}\n')).encode())
            finally:
                os._exit(0)
        os.close(write)
        conn, _ = listener.accept()
        slots = served._slots
        assert slots.acquire(blocking=False)
        served._answer(conn, slots)  # what the server thread runs per connection
        with os.fdopen(read, "rb") as f:
            reply = json.loads(f.read())
        os.waitpid(pid, 0)
        assert "may not diagnose" in reply["error"]
    finally:
        listener.close()
        os.unlink(path)
        os.rmdir(directory)
