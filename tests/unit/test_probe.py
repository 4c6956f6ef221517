"""The in-worker probe: what it sends, and that it never fails a task."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import celery_warden
from celery_warden import stackdump
from celery_warden._records import (
    EndReason,
    Heartbeat,
    ProcessEnd,
    TaskFinished,
    TaskStarted,
    TaskState,
    WorkerInfo,
)
from celery_warden.probe import SITE_DIR, wire
from celery_warden.probe._channel import Channel
from celery_warden.probe._control import AFTER_REPLY, CONTROL_DIR_ENV
from celery_warden.probe._hooks import Probe, worker_settings
from celery_warden.probe._ops import operations
from celery_warden.probe._stack import STACK_SIGNAL


class FakeTask:
    """Stands in for a Celery task: the probe only reads its name."""

    name = "proj.tasks.add"


class Request:
    """Stands in for a task's request: the probe reads the retry count."""

    retries = 2


class RetriedTask:
    name = "proj.tasks.flaky"
    request = Request()


class BrokenTask:
    """A task object whose name cannot even be read."""

    @property
    def name(self) -> str:
        raise RuntimeError("boom")


@pytest.fixture
def make_probe() -> Iterator[Callable[[str], Probe]]:
    """Probes that are closed when the test ends."""
    made: list[Probe] = []

    def _make(path: str) -> Probe:
        made.append(Probe(Channel(path), heartbeat_seconds=0, blocks_sample=1.0))
        return made[-1]

    yield _make
    for probe in made:
        probe.close()


class Receiver:
    """A stream socket standing where the warden's would; reads messages line by line."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(1)
        self.server.settimeout(2)
        self.conn: socket.socket | None = None
        self.lines: list[bytes] = []
        self.rest = b""

    def recv(self) -> bytes:
        if self.conn is None:
            self.conn, _ = self.server.accept()
            self.conn.settimeout(2)
        while not self.lines:
            *lines, self.rest = (self.rest + self.conn.recv(65536)).split(b"\n")
            self.lines.extend(lines)
        return self.lines.pop(0)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """Where the warden's socket would be."""
    r = Receiver(tmp_path / "probe.sock")
    yield r
    r.close()


def test_a_task_is_reported_at_start_and_end_with_the_rss_after(
    receiver: Receiver, make_probe: Callable[[str], Probe]
) -> None:
    """prerun and postrun send the task's start, its end, its duration and the RSS."""
    # GIVEN a probe sending to a listening socket
    probe = make_probe(receiver.path)
    # WHEN a task runs
    probe.on_task_prerun(task_id="id-1", task=FakeTask())
    probe.on_task_postrun(task_id="id-1", task=FakeTask(), state="SUCCESS")
    # THEN two messages describe it, the second with the RSS of this process
    started, _ = wire.decode(receiver.recv())
    finished, _ = wire.decode(receiver.recv())
    assert isinstance(started, TaskStarted)
    assert isinstance(finished, TaskFinished)
    assert (started.pid, finished.pid) == (os.getpid(), os.getpid())
    assert finished.name == "proj.tasks.add"
    assert finished.state is TaskState.SUCCESS
    assert finished.started_at == started.t
    assert finished.wall_seconds >= 0
    assert finished.rss_after_bytes is not None
    assert finished.rss_after_bytes > 1_000_000
    assert probe.errors == 0


def test_with_no_warden_the_probe_drops_and_counts(
    tmp_path: Path, make_probe: Callable[[str], Probe]
) -> None:
    """When nobody listens, sends fail at once, are counted, and nothing raises."""
    probe = make_probe(str(tmp_path / "nobody-here.sock"))
    for n in range(5):
        probe.on_task_prerun(task_id=str(n), task=FakeTask())
        probe.on_task_postrun(task_id=str(n), task=FakeTask(), state="FAILURE")
    assert probe.channel.dropped == 10
    assert probe.errors == 0


def test_a_receiver_that_fails_inside_never_raises_into_celery(
    receiver: Receiver, make_probe: Callable[[str], Probe]
) -> None:
    """Whatever goes wrong inside a receiver is counted, not raised."""
    probe = make_probe(receiver.path)
    probe.on_task_prerun(task_id="x", task=BrokenTask())
    probe.on_task_postrun(task_id="x", task=BrokenTask(), state="SUCCESS")
    assert probe.errors == 2


