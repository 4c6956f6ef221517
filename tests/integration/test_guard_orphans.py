"""The guard against what outlives a worker, and its memory thresholds, in real prefork
workers on Redis: orphaned pool children (Celery < 5.2, emulated) and what tasks
spawned are reaped through the recorded lineage, a look-alike decoy and another user's
process never are (RELIABILITY.md C15-C18); a task that used memory and freed it, and
pages shared copy-on-write with the master, never trip a threshold on current private
memory (D19, D20).

Processes that outlive the worker's tree (orphans, the decoy, task-spawned programs)
are reparented away from the test's processes: the ``strays`` fixture kills each one
that is still the process it was, whatever the test's outcome.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from celery import Celery

from celery_warden.probe._control import CONTROL_DIR_ENV
from tests._support import wait_until
from tests.integration._workers import BROKERS, query, warden_command, worker_env

pytestmark = pytest.mark.integration

INTERVAL = 0.5  # seconds between the warden's sweeps
ORPHAN_GRACE = 2  # orphans.grace_seconds
_MIB = 1024 * 1024
_TIMINGS = ["--interval", str(INTERVAL), "--recycle-grace-seconds", "2"]


@pytest.fixture
def strays() -> Iterator[list[psutil.Process]]:
    """Processes to kill at the end: psutil refuses to signal a PID reused since."""
    procs: list[psutil.Process] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


@dataclass
class Tree:
    """A worker of the guard app (``warden_orphans``) and the warden watching it."""

    warden: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes] | None  # None: `run` started it
    store: Path
    queue: str
    log: Path

    @property
    def master(self) -> int:
        rows = query(
            self.store, "SELECT pid FROM processes WHERE role = 'master' AND ended_at IS NULL"
        )
        assert len(rows) == 1, rows
        return int(rows[0][0])  # type: ignore[call-overload]

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.master).children()

    def incidents(self, kind: str) -> dict[int, dict[str, Any]]:
        """The incidents of ``kind`` by pid."""
        keys = ("id", "pid", "master_pid", "reason", "numbers", "outcome", "task_name", "task_id")
        found = {}
        for row in query(
            self.store,
            "SELECT id, pid, master_pid, reason, numbers, outcome, task_name, task_id"
            " FROM incidents WHERE kind = ?",
            kind,
        ):
            incident = dict(zip(keys, row, strict=True))
            incident["numbers"] = json.loads(str(incident["numbers"]))
            found[int(incident["pid"])] = incident
        return found

    def signals(self) -> list[tuple[Any, ...]]:
        return query(self.store, "SELECT pid, signal, result, incident_id FROM signals")

    def sampled(self, pids: list[int], sweeps: int) -> bool:
        """Whether each of ``pids`` has been sampled by ``sweeps`` sweeps."""
        for pid in pids:
            rows = query(
                self.store,
                "SELECT count(DISTINCT s.t) FROM samples s JOIN processes p"
                " ON p.id = s.process_id WHERE p.pid = ?",
                pid,
            )
            if not rows or int(rows[0][0]) < sweeps:  # type: ignore[call-overload]
                return False
        return True


def _worker_argv(queue: str, concurrency: int) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "warden_orphans", "worker",
        "--pool", "prefork", "-c", str(concurrency), "-Q", queue, "-n", f"{queue}@%h",
        "-l", "info", "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = worker_env(BROKERS["redis"])
    env[CONTROL_DIR_ENV] = str(tmp_path / "ctl")
    env["CELERY_WARDEN_CONFIG"] = ""
    env.update(extra)
    return env


def _ready(tree: Tree, concurrency: int) -> Tree:
    """Wait until the warden knows the master and its children, sampled twice (the
    guard has seen the master alive)."""

    def known() -> bool:
        if tree.warden.poll() is not None:
            raise AssertionError(tree.log.read_text()[-3000:])
        children = [
            int(row[0])  # type: ignore[call-overload]
            for row in query(
                tree.store, "SELECT pid FROM processes WHERE role = 'child' AND ended_at IS NULL"
            )
        ]
        masters = query(tree.store, "SELECT pid FROM processes WHERE role = 'master'")
        return len(children) == concurrency and bool(masters) and tree.sampled(children, 2)

    wait_until(known, what=f"a master and {concurrency} sampled children")
    return tree


def _watch(
    spawn: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
    env: dict[str, str],
    *flags: str,
    concurrency: int = 2,
    queue: str = "",
) -> Tree:
    """A worker started here, then `watch --act --pid MASTER` on it."""
    queue = queue or f"warden-test-{uuid.uuid4().hex[:10]}"
    with (tmp_path / "worker.log").open("wb") as out:
        worker = spawn(_worker_argv(queue, concurrency), env=env, stdout=out, stderr=out)
    wait_until(
        lambda: len(psutil.Process(worker.pid).children()) == concurrency,
        what="the pool children",
    )
    store, log = tmp_path / "warden.db", tmp_path / "warden.log"
    argv = warden_command("watch", "--act", "--pid", str(worker.pid), "--store", str(store))
    with log.open("wb") as out:
        warden = spawn([*argv, *_TIMINGS, *flags], env=env, stdout=out, stderr=out)
    return _ready(Tree(warden, worker, store, queue, log), concurrency)


def _run(
    spawn: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
    env: dict[str, str],
    *flags: str,
    concurrency: int = 2,
) -> Tree:
    """`celery-warden run` with a worker of its own (the probe tells it the tasks)."""
    queue = f"warden-test-{uuid.uuid4().hex[:10]}"
    store, log = tmp_path / "warden.db", tmp_path / "warden.log"
    argv = warden_command("run", "--store", str(store), *_TIMINGS, *flags)
    with log.open("wb") as out:
        warden = spawn(
            [*argv, "--", *_worker_argv(queue, concurrency)], env=env, stdout=out, stderr=out
        )
    tree = _ready(Tree(warden, None, store, queue, log), concurrency)
    wait_until(lambda: query(store, "SELECT 1 FROM workers"), what="the master's settings")
    return tree


def _pid_in(path: Path) -> int:
    wait_until(path.exists, what=f"a pid in {path.name}")
    return int(path.read_text())


def _kill_master(tree: Tree) -> int:
    master = tree.master
    os.kill(master, signal.SIGKILL)
    if tree.worker is not None:
        # Reaped at once, as its real parent (systemd, supervisord) would: a zombie
        # master still looks alive.
        assert tree.worker.wait(timeout=10) == -signal.SIGKILL
    return master


def _check_orphans_reaped(tree: Tree, master: int, children: list[psutil.Process]) -> None:
    """Each of ``children`` has an orphan incident, terminated or killed through the
    guard's audited signals, after the grace; nothing else was signalled."""
    pids = {c.pid for c in children}
    incidents = tree.incidents("orphan")
    assert set(incidents) == pids
    for incident in incidents.values():
        assert incident["outcome"] in {"terminated", "killed"}, incident
        assert incident["master_pid"] == master
        assert "recorded lineage" in incident["reason"]
        assert incident["numbers"]["orphaned_seconds"] >= ORPHAN_GRACE
    signals = tree.signals()
    assert {s[0] for s in signals} == pids
    assert {s[3] for s in signals} == {i["id"] for i in incidents.values()}
    for pid in pids:
        sent = [s[1] for s in signals if s[0] == pid]
        assert sent[0] == "SIGTERM"
        assert set(sent) <= {"SIGTERM", "SIGKILL"}
    assert not any(c.is_running() for c in children)


