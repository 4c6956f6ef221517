"""The guard against hung pool children, in real prefork workers on Redis under `run`
(the probe tells it what each child runs): the stack is captured and stored before the
kill, by py-spy or by the probe's faulthandler, or the record says why there is none
(RELIABILITY.md E23); a child whose heartbeats stop is flagged, a long healthy task
never is (E25)."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from celery import Celery

from celery_warden.probe._control import CONTROL_DIR_ENV
from celery_warden.probe._hooks import HEARTBEAT_ENV
from celery_warden.store import Store
from tests._support import wait_until
from tests.integration._workers import APP_DIR, BROKERS, marked_line, query, worker_env

pytestmark = pytest.mark.integration

GUARD_FILE = APP_DIR / "warden_guard.py"
INTERVAL = 0.5  # seconds between the warden's sweeps
HANG_SECONDS = 2  # hang.min_seconds of the hang tests
GRACE = 2  # recycle.grace_seconds: between TERM and KILL

# Every write of an incident or a signal audit, in commit order, with SQLite's clock:
# the store keeps only an incident's last version, this keeps each one.
_WRITE_LOG = """
CREATE TABLE test_writes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    what TEXT NOT NULL, ref TEXT, pid INTEGER, outcome TEXT, stack TEXT, t REAL, at REAL
);
CREATE TRIGGER test_incident_writes AFTER INSERT ON incidents BEGIN
    INSERT INTO test_writes (what, ref, pid, outcome, stack, t, at) VALUES ('incident',
        NEW.id, NEW.pid, NEW.outcome, NEW.stack, NEW.t,
        (julianday('now') - 2440587.5) * 86400.0);
END;
CREATE TRIGGER test_signal_writes AFTER INSERT ON signals BEGIN
    INSERT INTO test_writes (what, ref, pid, outcome, stack, t, at) VALUES (NEW.signal,
        NEW.incident_id, NEW.pid, NEW.result, NEW.detail, NEW.t,
        (julianday('now') - 2440587.5) * 86400.0);