def test_postrun_without_prerun_is_still_recorded(
    receiver: Receiver, make_probe: Callable[[str], Probe]
) -> None:
    """A postrun whose prerun was never seen still reports the task, with zero duration."""
    probe = make_probe(receiver.path)
    probe.on_task_postrun(task_id="orphan", task=FakeTask(), state="RETRY")
    finished, _ = wire.decode(receiver.recv())
    assert isinstance(finished, TaskFinished)
    assert finished.state is TaskState.RETRY
    assert finished.wall_seconds == 0


def test_a_pool_child_exit_says_why(receiver: Receiver, make_probe: Callable[[str], Probe]) -> None:
    """billiard's recycle exit code is told apart as max-tasks when the count was reached."""
    probe = make_probe(receiver.path)
    probe.max_tasks_per_child = 1
    probe.on_task_prerun(task_id="a", task=FakeTask())
    probe.on_task_postrun(task_id="a", task=FakeTask(), state="SUCCESS")
    receiver.recv()
    receiver.recv()
    probe.on_process_shutdown(pid=os.getpid(), exitcode=0x9B)
    end, dropped = wire.decode(receiver.recv())
    assert str(end.reason) == "max-tasks"  # type: ignore[union-attr]
    assert dropped == 0


def test_a_pool_child_stopped_by_a_signal_is_recorded_as_killed(
    receiver: Receiver, make_probe: Callable[[str], Probe]
) -> None:
    """billiard's -(256 - signum) exit value becomes `killed` with minus the signal."""
    probe = make_probe(receiver.path)
    probe.on_process_shutdown(pid=os.getpid(), exitcode=-(256 - 15))
    end, _ = wire.decode(receiver.recv())
    assert (str(end.reason), end.exit_code) == ("killed", -15)  # type: ignore[union-attr]


