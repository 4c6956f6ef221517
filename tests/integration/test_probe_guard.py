"""What the probe gives the guard, in real workers on Redis: a soft recycle that
never interrupts a task, a stack dump of a child stuck in C code, and the app's settings
for the startup self-check."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

import celery_warden
from celery_warden import stackdump
from celery_warden._records import (
    EndReason,
    ProcessEnd,
    ProcessInfo,
    TaskFinished,
    TaskStarted,
    TaskState,
)
from celery_warden.listener import ProbeListener
from celery_warden.live import LiveView
from celery_warden.probe import SITE_DIR, wire
from celery_warden.probe._boot import PACKAGE_ENV, SOCKET_ENV
from celery_warden.probe._control import CONTROL_DIR_ENV, socket_name
from celery_warden.probe._hooks import HEARTBEAT_ENV
from celery_warden.probe._stack import STACK_SIGNAL
from tests._support import wait_until
from tests.integration._workers import APP_DIR, BROKERS, marked_line, worker_env

pytestmark = pytest.mark.integration

GUARD_FILE = APP_DIR / "warden_guard.py"
EX_RECYCLE = 0x9B  # billiard's exit code for a child that leaves by its own limits


def _line(name: str) -> int:
    return marked_line(GUARD_FILE, name)


@dataclass
class Guarded:
    """A worker of the guard app, and what its probe said, as the warden hears it."""

    worker: subprocess.Popen[bytes]
    queue: str
    control_dir: Path
    log: Path
    messages: list[wire.Message]  # every probe message, in order
    live: LiveView  # fed the same messages, as the warden's session feeds its own
    send_task: Callable[..., Any]

    def send(self, name: str, *args: object) -> None:
        self.send_task(name, args=args, queue=self.queue)

    def ask(self, pid: int, request: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """One control request, straight to the process's socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.control_dir / socket_name(pid)))
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(65536)
                assert chunk, f"PID {pid} closed the connection without an answer"
                reply += chunk
        answer: dict[str, Any] = json.loads(reply)
        return answer

    def of(self, kind: type[Any]) -> list[Any]:
        return [m for m in list(self.messages) if isinstance(m, kind)]

    def children(self) -> list[int]:
        """Pool children that announced themselves and have not said they left."""
        ended = {m.pid for m in self.of(ProcessEnd)}
        return [m.pid for m in self.of(ProcessInfo) if m.pid not in ended]

    def running(self, name: str) -> int | None:
        """The pid of a child the live view shows running ``name``."""
        for activity in self.live.activity():
            if any(task.name == name for task in activity.running):
                return activity.pid
        return None

    def finished(self, name: str) -> list[TaskFinished]:
        return [m for m in self.of(TaskFinished) if m.name == name]

    def end_of(self, pid: int) -> ProcessEnd | None:
        return next((m for m in self.of(ProcessEnd) if m.pid == pid), None)