END;
"""


def _line(name: str) -> int:
    return marked_line(GUARD_FILE, name)


@dataclass
class Warden:
    """`celery-warden run` with a prefork worker of the guard app, and its store."""

    proc: subprocess.Popen[bytes]
    store: Path
    queue: str
    log: Path

    def incident(self, task_id: str) -> dict[str, Any] | None:
        """The guard's incident about ``task_id``, once its outcome is known."""
        rows = query(
            self.store,
            "SELECT id, kind, pid, t, reason, numbers, outcome, stack, task_name"
            " FROM incidents WHERE task_id = ? AND outcome != 'pending'",
            task_id,
        )
        if not rows:
            return None
        keys = ("id", "kind", "pid", "t", "reason", "numbers", "outcome", "stack", "task_name")
        incident = dict(zip(keys, rows[0], strict=True))
        incident["numbers"] = json.loads(str(incident["numbers"]))
        return incident

    def running(self, task_id: str) -> int | None:
        """The pid of the child that started ``task_id``."""
        rows = query(self.store, "SELECT pid FROM tasks WHERE task_id = ?", task_id)
        return int(rows[0][0]) if rows else None  # type: ignore[call-overload]

    def writes(self, ref: str) -> list[tuple[Any, ...]]:
        """The incident's writes and the signals sent for it, in commit order."""
        return query(
            self.store,
            "SELECT seq, what, outcome, stack, t, at FROM test_writes WHERE ref = ? ORDER BY seq",
            ref,
        )

    def signals(self, pid: int) -> list[tuple[Any, ...]]:
        return query(
            self.store,
            "SELECT signal, result, incident_id, detail FROM signals WHERE pid = ? ORDER BY id",
            pid,
        )

    def stop(self) -> None:
        """Warm shutdown, forwarded to the master: the warden exits with the worker."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0, self.log.read_text()[-3000:]


def _worker_argv(queue: str, concurrency: int) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "warden_orphans", "worker",
        "--pool", "prefork", "-c", str(concurrency), "-Q", queue, "-n", f"{queue}@%h",
        "-l", "info", "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def _start(
    spawn: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
    *,
    flags: list[str],
    config: str | None = None,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
    concurrency: int = 1,
) -> Warden:
    """`run` the guard app's worker with ``flags`` (and ``config`` as its TOML file)
    into a new store that logs every write; return once the tree is known."""
    store = tmp_path / "warden.db"
    Store.open(store).close()
    with sqlite3.connect(store) as conn:
        conn.executescript(_WRITE_LOG)
    conn.close()
    queue = f"warden-test-{uuid.uuid4().hex[:10]}"
    full_env = worker_env(BROKERS["redis"])
    full_env[CONTROL_DIR_ENV] = str(tmp_path / "ctl")
    full_env["CELERY_WARDEN_CONFIG"] = ""
    full_env.update(env or {})
    argv = [python, "-m", "celery_warden", "run", "--store", str(store)]
    argv += ["--interval", str(INTERVAL), *flags]
    if config is not None:
        path = tmp_path / "guard.toml"
        path.write_text(config)
        path.chmod(0o600)
        argv += ["--config", str(path)]
    log = tmp_path / "warden.log"
    with log.open("wb") as out:
        proc = spawn(
            [*argv, "--", *_worker_argv(queue, concurrency)],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    warden = Warden(proc, store, queue, log)
    wait_until(
        lambda: (
            (
                query(store, "SELECT 1 FROM workers")
                and query(
                    store,
                    "SELECT count(*) FROM processes WHERE role = 'child' AND ended_at IS NULL",
                )
                == [(concurrency,)]
            )
            or proc.poll() is not None
        ),
        what=f"a master and {concurrency} pool child(ren)",
    )
    assert proc.poll() is None, log.read_text()[-3000:]
    return warden


def _venv_copy(root: Path, py_spy: str | None = None) -> tuple[str, dict[str, str]]:
    """A python that runs this virtualenv's packages from another directory, so that no
    py-spy is beside it (``py_spy``: a fake one put there instead), and a PATH without
    any py-spy: the guard's find_py_spy() then finds none (or the fake)."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests must run from a virtualenv to make a copy of it")
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    shutil.copy(Path(sys.prefix) / "pyvenv.cfg", venv / "pyvenv.cfg")
    python = venv / "bin" / "python"
    python.symlink_to(os.path.realpath(sys.executable))
    purelib = Path(sysconfig.get_paths()["purelib"])
    site = venv / purelib.relative_to(sys.prefix)
    site.parent.mkdir(parents=True)
    site.symlink_to(purelib)
    if py_spy is not None:
        (venv / "bin" / "py-spy").write_text(py_spy)
        (venv / "bin" / "py-spy").chmod(0o755)
    path = os.pathsep.join(
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and not os.path.exists(os.path.join(d, "py-spy"))
    )
    found = subprocess.run(
        [
            str(python),
            "-c",
            "from celery_warden.guard import _stacks; print(_stacks.find_py_spy())",
        ],
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    expected = str(venv / "bin" / "py-spy") if py_spy is not None else "None"
    assert found == expected, f"py-spy found at {found}"
    return str(python), {"PATH": path}


class _Death:
    """When a process ended, by its pidfd, as seen from the test."""

    def __init__(self, pid: int) -> None:
        self.at: float | None = None
        self._fd = os.pidfd_open(pid)
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        try:
            if select.select([self._fd], [], [], 120)[0]:
                self.at = time.time()
        finally:
            os.close(self._fd)

    def wait(self, timeout: float) -> float:
        self._thread.join(timeout)
        assert self.at is not None, "the process did not end"
        return self.at


_HANGS = {
    # hang.stack, a fake py-spy, what the stored stack must match
    "py-spy": (
        "auto",
        None,
        rf"wait_forever \(\S*warden_guard\.py:{_line('wait_forever')}\)",
    ),
    "faulthandler": (
        "auto",
        "",  # no py-spy at all: the guard falls back to the probe's faulthandler
        rf'File "{re.escape(str(GUARD_FILE))}", line {_line("wait_forever")} in wait_forever',
    ),
    "py-spy-hangs": (
        "py-spy",
        "#!/bin/sh\nexec sleep 10\n",  # killed at the 2 s timeout
        r"^dump_unavailable: py-spy did not finish within 2 s$",
    ),
    "py-spy-fails": (
        "py-spy",
        # what py-spy prints when ptrace is refused and RUST_BACKTRACE=1 is set
        "#!/bin/sh\n"
        "echo 'Error: Failed to open process - check if it is running.' >&2\n"
        "printf '\\nCaused by:\\n    Operation not permitted (os error 1)\\n' >&2\n"
        "printf '\\nStack backtrace:\\n   0: py_spy::main\\n   1: main\\n' >&2\n"
        "exit 1\n",
        r"^dump_unavailable: py-spy: .*(Operation not permitted|Failed to open process)",
    ),
    "none": (
        "none",
        None,
        r"^dump_unavailable: stack capture is turned off \(hang\.stack = none\)$",
    ),
}


@pytest.mark.parametrize("case", sorted(_HANGS))
def test_a_hung_child_has_its_stack_stored_before_it_is_killed(
    spawn: Callable[..., subprocess.Popen[bytes]],
    client: Celery,
    tmp_path: Path,
    case: str,
) -> None:
    """E23. A task hung in Python past hang.min_seconds: the incident is written with
    its stack and outcome `pending` before the SIGTERM (the store's write log, kept by
    triggers, shows each write: polling could miss a pending state that lasts
    milliseconds); the stack names the task's line, from py-spy, or from the probe's
    faulthandler when there is no py-spy; when there is no stack (py-spy hangs past
    hang.stack_timeout_seconds, py-spy fails as it does on EPERM, or hang.stack = none)
    the kill happens all the same and the record says `dump_unavailable: <why>`, the
    why naming the cause (not the last line of py-spy's backtrace)."""
    method, fake_py_spy, expected = _HANGS[case]
    python, env = sys.executable, {}
    if fake_py_spy is not None:
        python, env = _venv_copy(tmp_path, fake_py_spy or None)
    # GIVEN a worker under the warden, hang.min_seconds = HANG_SECONDS
    warden = _start(
        spawn,
        tmp_path,
        flags=["--hang-min-seconds", str(HANG_SECONDS), "--recycle-grace-seconds", str(GRACE)],
        config=f'[hang]\nstack = "{method}"\nstack_timeout_seconds = 2\n',
        python=python,
        env=env,
    )
    # WHEN a task hangs in its child
    task_id = str(uuid.uuid4())
    client.send_task("guard.wait_forever", task_id=task_id, queue=warden.queue)
    child = wait_until(lambda: warden.running(task_id), what="the hung task")
    assert isinstance(child, int)
    death = _Death(child)
    # THEN the guard finds it hung, stores its stack, and kills it
    incident = wait_until(lambda: warden.incident(task_id), what="the hang incident")
    assert isinstance(incident, dict)
    assert (incident["kind"], incident["pid"]) == ("hang", child)
    assert incident["task_name"] == "guard.wait_forever"
    assert "hang.min_seconds" in incident["reason"]
    assert incident["numbers"]["runtime_seconds"] >= HANG_SECONDS
    assert re.search(expected, str(incident["stack"]), re.MULTILINE), incident["stack"]
    assert incident["outcome"] == "terminated"  # a Python-level wait ends on SIGTERM
    died = death.wait(10)
    # AND the incident was written pending before any signal (the stack signal too),
    # then again, still pending and with the stack, before the SIGTERM: in the store's
    # commit order, and by the clocks (the warden's audit, and the child's end as the
    # test saw it)
    writes = warden.writes(str(incident["id"]))
    assert writes[0][1:3] == ("incident", "pending"), writes
    before_term = writes[: next(i for i, w in enumerate(writes) if w[1] == "SIGTERM")]
    first = [w for w in before_term if w[1] == "incident"][-1]
    assert first[1:4] == ("incident", "pending", incident["stack"])
    sigterm = [w for w in writes if w[1] == "SIGTERM"]
    assert len(sigterm) == 1, writes
    assert sigterm[0][2] == "sent"
    assert first[0] < sigterm[0][0]
    assert incident["t"] <= sigterm[0][4]
    assert first[5] <= died
    # AND the child got SIGTERM only: no KILL, and the stack signal only on the fallback
    sent = [(s[0], s[1]) for s in warden.signals(child)]
    if case == "faulthandler":
        rt_signal, result = sent.pop(0)
        assert (rt_signal.startswith("SIGRTMIN"), result) == (True, "sent")
    assert sent == [("SIGTERM", "sent")]
    # AND the worker replaced the child and goes on
    wait_until(
        lambda: (
            query(
                warden.store,
                "SELECT count(*) FROM processes WHERE role = 'child' AND ended_at IS NULL",
            )
            == [(1,)]
        ),
        what="a new child",
    )
    warden.stop()


def test_a_child_whose_heartbeats_stop_is_flagged_and_a_long_healthy_task_is_not(
    spawn: Callable[..., subprocess.Popen[bytes]],
    client: Celery,
    tmp_path: Path,
) -> None:
    """E25. Heartbeats every 5 s (the probe's default), hang.stalled_seconds = 8,
    hang.min_seconds = 60, three children. Two are stopped by SIGSTOP while they run a
    task: one that has sent heartbeats, and one stopped within its first heartbeat
    period, before any (as a task that holds the GIL in C from its start would be): both
    are flagged as hung for their silence within stalled_seconds + two sweeps (+1 s,
    RELIABILITY.md's window) and killed (a stopped process keeps TERM pending: KILL
    after the grace). The third child runs a healthy 15 s task while its heartbeats
    flow: it is never flagged nor signalled, and its task succeeds."""
    stalled = 8
    # GIVEN a worker with three children under the warden, two recycles at once allowed
    warden = _start(
        spawn,
        tmp_path,
        flags=["--hang-min-seconds", "60", "--recycle-grace-seconds", str(GRACE)],
        config=(
            f"[hang]\nstalled_seconds = {stalled}\n"
            "[recycle]\nmax_parallel = 2\nmin_interval_seconds = 0\n"
        ),
        env={HEARTBEAT_ENV: "5"},
        concurrency=3,
    )
    ids = {name: str(uuid.uuid4()) for name in ("healthy", "beaten", "fresh")}
    client.send_task("guard.sleep_for", args=(300,), task_id=ids["fresh"], queue=warden.queue)
    client.send_task("guard.sleep_for", args=(15,), task_id=ids["healthy"], queue=warden.queue)
    client.send_task("guard.sleep_for", args=(300,), task_id=ids["beaten"], queue=warden.queue)
    pids: dict[str, int] = {}
    stopped_at: dict[str, float] = {}
    ages: dict[str, float] = {}
    incidents: dict[str, dict[str, Any] | None] = {}
    stopped: list[psutil.Process] = []
    try:
        for name, task_id in ids.items():
            pid = wait_until(lambda t=task_id: warden.running(t), what=f"the {name} task")
            assert isinstance(pid, int)
            pids[name] = pid
        assert len(set(pids.values())) == 3
        # WHEN one child is stopped as soon as its task runs, and another once it has
        # lived past its first heartbeat
        for name in ("fresh", "beaten"):
            proc = psutil.Process(pids[name])
            if name == "beaten":
                time.sleep(max(0.0, proc.create_time() + 5 + 1 - time.time()))
            proc.suspend()
            stopped.append(proc)
            stopped_at[name] = time.time()
            ages[name] = stopped_at[name] - proc.create_time()
        # THEN each is flagged for its silence (or not, by the deadline)
        for name in ("beaten", "fresh"):
            # the window, then the longest stack capture and the grace before KILL
            deadline = stopped_at[name] + stalled + 2 * INTERVAL + 1 + 10 + GRACE + 2
            incidents[name] = None
            while time.time() < deadline and incidents[name] is None:
                incidents[name] = warden.incident(ids[name])
                time.sleep(0.2)
    finally:
        for proc in stopped:
            if proc.is_running():
                proc.kill()
    window = stalled + 2 * INTERVAL + 1
    problems = []
    for name in ("beaten", "fresh"):
        incident = incidents[name]
        where = f"{name} child (stopped {ages[name]:.1f} s after it started)"
        if incident is None:
            problems.append(f"{where}: never flagged")
            continue
        late = incident["t"] - stopped_at[name]
        if incident["kind"] != "hang" or "no heartbeat" not in incident["reason"]:
            problems.append(f"{where}: flagged {late:.1f} s later as: {incident['reason']}")
            continue
        if late > window:
            problems.append(
                f"{where}: flagged {late:.1f} s after SIGSTOP, not within {window} s "
                f"(silent {incident['numbers']['silent_seconds']} s when decided; "
                f"stack: {incident['stack']})"
            )
        if incident["outcome"] != "killed":
            problems.append(f"{where}: outcome {incident['outcome']}")
        sent = [s[0] for s in warden.signals(pids[name]) if s[1] == "sent"]
        if sent[-2:] != ["SIGTERM", "SIGKILL"]:
            problems.append(f"{where}: signals {sent}")
    # AND the healthy child's 15 s task ends well, never flagged nor signalled
    wait_until(
        lambda: query(
            warden.store,
            "SELECT state FROM tasks WHERE task_id = ? AND ended_at IS NOT NULL",
            ids["healthy"],
        ),
        timeout=30,
        what="the 15 s task's end",
    )
    healthy = (
        query(warden.store, "SELECT state FROM tasks WHERE task_id = ?", ids["healthy"]),
        query(warden.store, "SELECT kind, reason FROM incidents WHERE pid = ?", pids["healthy"]),
        warden.signals(pids["healthy"]),
    )
    if healthy != ([("success",)], [], []):
        problems.append(f"healthy child: task, incidents, signals: {healthy}")
    assert not problems, "\n".join(problems)
    warden.stop()