def test_sitecustomize_hands_over_to_the_users_own(tmp_path: Path) -> None:
    """The probe's sitecustomize stays out of non-worker programs and still runs the
    sitecustomize the environment already had."""
    # GIVEN a user sitecustomize further down PYTHONPATH
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    (user_dir / "sitecustomize.py").write_text("import sys\nsys.user_site_ran = True\n")
    env = dict(os.environ, PYTHONPATH=f"{SITE_DIR}{os.pathsep}{user_dir}")
    env["CELERY_WARDEN_SOCKET"] = str(tmp_path / "probe.sock")
    # WHEN a plain Python program starts
    out = subprocess.run(
        [sys.executable, "-c", "import sys; print(sys.user_site_ran, 'celery' in sys.modules)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    # THEN the user's customisation ran and Celery was not imported
    assert out.stdout.split() == ["True", "False"]
    assert out.stderr == ""


def test_the_probe_loads_in_a_worker_environment_without_celery_warden(tmp_path: Path) -> None:
    """A worker whose virtualenv lacks celery-warden still loads the warden's own probe:
    here the only thing it then misses is Celery itself, and it says so in one line."""
    # GIVEN a bare virtualenv (no celery-warden, no Celery) and a worker-like command
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    script = tmp_path / "celery"
    script.write_text("import sys\nprint('celery_warden' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=str(SITE_DIR))
    env["CELERY_WARDEN_SOCKET"] = str(tmp_path / "probe.sock")
    env["CELERY_WARDEN_PACKAGE"] = str(Path(celery_warden.__file__).parent)
    # WHEN it starts
    out = subprocess.run(
        [str(env_dir / "bin" / "python"), str(script), "-A", "proj", "worker"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    # THEN the probe package was loaded from the warden, and only Celery was missing
    assert out.stdout.strip() == "True"
    assert (
        out.stderr.strip() == "celery-warden: the probe was not attached: No module named 'celery'"
    )


def test_a_call_reports_its_cpu_its_kept_objects_and_its_memory(
    receiver: Receiver, make_probe: Callable[[str], Probe]
) -> None:
    """A call that burns CPU and keeps objects: the thread's CPU, the allocator's block
    count growth, and (first call only, the rate is bounded) USS and PSS."""
    probe = make_probe(receiver.path)
    kept: list[object] = []
    # WHEN a call burns CPU and keeps 5,000 objects, then a second call runs at once
    probe.on_task_prerun(task_id="busy", task=FakeTask())
    sum(i * i for i in range(300_000))
    kept.extend(object() for _ in range(5000))
    probe.on_task_postrun(task_id="busy", task=FakeTask(), state="SUCCESS")
    probe.on_task_prerun(task_id="next", task=FakeTask())
    probe.on_task_postrun(task_id="next", task=FakeTask(), state="SUCCESS")
    messages = [wire.decode(receiver.recv())[0] for _ in range(4)]
    first, second = messages[1], messages[3]
    assert isinstance(first, TaskFinished)
    assert isinstance(second, TaskFinished)
    # THEN the first carries them all, the second no smaps figures
    assert first.cpu_seconds is not None
    assert 0 < first.cpu_seconds <= first.wall_seconds + 0.01
    assert first.py_blocks_delta is not None
    assert first.py_blocks_delta >= 5000
    assert first.uss_after_bytes is not None
    assert first.pss_after_bytes is not None
    assert 0 < first.uss_after_bytes <= first.pss_after_bytes <= (first.rss_after_bytes or 0)
    assert (second.uss_after_bytes, second.pss_after_bytes) == (None, None)
    assert kept


def test_a_failed_call_carries_its_exception_type_and_retries(
    receiver: Receiver, make_probe: Callable[[str], Probe]
) -> None:
    """task_failure comes before task_postrun; the type it saw ends up in the record."""
    probe = make_probe(receiver.path)
    probe.on_task_prerun(task_id="f1", task=RetriedTask())
    probe.on_task_failure(task_id="f1", exception=KeyError("k"))
    probe.on_task_postrun(task_id="f1", task=RetriedTask(), state="FAILURE")
    receiver.recv()
    finished, _ = wire.decode(receiver.recv())
    assert isinstance(finished, TaskFinished)
    assert finished.exception == "builtins.KeyError"
    assert finished.retries == 2
    assert finished.state is TaskState.FAILURE


def test_a_heartbeat_lists_the_running_tasks_with_their_cpu_so_far(
    receiver: Receiver, make_probe: Callable[[str], Probe]
) -> None:
    """While a call runs, the heartbeat names it, since when, and its CPU so far; once
    it ended, the heartbeat is empty."""
    probe = make_probe(receiver.path)
    probe.on_task_prerun(task_id="long", task=FakeTask())
    sum(i * i for i in range(200_000))
    beat, _ = wire.decode(probe.heartbeat())
    assert isinstance(beat, Heartbeat)
    assert beat.pid == os.getpid()
    (running,) = beat.running
    assert (running.task_id, running.name) == ("long", "proj.tasks.add")
    assert running.cpu_seconds is not None
    assert running.cpu_seconds > 0
    probe.on_task_postrun(task_id="long", task=FakeTask(), state="SUCCESS")
    beat, _ = wire.decode(probe.heartbeat())
    assert isinstance(beat, Heartbeat)
    assert beat.running == ()


def test_the_heartbeat_thread_beats_on_its_own(receiver: Receiver) -> None:
    """The first task of a process starts its heartbeat thread."""
    probe = Probe(Channel(receiver.path), heartbeat_seconds=0.05)
    try:
        probe.on_task_prerun(task_id="t", task=FakeTask())
        kinds = set()
        for _ in range(5):
            message, _ = wire.decode(receiver.recv())
            kinds.add(type(message))
        assert Heartbeat in kinds
    finally:
        probe.close()


class OddTask:
    """A task whose name needs escaping and whose retry count is not an int."""

    name = 'proj.odd "näme"\n\t'

    class request:  # stands in for the request attribute
        retries = True


def test_odd_names_ids_and_retry_counts_still_make_valid_messages(
    receiver: Receiver, make_probe: Callable[[str], Probe]
) -> None:
    """Quotes, newlines, non-ASCII, a 10 KB task id, a bool retry count: each message
    still decodes, the id is cut to the wire's limit."""
    probe = make_probe(receiver.path)
    long_id = "x" * 10_000
    probe.on_task_prerun(task_id=long_id, task=OddTask())
    probe.on_task_postrun(task_id=long_id, task=OddTask(), state="SUCCESS")
    started, _ = wire.decode(receiver.recv())
    finished, _ = wire.decode(receiver.recv())
    assert isinstance(started, TaskStarted)
    assert isinstance(finished, TaskFinished)
    assert finished.name == OddTask.name
    assert finished.task_id == long_id[: wire.MAX_NAME]
    assert finished.retries == 0
    assert finished.wall_seconds >= 0
    assert probe.errors == 0


def test_the_same_task_id_in_two_threads_keeps_two_calls_apart(
    receiver: Receiver, make_probe: Callable[[str], Probe]
) -> None:
    """A redelivered id running twice at once (threads pool): each call is measured on
    its own thread."""
    probe = make_probe(receiver.path)
    both_started = threading.Barrier(2, timeout=5)

    def call() -> None:
        probe.on_task_prerun(task_id="same", task=FakeTask())
        both_started.wait()  # both calls are in flight at once
        probe.on_task_postrun(task_id="same", task=FakeTask(), state="SUCCESS")

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    messages = [wire.decode(receiver.recv())[0] for _ in range(4)]
    finished = [m for m in messages if isinstance(m, TaskFinished)]
    assert len(finished) == 2
    # each found its own start: none is a postrun without a prerun (no CPU known)
    assert all(f.cpu_seconds is not None for f in finished)
    assert probe.errors == 0


@pytest.fixture
def control_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A control directory of this test's own."""
    directory = tmp_path / "ctl"
    monkeypatch.setenv(CONTROL_DIR_ENV, str(directory))
    return directory


@pytest.fixture
def controlled(receiver: Receiver, control_dir: Path) -> Iterator[Probe]:
    """A probe serving control requests in this process, closed when the test ends."""
    probe = Probe(Channel(receiver.path), heartbeat_seconds=0, control=True)
    yield probe
    probe.close()


def test_hello_says_what_this_process_offers_and_recycle_refuses_outside_a_pool_child(
    controlled: Probe, control_dir: Path
) -> None:
    """Outside a billiard pool child there is no loop to leave: hello says so, and recycle
    refuses with a reason; the stack handler is there, beside the control socket."""
    assert controlled.start_control() == str(control_dir / f"{os.getpid()}.sock")
    ops = operations(controlled)
    hello = ops["hello"]({})
    assert hello["can_recycle"] is False
    assert hello["stack_signal"] == STACK_SIGNAL
    assert hello["stack_file"] == str(control_dir / f"{os.getpid()}.stack")
    assert stackdump.has_handler(os.getpid(), STACK_SIGNAL)
    reply = ops["recycle"]({})
    assert reply["accepted"] is False
    assert "not a prefork pool child" in reply["error"]
    assert controlled.recycle_requested is False
    # closing the probe removes the handler with its file
    controlled.close()
    assert not stackdump.has_handler(os.getpid(), STACK_SIGNAL)
    assert not (control_dir / f"{os.getpid()}.stack").exists()


def test_a_prefork_master_has_no_stack_handler(controlled: Probe) -> None:
    """The children a prefork master forks would inherit it, writing to its file."""
    controlled._master_pid = os.getpid()  # as celeryd_after_setup leaves it
    controlled.pool_name = "prefork"
    assert controlled.start_control() is not None
    assert operations(controlled)["hello"]({})["stack_signal"] is None
    assert not stackdump.has_handler(os.getpid(), STACK_SIGNAL)


@pytest.fixture
def pool_child(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """This process made to look like a billiard pool child: the current process's
    target is a pool Worker with its job pipe."""
    from billiard import pool, process
    from billiard.queues import _SimpleQueue

    jobs, results = _SimpleQueue(), _SimpleQueue()
    worker = pool.Worker(jobs, results)
    worker._make_child_methods()
    monkeypatch.setattr(process.current_process(), "_target", worker, raising=False)
    yield worker
    jobs.close()
    results.close()


def test_a_pool_child_asked_to_recycle_leaves_between_jobs_by_billiards_exit(
    receiver: Receiver, make_probe: Callable[[str], Probe], pool_child: Any
) -> None:
    """worker_process_init wraps the loop's job wait: jobs go through as before; once a
    recycle is asked (after the reply is out), the next wait exits with EX_RECYCLE, and a
    wait already blocked on an idle pipe is woken to do so."""
    from billiard import pool

    # GIVEN a pool child's probe after worker_process_init
    probe = make_probe(receiver.path)
    probe.on_process_init()
    assert probe.can_recycle()
    assert probe.errors == 0
    # WHEN a job arrives, the loop gets it as it would without the probe
    pool_child.inq.put((pool.TASK, ("job", 0, None, (), {})))
    assert pool_child.wait_for_job() == (pool.TASK, ("job", 0, None, (), {}))
    # AND WHEN the loop waits on an idle pipe and a recycle is asked
    exits: list[object] = []

    def loop() -> None:
        try:
            pool_child.wait_for_job()
        except SystemExit as exc:
            exits.append(exc.code)

    waiting = threading.Thread(target=loop)
    waiting.start()
    time.sleep(0.1)
    assert waiting.is_alive()  # blocked, as billiard's own wait is
    reply = operations(probe)["recycle"]({})
    # THEN nothing happens before the reply is sent (the server runs this after it)
    assert reply.pop(AFTER_REPLY)() is True
    assert reply == {"accepted": True, "busy": [], "after_trace": False}
    waiting.join(5)
    # AND the wait leaves by billiard's recycle exit, as every later one would
    assert exits == [pool.EX_RECYCLE]
    with pytest.raises(SystemExit) as left:
        pool_child.wait_for_job()
    assert left.value.code == pool.EX_RECYCLE
    # AND its exit is told as a recycle, even with Celery's memory limit set
    probe.max_memory_per_child_kb = 100_000
    receiver.recv()  # the child's announcement
    probe.on_process_shutdown(pid=os.getpid(), exitcode=pool.EX_RECYCLE)
    end, _ = wire.decode(receiver.recv())
    assert isinstance(end, ProcessEnd)
    assert (end.reason, end.exit_code) == (EndReason.RECYCLED, pool.EX_RECYCLE)


def test_a_held_child_asked_to_recycle_serves_on_and_leaves_on_release(
    receiver: Receiver, make_probe: Callable[[str], Probe], pool_child: Any
) -> None:
    """A diagnosis holds the child (a trace needs its calls, its answer must be out): a
    recycle asked meanwhile wakes the loop without ending it, jobs still go through,
    and the release makes the waiting loop leave."""
    from billiard import pool

    # GIVEN a pool child held by a diagnosis, asked to recycle while it waits
    probe = make_probe(receiver.path)
    probe.on_process_init()
    probe.hold()
    exits: list[object] = []
    jobs: list[object] = []

    def loop() -> None:
        try:
            while True:
                jobs.append(pool_child.wait_for_job())
        except SystemExit as exc:
            exits.append(exc.code)

    waiting = threading.Thread(target=loop)
    waiting.start()
    reply = operations(probe)["recycle"]({})
    assert reply.pop(AFTER_REPLY)() is True
    assert reply == {"accepted": True, "busy": [], "after_trace": True}
    # WHEN a job arrives while it is held
    pool_child.inq.put((pool.TASK, ("job", 1, None, (), {})))
    # THEN the loop gets it, and does not leave
    deadline = time.monotonic() + 5
    while not jobs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert jobs == [(pool.TASK, ("job", 1, None, (), {}))]
    assert waiting.is_alive()
    assert exits == []
    # AND once released, the waiting loop leaves by billiard's recycle exit
    probe.release()
    waiting.join(5)
    assert exits == [pool.EX_RECYCLE]


def _settings_app(broker: str = "redis://:hunter2@127.0.0.1:6379/3") -> Any:
    from celery import Celery

    app = Celery("proj", broker=broker, set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": 7200}
    app.conf.task_reject_on_worker_lost = True
    return app


class WorkController:
    """Stands in for the worker Celery passes to celeryd_after_setup."""

    concurrency = 2
    time_limit = None
    soft_time_limit = 60.0
    max_tasks_per_child = 100
    max_memory_per_child = None

    class pool_cls:  # its module names the pool
        __module__ = "celery.concurrency.prefork"

    def __init__(self, app: Any) -> None:
        self.app = app


def test_the_master_describes_the_apps_settings_and_never_the_broker_url(
    receiver: Receiver, make_probe: Callable[[str], Probe]
) -> None:
    """celeryd_after_setup: the worker's message carries the settings a hard kill's
    outcome depends on, the worker's own limits, and per task only what differs."""
    # GIVEN an app whose broker URL holds a password, with tasks overriding settings
    app = _settings_app()

    @app.task(name="proj.late", acks_late=True)
    def late() -> None: ...

    @app.task(name="proj.limited", time_limit=30, soft_time_limit=60.0)
    def limited() -> None: ...

    @app.task(name="proj.plain")
    def plain() -> None: ...

    # WHEN the master's probe describes the worker
    probe = make_probe(receiver.path)
    probe.on_worker_ready(sender="w1@host", instance=WorkController(app))
    line = receiver.recv()
    info, _ = wire.decode(line)
    # THEN the settings are there, the URL is not
    assert b"hunter2" not in line
    assert b"6379" not in line
    assert isinstance(info, WorkerInfo)
    assert (info.pool, info.max_tasks_per_child) == ("prefork", 100)
    assert info.settings == {
        "task_acks_late": False,
        "task_reject_on_worker_lost": True,
        "task_retry_on_worker_lost": False,
        "task_time_limit": None,
        "task_soft_time_limit": 60.0,  # the worker's own, from its command line
        "worker_max_tasks_per_child": 100,
        "worker_max_memory_per_child": None,
        "broker_transport": "redis",
        "visibility_timeout": 7200,
        "unacked_restore_interval": None,
        "unacked_restore_throttle": None,
        "tasks": {
            "proj.late": {"acks_late": True},
            "proj.limited": {"time_limit": 30},
        },
        "tasks_truncated": False,
    }
    assert probe.errors == 0


@pytest.mark.parametrize(
    ("broker", "transport"),
    [
        ("amqp://guest:guest@localhost//", "amqp"),
        ("rediss://h/0", "redis"),
        ("memory://", "memory"),
    ],
)
def test_the_transport_is_kombus_driver_whatever_the_url_says(broker: str, transport: str) -> None:
    settings = worker_settings(WorkController(_settings_app(broker)))
    assert settings["broker_transport"] == transport


def test_many_overriding_tasks_are_cut_to_fit_one_message(
    receiver: Receiver, make_probe: Callable[[str], Probe]
) -> None:
    """Thousands of tasks with their own settings: as many as fit the wire's line
    limit are listed, and the message says names were left out."""
    app = _settings_app()

    def body() -> None: ...

    for n in range(2000):
        app.task(name=f"proj.tasks.number_{n:04}", acks_late=True)(body)
    probe = make_probe(receiver.path)
    probe.on_worker_ready(sender="w1@host", instance=WorkController(app))
    line = receiver.recv()
    assert len(line) < wire.MAX_LINE
    info, _ = wire.decode(line)
    assert isinstance(info, WorkerInfo)
    assert info.settings is not None
    assert info.settings["tasks_truncated"] is True
    assert 200 < len(info.settings["tasks"]) < 2000
    assert "proj.tasks.number_0000" in info.settings["tasks"]


def test_settings_that_cannot_be_read_still_describe_the_worker(
    receiver: Receiver, make_probe: Callable[[str], Probe]
) -> None:
    """An app that fails to say its settings costs the settings, not the message."""
    probe = make_probe(receiver.path)
    probe.on_worker_ready(sender="w1@host", instance=WorkController(app=None))
    info, _ = wire.decode(receiver.recv())
    assert isinstance(info, WorkerInfo)
    assert (info.nodename, info.settings) == ("w1@host", None)
    assert probe.errors == 1