def test_watch_reaps_orphaned_pool_children_and_never_a_look_alike_decoy(
    spawn: Callable[..., subprocess.Popen[bytes]],
    client: Celery,
    strays: list[psutil.Process],
    tmp_path: Path,
) -> None:
    """C15 + C16 under `watch --act --pid MASTER`. The pool children clear their
    PDEATHSIG (Celery < 5.2); one runs an acks_late task when the master is killed
    with SIGKILL. After orphans.grace_seconds both children get an orphan incident and
    are ended through the guard's signals, and nothing else is signalled. A decoy with
    the worker's command line, adopted by the same reaper as the orphans but never in
    the watched tree, is never signalled, has no incident and is still alive.

    `watch` has no probe: it cannot tell which task the busy child runs, so the
    redelivery warning is checked under `run` (the next test)."""
    env = _env(tmp_path, CW_NO_PDEATHSIG="1")
    queue = f"warden-test-{uuid.uuid4().hex[:10]}"
    # GIVEN a decoy with the very command line of the worker (a python that sleeps in
    # its sitecustomize), in a session of its own, adopted by the reaper
    decoy_site = tmp_path / "decoy"
    decoy_site.mkdir()
    (decoy_site / "sitecustomize.py").write_text("import os, time\ntime.sleep(300)\nos._exit(0)\n")
    subprocess.run(
        ["setsid", "-f", *_worker_argv(queue, 2)],
        env={**env, "PYTHONPATH": str(decoy_site)},
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    found = wait_until(
        lambda: [
            p
            for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] == _worker_argv(queue, 2)
        ],
        what="the decoy",
    )
    assert isinstance(found, list)
    (decoy,) = found
    strays.append(decoy)
    # AND a worker whose children outlive their master, under `watch --act`
    tree = _watch(spawn, tmp_path, env, "--orphan-grace-seconds", str(ORPHAN_GRACE), queue=queue)
    assert psutil.Process(tree.master).cmdline() == decoy.cmdline()
    children = tree.children()
    strays.extend(children)
    client.send_task("orphans.late_sleep", args=(300, str(tmp_path / "busy.pid")), queue=tree.queue)
    busy = _pid_in(tmp_path / "busy.pid")
    assert busy in {c.pid for c in children}
    # WHEN the master is killed
    master = _kill_master(tree)
    # THEN its children live on, adopted by the decoy's reaper...
    assert [c.ppid() for c in children] == [decoy.ppid()] * len(children)
    # ...until the guard ends them, and the watch ends with the last of the tree
    assert tree.warden.wait(timeout=60) == 0, tree.log.read_text()[-3000:]
    _check_orphans_reaped(tree, master, children)
    # AND the decoy was never touched nor reported
    assert decoy.is_running()
    assert decoy.status() != psutil.STATUS_ZOMBIE
    assert query(tree.store, "SELECT * FROM signals WHERE pid = ?", decoy.pid) == []
    assert query(tree.store, "SELECT * FROM incidents WHERE pid = ?", decoy.pid) == []
    assert query(tree.store, "SELECT * FROM processes WHERE pid = ?", decoy.pid) == []