@pytest.fixture
def guarded(
    spawn: Callable[..., subprocess.Popen[bytes]],
    queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Iterator[Guarded]:
    """A worker under the probe (prefork with two children, or the pool the test asks
    for indirectly), heard by a listener here; the control directory is the test's own
    (the test process looks there too)."""
    from celery import Celery

    pool = getattr(request, "param", "prefork")
    control_dir = tmp_path / "ctl"
    monkeypatch.setenv(CONTROL_DIR_ENV, str(control_dir))
    env = worker_env(BROKERS["redis"])
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), env["PYTHONPATH"]])
    env[SOCKET_ENV] = str(tmp_path / "probe.sock")
    env[PACKAGE_ENV] = str(Path(celery_warden.__file__).parent)
    env[HEARTBEAT_ENV] = "0.2"
    env[CONTROL_DIR_ENV] = str(control_dir)
    log = tmp_path / "worker.log"
    argv = [
        sys.executable, "-m", "celery", "-A", "warden_guard", "worker",
        "--pool", pool, "-c", "2", "-Q", queue, "-n", f"{queue}@%h", "-l", "info",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    messages: list[wire.Message] = []
    live = LiveView()

    def deliver(message: wire.Message) -> None:  # as the warden's session does
        messages.append(message)
        live.update(message)

    # Listening before the worker starts, so not even its first words are missed.
    listener = ProbeListener(env[SOCKET_ENV], deliver)
    listener.start()
    client = Celery("warden_guard_client", broker=BROKERS["redis"])
    client.conf.broker_connection_retry_on_startup = True
    try:
        with log.open("wb") as out:
            worker = spawn(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        guarded = Guarded(worker, queue, control_dir, log, messages, live, client.send_task)
        wait_until(guarded.live.workers, what="the master's word")
        # Each process listens once it has announced itself: wait for the sockets.
        expected = 2 if pool == "prefork" else 0
        wait_until(lambda: len(guarded.children()) >= expected, what="the pool children")
        wait_until(
            lambda: all(
                (control_dir / socket_name(p)).exists() for p in [worker.pid, *guarded.children()]
            ),
            what="the control sockets",
        )
        yield guarded
    finally:
        listener.stop()
        client.close()


@contextlib.contextmanager
def _pidfd(pid: int) -> Iterator[int]:
    """A pidfd of ``pid``: it becomes readable when the process exits, even once reaped."""
    fd = os.pidfd_open(pid)
    try:
        yield fd
    finally:
        os.close(fd)


def test_a_busy_child_asked_to_recycle_finishes_its_task_then_leaves(guarded: Guarded) -> None:
    """The soft recycle never interrupts a task: the child finishes it, leaves through
    billiard's own recycle exit, is replaced, and no task sent meanwhile is lost."""
    # GIVEN a child running a 3 s task
    guarded.send("guard.sleep_for", 3.0)
    child = wait_until(lambda: guarded.running("guard.sleep_for"), what="the 3 s task")
    assert isinstance(child, int)
    # WHEN the warden asks it to recycle (twice: asking again changes nothing), and more
    # tasks arrive meanwhile
    assert guarded.ask(child, {"op": "recycle"}) == {
        "accepted": True,
        "busy": ["guard.sleep_for"],
        "after_trace": False,
    }
    assert guarded.ask(child, {"op": "recycle"})["accepted"] is True
    for _ in range(6):
        guarded.send("guard.sleep_for", 0.2)
    # THEN the task ends SUCCESS after its full 3 s, then the child exits with EX_RECYCLE
    end = wait_until(lambda: guarded.end_of(child), timeout=30, what="the child's exit")
    assert isinstance(end, ProcessEnd)
    assert (end.exit_code, end.reason) == (EX_RECYCLE, EndReason.RECYCLED)
    (long_task,) = [f for f in guarded.finished("guard.sleep_for") if f.pid == child]
    assert long_task.state is TaskState.SUCCESS
    assert long_task.wall_seconds >= 2.9
    assert long_task.t <= end.t
    # AND it started nothing after that task: it left between tasks
    assert [m.name for m in guarded.of(TaskStarted) if m.pid == child] == ["guard.sleep_for"]
    # AND a new child replaces it, and every task sent ran once, successfully
    wait_until(
        lambda: len(guarded.children()) == 2 and child not in guarded.children(),
        what="a new child",
    )
    wait_until(lambda: len(guarded.finished("guard.sleep_for")) == 7, what="all 7 tasks")
    assert {f.state for f in guarded.finished("guard.sleep_for")} == {TaskState.SUCCESS}
    assert len({f.task_id for f in guarded.finished("guard.sleep_for")}) == 7
    # AND the master took it for a normal recycle: no lost worker, no crash exit logged
    log = guarded.log.read_text()
    assert "WorkerLostError" not in log
    assert "exited with" not in log
    assert guarded.worker.poll() is None


def test_an_idle_child_asked_to_recycle_leaves_at_once(guarded: Guarded) -> None:
    """An idle child blocks reading its job pipe: the request wakes it, and it leaves at
    once (after its reply: the answer is never cut short); the pool goes on serving."""
    # GIVEN two idle children
    child, other = guarded.children()
    with _pidfd(child) as pidfd:
        # WHEN one is asked to recycle
        asked_at = time.monotonic()
        reply = guarded.ask(child, {"op": "recycle"})
        # THEN it answers, and leaves within 1.5 s, with billiard's recycle exit code
        assert reply == {"accepted": True, "busy": [], "after_trace": False}
        assert select.select([pidfd], [], [], 5.0)[0]
        assert time.monotonic() - asked_at < 1.5
    end = wait_until(lambda: guarded.end_of(child), what="the child's exit message")
    assert isinstance(end, ProcessEnd)
    assert (end.exit_code, end.reason) == (EX_RECYCLE, EndReason.RECYCLED)
    # AND the other child was left alone, a new one replaces it, and tasks still run
    assert psutil.pid_exists(other)
    assert guarded.end_of(other) is None
    wait_until(lambda: len(guarded.children()) == 2, what="a new child")
    for _ in range(4):
        guarded.send("guard.sleep_for", 0.1)
    wait_until(lambda: len(guarded.finished("guard.sleep_for")) == 4, what="4 tasks")
    assert {f.state for f in guarded.finished("guard.sleep_for")} == {TaskState.SUCCESS}


def test_a_child_being_traced_leaves_only_once_the_trace_is_over(guarded: Guarded) -> None:
    """A soft recycle never cuts a diagnosis short: the traced child keeps serving until
    its trace has the calls it asked for, answers, and only then leaves."""
    # GIVEN a diagnosis tracing the next 4 calls in one child
    child = guarded.children()[0]
    replies: list[dict[str, Any]] = []
    request = {"op": "trace", "task": "guard.sleep_for", "calls": 4, "timeout": 60}
    tracer = threading.Thread(target=lambda: replies.append(guarded.ask(child, request, 70)))
    tracer.start()
    sent = 0
    try:
        wait_until(lambda: guarded.ask(child, {"op": "hello"})["tracing"], what="the trace")
        # WHEN the warden asks that child to recycle, and tasks keep coming
        reply = guarded.ask(child, {"op": "recycle"})
        assert (reply["accepted"], reply["after_trace"]) == (True, True)
        deadline = time.monotonic() + 60
        while tracer.is_alive() and time.monotonic() < deadline:
            for _ in range(4):  # a burst: an idle master hands each task to its first child
                guarded.send("guard.sleep_for", 0.05)
            sent += 4
            tracer.join(timeout=0.3)
    finally:
        tracer.join(timeout=70)
    # THEN the trace got its 4 calls and answered in full
    (answer,) = replies
    assert answer["trace"]["calls_traced"] == 4
    # AND only then the child leaves, by billiard's recycle exit
    end = wait_until(lambda: guarded.end_of(child), timeout=30, what="the child's exit")
    assert isinstance(end, ProcessEnd)
    assert (end.exit_code, end.reason) == (EX_RECYCLE, EndReason.RECYCLED)
    ran = [m for m in guarded.finished("guard.sleep_for") if m.pid == child]
    assert len(ran) >= 4
    assert all(f.t <= end.t for f in ran)
    wait_until(lambda: len(guarded.finished("guard.sleep_for")) == sent, what="every task")
    assert {f.state for f in guarded.finished("guard.sleep_for")} == {TaskState.SUCCESS}


def test_a_master_cannot_recycle_and_says_so(guarded: Guarded) -> None:
    """hello tells what a process offers: a child can recycle and has a stack handler;
    the prefork master has neither (its children would inherit the handler)."""
    master = guarded.worker.pid
    child = guarded.children()[0]
    child_hello = guarded.ask(child, {"op": "hello"})
    master_hello = guarded.ask(master, {"op": "hello"})
    assert child_hello["can_recycle"] is True
    assert child_hello["stack_signal"] == STACK_SIGNAL
    assert child_hello["stack_file"] == str(stackdump.stack_file_for(child))
    assert (master_hello["can_recycle"], master_hello["stack_signal"]) == (False, None)
    reply = guarded.ask(master, {"op": "recycle"})
    assert reply["accepted"] is False
    assert "not a prefork pool child" in reply["error"]
    # the negative control for the warden's SigCgt check
    assert stackdump.has_handler(child, STACK_SIGNAL)
    assert not stackdump.has_handler(master, STACK_SIGNAL)
    assert stackdump.stack_file_for(master) is None


@pytest.mark.parametrize("guarded", ["solo", "threads"], indirect=True)
def test_a_master_running_the_tasks_has_the_stack_handler_but_nothing_to_recycle(
    guarded: Guarded,
) -> None:
    """The solo and threads pools run tasks in the master: it gets the stack handler,
    and recycle refuses (no billiard loop to leave; the warm restart is the way)."""
    master = guarded.worker.pid
    hello = guarded.ask(master, {"op": "hello"})
    assert (hello["can_recycle"], hello["stack_signal"]) == (False, STACK_SIGNAL)
    assert hello["stack_file"] == str(stackdump.stack_file_for(master))
    assert stackdump.has_handler(master, STACK_SIGNAL)
    reply = guarded.ask(master, {"op": "recycle"})
    assert reply["accepted"] is False
    # AND its dump shows a task it runs (one that ends: the warm shutdown waits for it)
    guarded.send("guard.sleep_for", 3.0)
    wait_until(lambda: guarded.running("guard.sleep_for"), what="the sleeping task")
    path = stackdump.stack_file_for(master)
    assert path is not None
    offset = path.stat().st_size
    os.kill(master, STACK_SIGNAL)
    dump = stackdump.read_new(path, offset, timeout=5)
    assert f'File "{GUARD_FILE}", line {_line("sleep_for")} in sleep_for' in dump, dump


@pytest.mark.parametrize("task", ["spin_c", "wait_forever"])
def test_a_stuck_child_dumps_its_stack_on_the_stack_signal(guarded: Guarded, task: str) -> None:
    """faulthandler writes from its C signal handler: even a task holding the GIL in C
    (where Python's handlers never run) shows the line it is stuck on, and the child
    goes on as before."""
    # GIVEN a child stuck in the task
    guarded.send(f"guard.{task}")
    child = wait_until(lambda: guarded.running(f"guard.{task}"), what=f"the {task} task")
    assert isinstance(child, int)
    try:
        path = stackdump.stack_file_for(child)
        assert path is not None
        assert stackdump.has_handler(child, STACK_SIGNAL)
        expected = f'File "{GUARD_FILE}", line {_line(task)} in {task}'
        for _ in range(2):  # a second dump is appended, the first one is left as it was
            # WHEN the warden notes the file's size and sends the stack signal
            offset = path.stat().st_size
            os.kill(child, STACK_SIGNAL)
            # THEN what the child appended names the task's line
            dump = stackdump.read_new(path, offset, timeout=5)
            assert expected in dump, dump
            assert "Thread 0x" in dump  # every thread, the probe's own too
        # AND the child is still there, still stuck in its task
        assert psutil.Process(child).status() != psutil.STATUS_ZOMBIE
        assert guarded.end_of(child) is None
    finally:
        # A task stuck in C ignores SIGTERM, and would hold the master's warm shutdown.
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_the_master_sends_the_apps_settings_without_the_broker_url(guarded: Guarded) -> None:
    """The master's word carries the settings a hard kill's outcome depends on; a task
    overriding one is listed with its own value, and the URL (a password) never is."""
    (info,) = guarded.live.workers()
    assert info.pid == guarded.worker.pid
    assert info.settings is not None
    settings = info.settings
    assert settings["broker_transport"] == "redis"
    assert settings["task_acks_late"] is False
    assert settings["task_reject_on_worker_lost"] is None
    assert settings["visibility_timeout"] is None
    assert settings["worker_max_memory_per_child"] is None
    assert settings["tasks"] == {"guard.late_ack": {"acks_late": True}}
    assert settings["tasks_truncated"] is False
    assert "127.0.0.1" not in json.dumps(settings)
