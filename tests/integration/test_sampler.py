"""The sampler on real process trees (no Celery: a stand-in whose command line is a
worker's), with real signals."""

from __future__ import annotations

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