def test_run_reaps_orphans_after_its_worker_died_and_predicts_the_redelivery(
    spawn: Callable[..., subprocess.Popen[bytes]],
    client: Celery,
    strays: list[psutil.Process],
    tmp_path: Path,
) -> None:
    """C15 under `run` (its _settle waits for the orphans after the worker exited) and
    C18. Redis with visibility_timeout = 15 s: the orphan incident of the child busy
    with an acks_late task warns that the task will be redelivered in about
    max(visibility_timeout, unacked_restore_interval x throttle) = max(15, 10 x 10) =
    100 s and may run twice; the idle child's incident names no task.

    Observing the real redelivery (~100 s after a worker consumes the queue again, within
    +-15 s of the prediction) is left out: too slow for CI."""
    env = _env(tmp_path, CW_NO_PDEATHSIG="1", CW_VISIBILITY_TIMEOUT="15")
    # GIVEN a worker whose children outlive their master, under `run`
    tree = _run(spawn, tmp_path, env, "--orphan-grace-seconds", str(ORPHAN_GRACE))
    children = tree.children()
    strays.extend(children)
    # AND one child runs an acks_late task, which the warden knows of
    task_id = str(uuid.uuid4())
    client.send_task(
        "orphans.late_sleep",
        args=(300, str(tmp_path / "busy.pid")),
        task_id=task_id,
        queue=tree.queue,
    )
    busy = _pid_in(tmp_path / "busy.pid")
    wait_until(
        lambda: query(tree.store, "SELECT 1 FROM tasks WHERE task_id = ?", task_id),
        what="the task's start in the store",
    )
    # WHEN the master is killed
    master = _kill_master(tree)
    # THEN `run` ends with the worker's status once the orphans are dealt with
    assert tree.warden.wait(timeout=60) == 128 + signal.SIGKILL, tree.log.read_text()[-3000:]
    assert query(tree.store, "SELECT exit_code FROM sessions WHERE ended_at IS NOT NULL") == [
        (128 + signal.SIGKILL,)
    ]
    _check_orphans_reaped(tree, master, children)
    # AND the busy child's incident predicts the redelivery and the double run
    incidents = tree.incidents("orphan")
    (idle,) = {c.pid for c in children} - {busy}
    assert (incidents[busy]["task_name"], incidents[busy]["task_id"]) == (
        "orphans.late_sleep",
        task_id,
    )
    assert (
        f"its acks_late task orphans.late_sleep [{task_id}] will be redelivered in about "
        "100 s: if it finishes here too, it runs twice"
    ) in incidents[busy]["reason"]
    assert incidents[idle]["task_id"] is None
    assert "redeliver" not in incidents[idle]["reason"]


