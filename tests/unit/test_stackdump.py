"""The stack dump on a real-time signal: the probe's handler (``probe/_stack.py``) and the
warden's side (``stackdump``), in this very process."""

from __future__ import annotations

import faulthandler
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_warden import stackdump
from celery_warden.probe._control import CONTROL_DIR_ENV, private_dir
from celery_warden.probe._stack import STACK_ENV, STACK_SIGNAL, StackDump, stack_name


@pytest.fixture
def control_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "ctl"
    monkeypatch.setenv(CONTROL_DIR_ENV, str(directory))
    private_dir(str(directory))
    return directory


@pytest.fixture
def dump() -> Iterator[StackDump]:
    """A handler in this process, unregistered when the test ends."""
    handler = StackDump()
    yield handler
    handler.close()


def test_the_signal_is_a_real_time_one() -> None:
    """Never one of the signals billiard or Celery give a meaning to in a pool child."""
    assert int(signal.SIGRTMIN) < STACK_SIGNAL <= int(signal.SIGRTMAX)


def test_has_handler_reads_sigcgt_of_a_live_process() -> None:
    """The SigCgt bit of the signal is set while faulthandler handles it, and clear after;
    a process that does not exist has no handler."""
    assert not stackdump.has_handler(os.getpid(), STACK_SIGNAL)
    faulthandler.register(STACK_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
    try:
        assert stackdump.has_handler(os.getpid(), STACK_SIGNAL)
    finally:
        faulthandler.unregister(STACK_SIGNAL)
    assert not stackdump.has_handler(os.getpid(), STACK_SIGNAL)
    assert not stackdump.has_handler(2**22 + 1, STACK_SIGNAL)  # beyond pid_max


def _dump_here(ready: threading.Event, done: threading.Event) -> None:
    ready.set()
    done.wait(10)  # the line the dump must show for this thread


def test_a_dump_is_appended_to_the_private_file_and_read_back(
    control_dir: Path, dump: StackDump
) -> None:
    """The handler writes every thread's stack to <pid>.stack (0600) in the control
    directory; the warden reads what the signal appended, dump after dump."""
    # GIVEN the handler registered, and a thread waiting in a known function
    path = dump.enable(str(control_dir))
    assert path == str(control_dir / stack_name(os.getpid()))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stackdump.stack_file_for(os.getpid()) == Path(path)
    assert stackdump.has_handler(os.getpid(), STACK_SIGNAL)
    ready, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=_dump_here, args=(ready, done))
    thread.start()
    ready.wait(5)
    try:
        for _ in range(2):
            # WHEN the warden notes the size and sends the signal
            offset = os.stat(path).st_size
            os.kill(os.getpid(), STACK_SIGNAL)
            # THEN it reads this dump alone, with the waiting thread's frame in it
            text = stackdump.read_new(Path(path), offset, timeout=5)
            assert text.count("most recent call first") >= 2  # this thread and the other
            assert f'File "{__file__}"' in text
            assert "in _dump_here" in text
    finally:
        done.set()
        thread.join()
    # AND closing removes the handler and the file
    dump.close()
    assert not stackdump.has_handler(os.getpid(), STACK_SIGNAL)
    assert not os.path.exists(path)


def test_turned_off_by_the_environment(
    control_dir: Path, dump: StackDump, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STACK_ENV, "0")
    assert dump.enable(str(control_dir)) is None
    assert not stackdump.has_handler(os.getpid(), STACK_SIGNAL)
    assert stackdump.stack_file_for(os.getpid()) is None


def test_a_symlink_at_the_name_is_refused_by_both_sides(
    control_dir: Path, dump: StackDump, tmp_path: Path
) -> None:
    """A link planted at <pid>.stack is neither followed by the probe nor read by the
    warden."""
    target = tmp_path / "elsewhere"
    target.write_text("")
    (control_dir / stack_name(os.getpid())).symlink_to(target)
    with pytest.raises(OSError, match="symbolic links"):  # ELOOP: O_NOFOLLOW
        dump.enable(str(control_dir))
    assert not stackdump.has_handler(os.getpid(), STACK_SIGNAL)
    assert stackdump.stack_file_for(os.getpid()) is None
    assert target.read_text() == ""


def test_a_forked_child_does_not_keep_its_parents_handler(
    control_dir: Path, dump: StackDump
) -> None:
    """A process forked from one with the handler (a task that forks) would write into
    its parent's file: the handler is removed in the child."""
    dump.enable(str(control_dir))
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.write(writer, b"1" if stackdump.has_handler(os.getpid(), STACK_SIGNAL) else b"0")
        os._exit(0)
    os.close(writer)
    try:
        assert os.read(reader, 1) == b"0"
    finally:
        os.close(reader)
        os.waitpid(pid, 0)
    assert stackdump.has_handler(os.getpid(), STACK_SIGNAL)


def test_read_new_waits_for_the_whole_dump_and_gives_up_in_time(tmp_path: Path) -> None:
    """A dump written in pieces is read once it stops growing; nothing new is "" at the
    timeout."""
    path = tmp_path / "1.stack"
    path.write_text("an older dump\n")
    offset = path.stat().st_size

    def write_slowly() -> None:
        with path.open("a") as f:
            for n in range(5):
                f.write(f"piece {n}\n")
                f.flush()
                time.sleep(0.01)

    writer = threading.Thread(target=write_slowly)
    writer.start()
    try:
        text = stackdump.read_new(path, offset, timeout=5)
    finally:
        writer.join()
    assert text == "".join(f"piece {n}\n" for n in range(5))
    started = time.monotonic()
    assert stackdump.read_new(path, path.stat().st_size, timeout=0.3) == ""
    assert 0.3 <= time.monotonic() - started < 2
    assert stackdump.read_new(tmp_path / "missing.stack", 0, timeout=0.1) == ""
