"""The sampler on real process trees (no Celery: a stand-in whose command line is a
worker's), with real signals."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from celery_warden._records import EndReason, ProcessEnd, ProcessInfo, Role, Sample
from celery_warden.sampler import Sampler
from celery_warden.store import Record
from tests._support import wait_until

# A stand-in worker: forks two "pool children" (same command line, no exec), one of
# which spawns `sleep` (a task's subprocess). It reaps children only on SIGUSR1, so a
# killed child stays a zombie until the test says so.
FAKE_WORKER = """
import os, signal, subprocess, sys, time
def reap(*_):
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
signal.signal(signal.SIGUSR1, reap)
for i in range(2):
    if os.fork() == 0:
        if i == 0:
            subprocess.Popen(["sleep", "120"])
        time.sleep(120)
        os._exit(0)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def start_stand_in(
    code: str, folder: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """Run ``code`` as a script named `celery` with a worker's arguments; wait until it
    prints `ready`."""
    script = folder / "celery"
    script.write_text(code)
    proc = spawn(
        [sys.executable, str(script), "-A", "proj", "worker"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    return proc


@pytest.fixture
def fake_worker(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """A running stand-in worker tree, reaped after the test."""
    return start_stand_in(FAKE_WORKER, tmp_path, spawn)


def _sweep_until(
    sampler: Sampler,
    predicate: Callable[[list[Record]], bool],
    sink: list[Record],
    what: str = "",
) -> None:
    def step() -> bool:
        records = sampler.sweep()
        sink.extend(records)
        return predicate(records)

    wait_until(step, timeout=20, what=what)


def test_the_whole_tree_is_found_with_roles(fake_worker: subprocess.Popen[bytes]) -> None:
    """The master, its two forked children and a task's subprocess are found, each with
    its role, and sampled."""
    # GIVEN a sampler anchored on the worker
    sampler = Sampler()
    sampler.add_anchor(fake_worker.pid)
    records: list[Record] = []
    # WHEN it sweeps until it tracks four processes, the task's one after its exec
    _sweep_until(
        sampler,
        lambda _: (
            len(sampler.tracked) == 4 and any(i.cmdline == "sleep 120" for i in sampler.tracked)
        ),
        records,
        "four processes",
    )
    records += sampler.sweep()
    # THEN roles follow the tree
    infos = sampler.tracked
    roles = sorted(str(i.role) for i in infos)
    assert roles == ["child", "child", "descendant", "master"]
    assert all(i.master_pid == fake_worker.pid for i in infos)
    (sleeper,) = [i for i in infos if i.role is Role.DESCENDANT]
    assert sleeper.cmdline == "sleep 120"
    # AND every process is sampled with its figures
    samples = [r for r in records if isinstance(r, Sample)]
    assert {s.pid for s in samples} == {i.pid for i in infos}
    assert all(s.rss_bytes > 0 and s.threads >= 1 for s in samples)
    assert all(s.open_fds is not None and s.open_fds >= 3 for s in samples)
    assert any(s.uss_bytes is not None for s in samples)


def test_a_killed_child_ends_as_killed_via_its_zombie(
    fake_worker: subprocess.Popen[bytes],
) -> None:
    """A child killed by SIGKILL is seen as a zombie (no memory counted), then ends with
    reason `killed` and code -9 once reaped."""
    # GIVEN a sampler tracking the tree
    sampler = Sampler()
    sampler.add_anchor(fake_worker.pid)
    records: list[Record] = []
    _sweep_until(sampler, lambda _: len(sampler.tracked) == 4, records)
    child = next(i for i in sampler.tracked if i.role is Role.CHILD)
    # WHEN the child is killed and its parent does not reap it yet
    os.kill(child.pid, signal.SIGKILL)
    _sweep_until(
        sampler,
        lambda rs: any(
            isinstance(r, Sample) and r.pid == child.pid and r.state == "zombie" for r in rs
        ),
        records,
    )
    # THEN once its parent reaps it, its end carries the signal
    os.kill(fake_worker.pid, signal.SIGUSR1)
    _sweep_until(
        sampler,
        lambda rs: any(isinstance(r, ProcessEnd) and r.pid == child.pid for r in rs),
        records,
    )
    (end,) = [r for r in records if isinstance(r, ProcessEnd) and r.pid == child.pid]
    assert (end.reason, end.exit_code) == (EndReason.KILLED, -signal.SIGKILL)
    zombie = [r for r in records if isinstance(r, Sample) and r.state == "zombie"]
    assert all(z.rss_bytes == 0 for z in zombie)


def test_a_process_outside_the_tree_is_never_tracked(
    fake_worker: subprocess.Popen[bytes],
    spawn: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """A look-alike worker that is not below the anchor is ignored."""
    # GIVEN a decoy with the same command line, in its own session
    decoy_script = tmp_path / "decoy" / "celery"
    decoy_script.parent.mkdir()
    decoy_script.write_text("import time\ntime.sleep(60)\n")
    decoy = spawn(
        [sys.executable, str(decoy_script), "-A", "proj", "worker"], start_new_session=True
    )
    # WHEN the sampler sweeps the real worker's tree
    sampler = Sampler()
    sampler.add_anchor(fake_worker.pid)
    records: list[Record] = []
    _sweep_until(sampler, lambda _: len(sampler.tracked) == 4, records)
    records += sampler.sweep()
    # THEN the decoy is not in it
    assert decoy.pid not in {i.pid for i in sampler.tracked}


EXEC_WORKER = """
import os, time
if os.fork() == 0:
    time.sleep(0.5)
    os.execv("/bin/sleep", ["sleep", "60"])
print("ready", flush=True)
time.sleep(60)
"""


def test_a_pool_child_that_execs_is_reclassified(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """A pool child that execs another program is no longer a pool child: it becomes a
    descendant with its new command line."""
    # GIVEN a worker whose child execs `sleep` half a second after the fork
    worker = start_stand_in(EXEC_WORKER, tmp_path, spawn)
    sampler = Sampler()
    sampler.add_anchor(worker.pid)
    records: list[Record] = []
    # WHEN the sampler keeps sweeping
    _sweep_until(
        sampler,
        lambda _: any(i.cmdline == "sleep 60" for i in sampler.tracked),
        records,
        "the exec to be seen",
    )
    # THEN the child was first a pool child, then a descendant running `sleep`
    (child_pid,) = {
        i.pid for i in records if isinstance(i, ProcessInfo) and i.role is not Role.MASTER
    }
    roles = [
        (str(i.role), i.cmdline.split()[0])
        for i in records
        if isinstance(i, ProcessInfo) and i.pid == child_pid
    ]
    assert roles[0][0] == "child"
    assert roles[-1] == ("descendant", "sleep")


def test_a_worker_anchored_after_earlier_scans_is_found_whole(
    fake_worker: subprocess.Popen[bytes],
) -> None:
    """A worker added to a sampler that already scanned the host (watch following new
    workers) is found with its children, which the earlier scans had passed over."""
    # GIVEN a sampler that has already swept the host without this worker
    sampler = Sampler()
    sampler.sweep()
    # WHEN the worker is added
    sampler.add_anchor(fake_worker.pid)
    records: list[Record] = []
    # THEN its whole tree is found
    _sweep_until(sampler, lambda _: len(sampler.tracked) == 4, records, "four processes")


# A stand-in worker whose "pool child" forks a short-lived process every 2 ms (about
# 400 a second, 40 alive at a time), for RELIABILITY.md D21.
CHURNING_WORKER = """
import os, signal, sys, time
if os.fork() == 0:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps them
    deadline = time.monotonic() + float(sys.argv[-1])
    while time.monotonic() < deadline:
        if os.fork() == 0:
            time.sleep(0.1)  # long enough to be seen, short enough to vanish mid-read
            os._exit(0)
        time.sleep(0.002)
    os._exit(0)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def test_the_session_and_its_guard_survive_process_churn(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """D21: hundreds of processes a second appear and vanish in the watched tree; the
    sampler and the guard never fail on one that vanished mid-read, and sweeps keep
    their pace (each within 2 x the interval)."""
    import logging
    import time

    from celery_warden._config import SamplerConfig
    from celery_warden.guard import GuardConfig, attach_guard
    from celery_warden.guard._config import MemoryPolicy, OrphanPolicy
    from celery_warden.session import Session
    from celery_warden.store import Store

    script = tmp_path / "celery"
    script.write_text(CHURNING_WORKER)
    worker = spawn(
        [sys.executable, str(script), "-A", "proj", "worker", "12"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert worker.stdout is not None
    assert worker.stdout.readline() == b"ready\n"
    errors: list[logging.LogRecord] = []

    class Errors(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record)

    handler = Errors()
    logging.getLogger("celery_warden").addHandler(handler)
    store = Store.open(tmp_path / "warden.db")
    session = Session(
        store,
        mode="watch",
        command="churn",
        config=SamplerConfig(interval_seconds=0.2),
        with_probe=False,
    )
    config = GuardConfig(
        act=False,
        memory=MemoryPolicy(child_hard_mib=1.0, sustain_samples=1),
        orphans=OrphanPolicy(grace_seconds=0.5),
    )
    guard = attach_guard(session, config, tmp_path / "warden.db")
    sweeps: list[float] = []
    session.on_sweep(lambda: sweeps.append(time.monotonic()))
    try:
        session.add_anchor(worker.pid)
        session.start()
        guard.start()
        time.sleep(10)
    finally:
        guard.stop(timeout=5)
        session.stop(exit_code=0)
        store.close()
        logging.getLogger("celery_warden").removeHandler(handler)
    ended = query_count(tmp_path / "warden.db", "SELECT count(*) FROM processes")
    assert ended > 500, f"only {ended} processes seen: no churn to survive"
    assert errors == []
    gaps = [b - a for a, b in itertools.pairwise(sweeps)]
    assert len(sweeps) >= 25
    assert max(gaps) < 2 * session.config.interval_seconds


def query_count(store: Path, sql: str) -> int:
    import sqlite3

    conn = sqlite3.connect(store)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()