def test_what_tasks_spawned_is_reaped_through_the_lineage_but_not_another_users(
    spawn: Callable[..., subprocess.Popen[bytes]],
    client: Celery,
    strays: list[psutil.Process],
    tmp_path: Path,
) -> None:
    """C17. With PDEATHSIG (Celery >= 5.2) the pool children die with their SIGKILLed
    master, but what their tasks started lives on, adopted by the reaper. The guard
    attributes these through the lineage it recorded: root's `sleep 300` is reaped after
    the grace; two processes of uid 65534 (`setpriv ... sleep 300`, and a python that
    dropped to uid 65534 itself, hence not dumpable) are reported as refused and never
    signalled."""
    env = _env(tmp_path)
    tree = _watch(spawn, tmp_path, env, "--orphan-grace-seconds", str(ORPHAN_GRACE))
    nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"]
    drop = "import os, time; os.setgid(65534); os.setuid(65534); time.sleep(300)"
    programs = {
        "sleep": ["sleep", "300"],
        "setpriv": ["setpriv", *nobody, "sleep", "300"],
        "setuid": [sys.executable, "-c", drop],
    }
    # GIVEN tasks that started programs of their own, two of them as another user
    procs: dict[str, psutil.Process] = {}
    for name, argv in programs.items():
        client.send_task("orphans.spawn", args=(argv, str(tmp_path / name)), queue=tree.queue)
        procs[name] = psutil.Process(_pid_in(tmp_path / name))
        strays.append(procs[name])
    pids = {name: proc.pid for name, proc in procs.items()}
    wait_until(
        lambda: (
            procs["setuid"].uids().real == 65534 and procs["setpriv"].cmdline() == ["sleep", "300"]
        ),
        what="the programs as uid 65534",
    )
    wait_until(lambda: tree.sampled(list(pids.values()), 2), what="the programs sampled")
    children = tree.children()
    # WHEN the master is killed (its children die with it)
    _kill_master(tree)
    assert psutil.wait_procs(children, timeout=10)[1] == []
    # THEN root's program is reaped, and the others are reported, not touched
    wait_until(
        lambda: (
            not procs["sleep"].is_running()
            and {pids["setpriv"], pids["setuid"]} <= set(tree.incidents("orphan"))
        ),
        timeout=30,
        what="the orphan incidents",
    )
    time.sleep(2 * INTERVAL)  # a sweep or two more: nothing else happens
    tree.warden.send_signal(signal.SIGTERM)
    assert tree.warden.wait(timeout=30) == 0, tree.log.read_text()[-3000:]
    incidents = tree.incidents("orphan")
    assert set(incidents) == set(pids.values())
    assert incidents[pids["sleep"]]["outcome"] in {"terminated", "killed"}
    assert incidents[pids["sleep"]]["reason"].startswith("descendant of worker")
    for name in ("setpriv", "setuid"):
        assert incidents[pids[name]]["outcome"] == "refused"
        assert "belongs to uid 65534" in incidents[pids[name]]["reason"]
        assert procs[name].is_running()
    assert {s[0] for s in tree.signals()} == {pids["sleep"]}


