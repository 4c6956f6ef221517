"""The in-worker probe: what it sends, and that it never fails a task."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import celery_warden
from celery_warden._records import Heartbeat, TaskFinished, TaskStarted, TaskState
from celery_warden.probe import SITE_DIR, wire
from celery_warden.probe._channel import Channel
from celery_warden.probe._hooks import Probe


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
    import threading

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
