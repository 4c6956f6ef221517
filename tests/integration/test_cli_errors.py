"""Bad input on the command line: one clear line, the right exit code, no traceback,
nothing stored lost."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from celery_warden.store import SCHEMA_VERSION, Store
from tests.integration._workers import warden_command


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        warden_command(*args), check=False, capture_output=True, text=True, timeout=60
    )


def _assert_one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


def _free_pid() -> int:
    """A PID no process has now."""
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def test_watch_an_unknown_pid(tmp_path: Path) -> None:
    """An unknown PID is named in one line, exit 2."""
    pid = _free_pid()
    result = _cli("watch", "--pid", str(pid), "--store", str(tmp_path / "w.db"))
    _assert_one_line(result, 2, f"no process with PID {pid}")
    assert not (tmp_path / "w.db").exists()


def test_watch_a_pid_that_is_not_a_worker(tmp_path: Path) -> None:
    """A PID that is not a Celery worker is named and refused, exit 2."""
    result = _cli("watch", "--pid", str(os.getpid()), "--store", str(tmp_path / "w.db"))
    _assert_one_line(result, 2, f"PID {os.getpid()} is not a Celery worker")


def test_watch_with_no_worker_matching(tmp_path: Path) -> None:
    """No worker matching says how many processes were looked at and what to do."""
    result = _cli("watch", "--match", "no-such-app-x7", "--store", str(tmp_path / "w.db"))
    _assert_one_line(result, 2, "no Celery worker matching", "--pid")


def test_run_with_no_command(tmp_path: Path) -> None:
    """`run` with nothing after `--` is a usage error that shows the right form."""
    result = _cli("run", "--store", str(tmp_path / "w.db"), "--")
    _assert_one_line(result, 2, "nothing to run", "celery-warden run -- celery")


def test_run_a_command_that_does_not_exist(tmp_path: Path) -> None:
    """A worker command that cannot start is named, exit 2."""
    result = _cli("run", "--store", str(tmp_path / "w.db"), "--", "celery-no-such-binary")
    _assert_one_line(result, 2, "cannot start 'celery-no-such-binary'")


def test_a_store_that_is_not_sqlite_is_refused_untouched(tmp_path: Path) -> None:
    """A store path holding another file is refused, exit 1, and the file kept."""
    path = tmp_path / "notes.txt"
    path.write_text("precious notes\n" * 50)
    for args in (("report", "--store", str(path)), ("run", "--store", str(path), "--", "true")):
        _assert_one_line(_cli(*args), 1, str(path), "not")
    assert path.read_text() == "precious notes\n" * 50


def test_a_store_with_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    """A store from a newer celery-warden is refused, exit 1, its data kept."""
    path = tmp_path / "w.db"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    for args in (("report", "--store", str(path)), ("run", "--store", str(path), "--", "true")):
        _assert_one_line(_cli(*args), 1, "upgrade celery-warden")
    assert path.read_bytes() == before


def test_a_read_only_store_directory(tmp_path: Path) -> None:
    """A store in a read-only directory is refused with the path, exit 1.

    Root writes through permission bits, so as root the directory is made read-only
    for real: a read-only bind mount in a private mount namespace.
    """
    folder = tmp_path / "ro"
    folder.mkdir()
    argv = warden_command("run", "--store", str(folder / "w.db"), "--", "true")
    if os.geteuid() == 0:
        script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
        argv = ["unshare", "-m", "sh", "-c", script, "sh", str(folder), *argv]
    else:
        folder.chmod(0o500)
    try:
        result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    finally:
        folder.chmod(0o700)
    _assert_one_line(result, 1, str(folder), "not writable")
    assert list(folder.iterdir()) == []


def test_a_read_only_store_file(tmp_path: Path) -> None:
    """A store file that cannot be written (its directory can) is refused, exit 1."""
    path = tmp_path / "w.db"
    Store.open(path).close()
    argv = warden_command("run", "--store", str(path), "--", "true")
    if os.geteuid() == 0:
        script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
        argv = ["unshare", "-m", "sh", "-c", script, "sh", str(path), *argv]
    else:
        path.chmod(0o400)
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    _assert_one_line(result, 1, str(path), "read-only")


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_an_interval_that_is_not_a_number_of_seconds(tmp_path: Path, value: str) -> None:
    """--interval must be a finite number of seconds in range, exit 2."""
    result = _cli("run", "--interval", value, "--store", str(tmp_path / "w.db"), "--", "true")
    assert result.returncode == 2
    assert "--interval" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w.db").exists()


def test_a_store_where_no_directory_can_be_made(tmp_path: Path) -> None:
    """A store whose directory cannot be created is refused with the path, exit 1."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _cli("run", "--store", str(blocker / "sub" / "w.db"), "--", "true")
    _assert_one_line(result, 1, str(blocker / "sub"))


def test_report_on_an_empty_store_says_what_to_do(tmp_path: Path) -> None:
    """`report` with nothing recorded says how to record something, exit 1."""
    _assert_one_line(_cli("report", "--store", str(tmp_path / "none.db")), 1, "celery-warden run")


def test_run_passes_the_exit_code_of_the_command_through(tmp_path: Path) -> None:
    """`run` exits with its command's exit code."""
    result = _cli(
        "run", "--store", str(tmp_path / "w.db"), "--", sys.executable, "-c", "raise SystemExit(7)"
    )
    assert result.returncode == 7
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["run", "--child-hard-mib", "1GB", "--", "true"], ["child_hard_mib", "1024 for 1 GiB"]),
        (["watch", "--child-soft-mib", "900", "--child-hard-mib", "800"], ["child_soft_mib"]),
        (["watch", "--recycle-grace-seconds", "0"], ["recycle.grace_seconds", "> 0"]),
    ],
)
def test_a_bad_guard_flag_is_one_line_and_starts_nothing(
    args: list[str], words: list[str], tmp_path: Path
) -> None:
    store = tmp_path / "warden.db"
    result = _cli(*args[:1], "--store", str(store), *args[1:])
    _assert_one_line(result, 2, *words)
    assert not store.exists()  # refused before anything was opened


def test_print_config_loads_back_to_the_same_config(tmp_path: Path) -> None:
    """The printed config, given back with --config, prints the same again."""
    first = _cli("run", "--child-hard-mib", "700", "--hang-min-seconds", "90", "--print-config")
    assert first.returncode == 0, first.stderr
    path = tmp_path / "guard.toml"
    path.write_text(first.stdout)
    path.chmod(0o600)
    again = _cli("run", "--config", str(path), "--print-config")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert "child_hard_mib = 700" in first.stdout