def test_a_task_that_used_200_mib_and_freed_it_trips_nothing(
    spawn: Callable[..., subprocess.Popen[bytes]],
    client: Celery,
    tmp_path: Path,
) -> None:
    """D19. memory.child_hard_mib = 150; a task allocates and touches 200 MiB, frees it
    and returns. The child's current RSS is back at its baseline (+-10 MiB) by the
    second sample after the task, no incident is written and no signal sent, while the
    sampler's peak (VmHWM, `samples.rss_peak_bytes`) shows the 200 MiB.

    The sampler reads the peak only with smaps_rollup: when RSS moved by 5 % since the
    last read, else every smaps_max_age_seconds (30 s). A spike between two sweeps
    leaves RSS where it was, so a second task keeping 16 MiB moves it, and the next
    sample reads the peak, instead of waiting up to 30 s."""
    tree = _run(spawn, tmp_path, _env(tmp_path), "--child-hard-mib", "150", concurrency=1)
    (child,) = tree.children()

    def samples_after(t: float) -> list[tuple[Any, ...]]:
        return query(
            tree.store,
            "SELECT s.rss_bytes, s.rss_peak_bytes FROM samples s JOIN processes p"
            " ON p.id = s.process_id WHERE p.pid = ? AND s.t > ? ORDER BY s.t",
            child.pid,
            t,
        )

    baseline = int(samples_after(0)[-1][0])
    task_id = str(uuid.uuid4())
    client.send_task("guard.alloc_mib", args=(200, False), task_id=task_id, queue=tree.queue)
    ended = wait_until(
        lambda: query(
            tree.store,
            "SELECT ended_at, state FROM tasks WHERE task_id = ? AND ended_at IS NOT NULL",
            task_id,
        ),
        what="the task's end",
    )
    assert isinstance(ended, list)
    assert ended[0][1] == "success"
    after = wait_until(lambda: samples_after(ended[0][0])[3:], what="4 samples after the task")
    assert isinstance(after, list)
    rss = [int(row[0]) for row in samples_after(ended[0][0])]
    assert abs(rss[1] - baseline) <= 10 * _MIB, (baseline, rss)
    assert query(tree.store, "SELECT kind, reason FROM incidents WHERE kind LIKE 'memory%'") == []
    assert tree.signals() == []
    # AND the peak shows the 200 MiB once the sampler reads it again
    client.send_task("guard.alloc_mib", args=(16, True), queue=tree.queue)
    peak = wait_until(
        lambda: max(int(row[1] or 0) for row in samples_after(0)) >= 200 * _MIB,
        what="the 200 MiB peak",
    )
    assert peak
    assert query(tree.store, "SELECT kind, reason FROM incidents WHERE kind LIKE 'memory%'") == []
    assert tree.signals() == []
    assert child.is_running()
    tree.warden.send_signal(signal.SIGTERM)
    assert tree.warden.wait(timeout=30) == 0


def test_pages_shared_with_the_master_never_count_against_a_child(
    spawn: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """D20. The master touches 300 MiB before it forks 4 children, which share them
    copy-on-write: each child's RSS is over 300 MiB but its USS under 10 % of it, and
    memory.child_hard_mib = 100 (on USS) never fires, however many sweeps go by."""
    tree = _run(
        spawn,
        tmp_path,
        _env(tmp_path, CW_MASTER_MIB="300"),
        "--child-hard-mib",
        "100",
        concurrency=4,
    )
    children = [c.pid for c in tree.children()]
    wait_until(lambda: tree.sampled(children, 4), what="4 samples of each child")
    for pid in children:
        rss, uss = query(
            tree.store,
            "SELECT s.rss_bytes, s.uss_bytes FROM samples s JOIN processes p"
            " ON p.id = s.process_id WHERE p.pid = ? AND s.uss_bytes IS NOT NULL"
            " ORDER BY s.t DESC LIMIT 1",
            pid,
        )[0]
        assert int(rss) >= 300 * _MIB  # type: ignore[call-overload]
        assert int(uss) < 0.1 * int(rss)  # type: ignore[call-overload]
    assert query(tree.store, "SELECT kind, reason FROM incidents WHERE kind LIKE 'memory%'") == []
    assert tree.signals() == []
    tree.warden.send_signal(signal.SIGTERM)
    assert tree.warden.wait(timeout=30) == 0
