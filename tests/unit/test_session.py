"""A session's own housekeeping: which records it writes, what it removes at the end."""

from __future__ import annotations

import os
from pathlib import Path

from celery_warden._records import TaskFinished, TaskStarted, TaskState
from celery_warden.listener import bind_server
from celery_warden.session import Session, _without_superseded_starts
from celery_warden.store import Store


def test_a_start_whose_end_is_in_the_same_batch_is_not_written() -> None:
    """One row per call: a start is dropped when its end travels with it, kept when not."""
    done = TaskStarted(7, 70, "a", "proj.add", 1.0)
    running = TaskStarted(7, 70, "b", "proj.add", 2.0)
    end = TaskFinished(7, 70, "a", "proj.add", 1.5, 0.5, TaskState.SUCCESS, 1, 1.0)
    assert _without_superseded_starts([done, running, end]) == [running, end]


def _stop_session_listening_in(directory: Path, tmp_path: Path) -> None:
    directory.mkdir()
    (directory / "keep.txt").write_text("mine")
    path = str(directory / "probe.sock")
    store = Store.open(tmp_path / "w.db")
    session = Session(store, mode="install", command="x", listen_on=(path, bind_server(path)))
    session.start()
    session.stop(exit_code=0)
    store.close()
    assert not os.path.exists(path)


def test_a_socket_directory_the_session_did_not_make_is_kept(tmp_path: Path) -> None:
    """`collect --socket ~/x/probe.sock` removes its socket, never ~/x."""
    _stop_session_listening_in(tmp_path / "x", tmp_path)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_the_private_directory_install_made_is_removed(tmp_path: Path) -> None:
    """The celery-warden-* directory install(app) made goes with the session."""
    _stop_session_listening_in(tmp_path / "celery-warden-abc", tmp_path)
    assert not (tmp_path / "celery-warden-abc").exists()
