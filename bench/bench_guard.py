"""Guard: detection to action. How long after a child crosses a line the warden acts.

Real prefork workers on Redis (``bench/_guard_app.py``, each on a queue of its own),
run as a user runs them, with the sweep interval at its default (1 s) and at 0.5 s:

1. **memory**: ``celery-warden run --child-hard-mib L -- celery ... worker -c 2``. A task
   touches private memory page by page, marks the moment its USS (read from
   ``/proc/self/smaps_rollup``, as the warden reads it) crosses L, goes 32 MiB further
   and holds it all for 10 s. Measured: the crossing to the SIGTERM row in ``signals``
   (``t``: when it was sent), to the incident's ``t`` (decided), and to the child's
   exit (a pidfd polled here). Bound: sweep interval x ``memory.sustain_samples``
   readings, plus the guard's own ``smaps_rollup`` read (timed here on the child).
2. **hang**: ``run --hang-min-seconds H``; a task marks its start and waits forever.
   The threshold is the task's start (the probe's ``started_at``, what the guard counts
   from) + H. Measured: to the start of the guard's ``py-spy dump`` (the decision; a
   shim on the warden's PATH logs when py-spy starts and ends, then runs the real one),
   the dump's own time, the incident stored with its stack (``t``, and the moment a
   read-only connection polling every 10 ms first sees it), and the SIGTERM row.
3. **orphans**: plain ``celery ... worker -c 1`` workers whose task spawned ``sleep
   300``, watched by one ``celery-warden watch --act --pid M ... --orphan-grace-seconds
   G``; each master in turn is killed with SIGKILL (and reaped at once, as its parent
   would). Measured: the kill to the sleep's death (a pidfd), minus G.

Side by side, in the same run: Celery's ``--max-memory-per-child`` (the same task,
crossing measured on RSS, which ``ru_maxrss`` follows; its runs at once, one a child of
a ``-c RUNS`` worker): the crossing to the child's exit, which comes only after the task
ends. A cron job running ``ps`` and ``kill``
every 60 s is stated analytically: 30 s on average (interval / 2), up to 60 s.

Each figure is the median, min and max over ``--runs`` runs; a random delay of up to
one interval before each run spreads its phase against the sweeps.

Prints the table docs/benchmarks.md records and, per measurement, whether every run
acted within the bound its sweeps set (exit 1 if the guard did not act in some run).

Run: ``python bench/bench_guard.py`` (about 4 minutes; ``--help`` for the options).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
from celery import Celery

from _util import describe_machine, load_average, print_table
from celery_warden import _procs
from celery_warden.guard._config import GuardConfig
from celery_warden.guard._stacks import find_py_spy

HERE = Path(__file__).resolve().parent
BROKER = os.environ.get("WARDEN_TEST_BROKER", "redis://127.0.0.1:6379/13")
DEFAULTS = GuardConfig()
SUSTAIN = DEFAULTS.memory.sustain_samples
MIN_INTERVAL = DEFAULTS.recycle.min_interval_seconds  # between two hard recycles of a worker
CRON_SECONDS = 60.0
GRACE_SECONDS = 5.0  # recycle.grace_seconds here: TERM to KILL

Run = dict[str, Any]


# -- processes ---------------------------------------------------------------------------


QUEUES: list[str] = []  # every queue made, for their keys to be removed at the end


def new_queue() -> str:
    """A queue of its own for one worker (tasks of concurrent runs never mix)."""
    QUEUES.append(f"bench-guard-{uuid.uuid4().hex[:8]}")
    return QUEUES[-1]


def forget_queues() -> None:
    """Remove what kombu left in Redis for our queues (their bindings, any message)."""
    import redis

    client = redis.Redis.from_url(BROKER)
    try:
        for queue in QUEUES:
            client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        pidbox = "_kombu.binding.celery.pidbox"  # each worker's node name, queue@host
        ours = [m for m in client.smembers(pidbox) if any(f"{q}@".encode() in m for q in QUEUES)]
        if ours:
            client.srem(pidbox, *ours)
    finally:
        client.close()


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["WARDEN_TEST_BROKER"] = BROKER
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    return env


def celery_argv(queue: str, concurrency: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "_guard_app", "worker", "--pool", "prefork",
        "-c", str(concurrency), "-Q", queue, "-n", f"{queue}@%h", "-l", "info",
        "--without-gossip", "--without-mingle", "--without-heartbeat", *extra,
    ]  # fmt: skip


def warden_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery_warden", *args]


def _end(proc: subprocess.Popen[bytes], wait: float) -> None:
    """SIGTERM (the warden forwards it to its worker's master), then SIGKILL to whatever
    of the tree is left: psutil refuses a PID that names another process by now."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    for member in family:
        with contextlib.suppress(psutil.Error):
            member.kill()
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@contextlib.contextmanager
def started(
    argv: Sequence[str], log: Path, env: dict[str, str], stop_wait: float = 20.0
) -> Iterator[subprocess.Popen[bytes]]:
    """A process of its own session, its output to ``log``; ended on exit."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        _end(proc, stop_wait)


class Exit:
    """When a process (not necessarily ours) exits, by wall clock: a thread waits on its
    pidfd from the start, so the time is the exit's whenever the caller asks."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.at: float | None = None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._thread = None  # gone already: no time for it
            return
        self._thread = threading.Thread(target=self._wait, args=(fd,), daemon=True)
        self._thread.start()

    def _wait(self, fd: int) -> None:
        try:
            select.select([fd], [], [])
            self.at = time.time()
        finally:
            os.close(fd)

    def wait(self, timeout: float) -> float | None:
        """The exit's time, waiting up to ``timeout`` seconds for it (None: not yet)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.at


# -- what the tasks and the warden wrote -----------------------------------------------------


class Marks:
    """The JSON lines the tasks of ``_guard_app`` append."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> Run:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.all() if match(m)]
            if found:
                return found[0]
            time.sleep(0.005)
        raise TimeoutError(f"no mark for {what} within {timeout:g} s")


def tagged(tag: str, kind: str | None = None) -> Callable[[dict[str, Any]], bool]:
    """Matches the marks of one run (of one kind)."""

    def match(mark: dict[str, Any]) -> bool:
        return mark.get("tag") == tag and (kind is None or mark["kind"] == kind)

    return match


class Db:
    """The warden's store, read as `report` reads it: read-only, beside the writer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        if self._conn is None:
            if not self.path.exists():
                return []
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError:
            return []  # the schema is not there yet

    def first(self, sql: str, *params: object, timeout: float = 5.0, poll: float = 0.05) -> Any:
        """The first column of the first row, once there is one (None after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.rows(sql, *params)
            if found and found[0][0] is not None:
                return found[0][0]
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll)

    def term(self, pid: int, after: float) -> float | None:
        return self.first(  # type: ignore[no-any-return]
            "SELECT min(t) FROM signals WHERE pid = ? AND signal = 'SIGTERM' "
            "AND result = 'sent' AND t >= ?",
            pid,
            after,
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def wait_ready(client: Celery, queue: str, marks: Marks, proc: subprocess.Popen[bytes]) -> None:
    """Until a task has run in the worker (it is up and consuming)."""
    client.send_task("bench_guard.ready", args=(str(marks.path),), queue=queue)
    deadline = time.monotonic() + 90
    while not any(m["kind"] == "ready" for m in marks.all()):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not start within 90 s")
        time.sleep(0.02)


def smaps_ms(pid: int, times: int = 5) -> float | None:
    """What one ``smaps_rollup`` read of ``pid`` costs (the guard reads it once a tick)."""
    spent = []
    for _ in range(times):
        started_at = time.perf_counter()
        try:
            _procs.read_smaps(pid)
        except (_procs.Vanished, PermissionError):
            return None
        spent.append(time.perf_counter() - started_at)
    return statistics.median(spent) * 1000


# -- 1. memory over the hard threshold ---------------------------------------------------------


def measure_memory(
    tmp: Path, client: Celery, interval: float, args: argparse.Namespace, rng: random.Random
) -> list[Run]:
    name = f"memory-{interval:g}"
    queue = new_queue()
    marks, db = Marks(tmp / f"{name}.marks"), Db(tmp / f"{name}.db")
    argv = warden_argv(
        "run", "--store", str(db.path), "--interval", f"{interval:g}", "--no-auto-diagnose",
        "--child-hard-mib", f"{args.limit_mib:g}",
        "--recycle-grace-seconds", f"{GRACE_SECONDS:g}", "--", *celery_argv(queue, 2),
    )  # fmt: skip
    runs: list[Run] = []
    with started(argv, tmp / f"{name}.log", worker_env()) as proc:
        wait_ready(client, queue, marks, proc)
        time.sleep(2 * interval + 0.5)  # the warden has adopted both children
        for i in range(args.runs):
            time.sleep(rng.uniform(0, interval))
            tag = f"m{i}"
            client.send_task(
                "bench_guard.alloc_hold",
                args=(str(marks.path), tag, args.limit_mib, "uss", 32, args.hold),
                queue=queue,
            )
            mark = marks.wait(tagged(tag), 60, f"run {tag}")
            pid, cross = mark["pid"], mark["cross"]
            exit_ = Exit(pid)
            read_ms = smaps_ms(pid)
            exited = exit_.wait(args.hold + 20)
            term = db.term(pid, mark["start"])
            decided = db.first(
                "SELECT min(t) FROM incidents WHERE pid = ? AND kind = 'memory-hard'", pid
            )
            run: Run = {
                "term": term - cross if term else None,
                "decided": decided - cross if decided else None,
                "exit": exited - cross if exited else None,
                "smaps_ms": read_ms,
                "uss_mib": mark["after_mib"],
            }
            runs.append(run)
            print(f"  memory {interval:g} s, run {i + 1}: {_fmt_run(run)}", flush=True)
            # The next hard recycle of this worker waits min_interval after this one.
            resume = (term or time.time()) + MIN_INTERVAL + 0.5
            time.sleep(max(0.0, resume - time.time()))
    db.close()
    return runs


# -- comparison: Celery's --max-memory-per-child --------------------------------------------------


def measure_celery(tmp: Path, client: Celery, args: argparse.Namespace) -> list[Run]:
    """All runs at once, one a child: each child's task ends after ``hold`` s anyway."""
    queue = new_queue()
    marks = Marks(tmp / "celery.marks")
    limit_kib = str(int(args.limit_mib * 1024))
    argv = celery_argv(queue, args.runs, "--max-memory-per-child", limit_kib)
    runs: list[Run] = []
    with started(argv, tmp / "celery.log", worker_env()) as proc:
        wait_ready(client, queue, marks, proc)
        for i in range(args.runs):
            client.send_task(
                "bench_guard.alloc_hold",
                args=(str(marks.path), f"c{i}", args.limit_mib, "rss", 32, args.hold),
                queue=queue,
            )
        found: dict[str, tuple[Run, Exit]] = {}
        deadline = time.monotonic() + 60
        while len(found) < args.runs and time.monotonic() < deadline:
            for m in marks.all():
                if m["kind"] == "alloc" and m["tag"] not in found:
                    found[m["tag"]] = (m, Exit(m["pid"]))
            time.sleep(0.005)
        for tag, (mark, exit_) in sorted(found.items()):
            exited = exit_.wait(args.hold + 30)
            done = marks.wait(
                tagged(tag, "alloc-done"),
                5,
                f"the end of {tag}",
            )["t"]
            run: Run = {
                "exit": exited - mark["cross"] if exited else None,
                "after_task": exited - done if exited else None,
                "rss_mib": mark["after_mib"],
            }
            runs.append(run)
            print(f"  celery --max-memory-per-child, {tag}: {_fmt_run(run)}", flush=True)
    return runs


# -- 2. hang threshold --------------------------------------------------------------------------


def py_spy_shim(directory: Path, log: Path) -> Path:
    """A ``py-spy`` first on PATH that logs when each dump starts and ends (bash's
    $EPOCHREALTIME: no fork), then runs the real one."""
    real = find_py_spy()
    if real is None:
        raise RuntimeError("py-spy is not installed (pip install 'celery-warden[stacks]')")
    directory.mkdir()
    shim = directory / "py-spy"
    shim.write_text(
        "#!/bin/bash\n"
        f'echo "start $EPOCHREALTIME $*" >> {log}\n'
        f'{real} "$@"\n'
        "rc=$?\n"
        f'echo "end $EPOCHREALTIME $*" >> {log}\n'
        "exit $rc\n"
    )
    shim.chmod(0o700)
    return directory


def spy_times(log: Path, pid: int) -> tuple[float | None, float | None]:
    """When the py-spy dump of ``pid`` started and ended, by the shim's log."""
    start = end = None
    with contextlib.suppress(FileNotFoundError):
        for line in log.read_text().splitlines():
            what, t, *argv = line.split()
            if "--pid" in argv and argv[argv.index("--pid") + 1] == str(pid):
                if what == "start" and start is None:
                    start = float(t)
                elif what == "end" and end is None:
                    end = float(t)
    return start, end


def measure_hang(
    tmp: Path, client: Celery, interval: float, args: argparse.Namespace, rng: random.Random
) -> list[Run]:
    name = f"hang-{interval:g}"
    queue = new_queue()
    marks, db = Marks(tmp / f"{name}.marks"), Db(tmp / f"{name}.db")
    spy_log = tmp / f"{name}.py-spy.log"
    env = worker_env()
    env["PATH"] = os.pathsep.join([str(py_spy_shim(tmp / f"{name}-bin", spy_log)), env["PATH"]])
    argv = warden_argv(
        "run", "--store", str(db.path), "--interval", f"{interval:g}", "--no-auto-diagnose",
        "--hang-min-seconds", f"{args.hang_seconds:g}",
        "--recycle-grace-seconds", f"{GRACE_SECONDS:g}", "--", *celery_argv(queue, 2),
    )  # fmt: skip
    runs: list[Run] = []
    with started(argv, tmp / f"{name}.log", env) as proc:
        wait_ready(client, queue, marks, proc)
        time.sleep(2 * interval + 0.5)
        for i in range(args.runs):
            time.sleep(rng.uniform(0, interval))
            tag = f"h{i}"
            task_id = client.send_task(
                "bench_guard.hang", args=(str(marks.path), tag), queue=queue
            ).id
            mark = marks.wait(tagged(tag), 60, f"run {tag}")
            pid = mark["pid"]
            exit_ = Exit(pid)
            seen = incident = stack = None
            deadline = time.monotonic() + args.hang_seconds + 20
            while time.monotonic() < deadline:
                found = db.rows(
                    "SELECT t, stack FROM incidents WHERE pid = ? AND kind = 'hang' "
                    "AND stack IS NOT NULL",
                    pid,
                )
                if found:
                    seen, (incident, stack) = time.time(), found[0]
                    break
                time.sleep(0.01)
            exited = exit_.wait(GRACE_SECONDS + 10)
            # What the guard counts from: the probe's start of the call.
            started_at = db.first("SELECT started_at FROM tasks WHERE task_id = ?", task_id)
            threshold = (started_at or mark["start"]) + args.hang_seconds
            term = db.term(pid, mark["start"])
            spy_start, spy_end = spy_times(spy_log, pid)
            run: Run = {
                "decided": spy_start - threshold if spy_start else None,
                "py_spy": spy_end - spy_start if spy_start and spy_end else None,
                "stored": incident - threshold if incident else None,
                "seen": seen - threshold if seen else None,
                "term": term - threshold if term else None,
                "exit_after_term": exited - term if exited and term else None,
                "stack_ok": bool(stack) and "_guard_app.py" in str(stack),
                "body_lag_ms": (mark["start"] - started_at) * 1000 if started_at else None,
            }
            runs.append(run)
            print(f"  hang {interval:g} s, run {i + 1}: {_fmt_run(run)}", flush=True)
            resume = (term or time.time()) + MIN_INTERVAL + 0.5
            time.sleep(max(0.0, resume - time.time()))
    db.close()
    return runs


# -- 3. orphans ---------------------------------------------------------------------------------


def measure_orphans(
    tmp: Path, client: Celery, interval: float, args: argparse.Namespace, rng: random.Random
) -> tuple[list[Run], str]:
    """``--runs`` workers under one ``watch``; their masters killed one after the other."""
    name = f"orphans-{interval:g}"
    marks, db = Marks(tmp / f"{name}.marks"), Db(tmp / f"{name}.db")
    grace = args.orphan_grace
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        workers: dict[int, subprocess.Popen[bytes]] = {}
        for k in range(args.runs):
            queue = new_queue()
            proc = stack.enter_context(
                started(celery_argv(queue, 1), tmp / f"{name}-worker{k}.log", worker_env(), 5)
            )
            workers[proc.pid] = proc
            client.send_task("bench_guard.spawn_sleep", args=(str(marks.path), 300), queue=queue)
        deadline = time.monotonic() + 120
        while len(marks.all()) < args.runs:
            if time.monotonic() > deadline:
                raise TimeoutError("the workers did not spawn their sleeps within 120 s")
            time.sleep(0.05)
        trees = []  # (master, pool child, sleep)
        for mark in marks.all():
            trees.append((psutil.Process(mark["pid"]).ppid(), mark["pid"], mark["sleep_pid"]))
        for _, _, sleep_pid in trees:  # a stray `sleep` of ours is killed on any exit
            stack.callback(_kill_if, sleep_pid, "sleep")
        pids = [arg for master, _, _ in trees for arg in ("--pid", str(master))]
        argv = warden_argv(
            "watch", "--act", *pids, "--interval", f"{interval:g}",
            "--orphan-grace-seconds", f"{grace:g}", "--store", str(db.path),
        )  # fmt: skip
        watch = stack.enter_context(started(argv, tmp / f"{name}.log", worker_env()))
        sleeps = {s for _, _, s in trees}
        deadline = time.monotonic() + 30
        while not sleeps <= {pid for (pid,) in db.rows("SELECT pid FROM processes")}:
            if time.monotonic() > deadline:
                raise TimeoutError("the warden did not adopt every sleep within 30 s")
            time.sleep(0.05)
        time.sleep(2 * interval)
        for i, (master, child, sleep_pid) in enumerate(trees):
            time.sleep(rng.uniform(0, interval) + 0.5)
            sleep_exit, child_exit = Exit(sleep_pid), Exit(child)
            killed = time.time()
            os.kill(master, signal.SIGKILL)
            workers[master].wait()  # reaped at once, as a process manager would
            dead = sleep_exit.wait(grace + 4 * interval + 10)
            child_dead = child_exit.wait(5)
            term = db.term(sleep_pid, killed)
            decided = db.first(
                "SELECT min(t) FROM incidents WHERE pid = ? AND kind = 'orphan'", sleep_pid
            )
            # How long the guard had counted it orphaned when it acted (G, or G + a sweep).
            counted = db.first(
                "SELECT json_extract(numbers, '$.orphaned_seconds') FROM incidents "
                "WHERE pid = ? AND kind = 'orphan'",
                sleep_pid,
            )
            child_term = db.term(child, killed)
            run: Run = {
                "reaped": dead - killed - grace if dead else None,
                "decided": decided - killed - grace if decided else None,
                "term": term - killed - grace if term else None,
                "child_gone": child_dead - killed if child_dead else None,
                "child_by_guard": child_term is not None,
                "counted": counted,
            }
            runs.append(run)
            print(f"  orphans {interval:g} s, run {i + 1}: {_fmt_run(run)}", flush=True)
        try:
            watch.wait(timeout=4 * interval + 5)
            ending = f"watch exited by itself ({watch.returncode})"
        except subprocess.TimeoutExpired:
            ending = "watch was still running after the last tree ended"
    db.close()
    return runs, ending


def _kill_if(pid: int, name: str) -> None:
    with contextlib.suppress(psutil.Error):
        process = psutil.Process(pid)
        if process.name() == name:
            process.kill()


# -- tables -------------------------------------------------------------------------------------


def _fmt_run(run: Run) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in run.items())


def _values(runs: Sequence[Run], key: str) -> list[float]:
    return [r[key] for r in runs if isinstance(r.get(key), int | float)]


def _row(what: str, interval: str, runs: Sequence[Run], key: str, bound: str) -> list[str]:
    values = _values(runs, key)
    missing = len(runs) - len(values)
    count = f"{len(values)}" + (f" ({missing} missed)" if missing else "")
    if not values:
        return [what, interval, "-", "-", "-", count, bound]
    return [
        what,
        interval,
        f"{statistics.median(values):.2f} s",
        f"{min(values):.2f}",
        f"{max(values):.2f}",
        count,
        bound,
    ]


def report(
    args: argparse.Namespace,
    memory: dict[float, list[Run]],
    celery: list[Run],
    hang: dict[float, list[Run]],
    orphans: dict[float, tuple[list[Run], str]],
) -> bool:
    """The table docs/benchmarks.md records, the notes under it and the verdicts; False
    if the guard did not act in some run."""
    rows: list[list[str]] = []
    for interval, runs in memory.items():
        i, lo, hi = f"{interval:g} s", (SUSTAIN - 1) * interval, SUSTAIN * interval
        bound = f"{lo:g}-{hi:g} s + smaps read"
        rows.append(
            _row("memory: USS crosses the hard threshold -> SIGTERM", i, runs, "term", bound)
        )
        rows.append(
            _row(
                "memory: USS crosses the hard threshold -> child exited", i, runs, "exit", "+ exit"
            )
        )
    if celery:
        after = f"task end ({args.hold:g} s here) + exit"
        rows.append(
            _row(
                "Celery --max-memory-per-child: RSS crosses -> child exited",
                "-",
                celery,
                "exit",
                after,
            )
        )
        rows.append(
            _row(
                "Celery --max-memory-per-child: task ends -> child exited",
                "-",
                celery,
                "after_task",
                "-",
            )
        )
        half = f"{CRON_SECONDS / 2:g} s"
        rows.append(
            [
                "cron, ps + kill every 60 s (analytical, not run)",
                "60 s",
                half,
                "0",
                f"{CRON_SECONDS:g}",
                "-",
                "interval / 2",
            ]
        )
    for interval, runs in hang.items():
        i = f"{interval:g} s"
        rows.append(
            _row(
                "hang: threshold -> py-spy dump starts (decided)",
                i,
                runs,
                "decided",
                f"0-{interval:g} s",
            )
        )
        rows.append(_row("hang: py-spy dump's own time", i, runs, "py_spy", "-"))
        rows.append(
            _row("hang: threshold -> incident with stack stored (t)", i, runs, "stored", "+ py-spy")
        )
        rows.append(
            _row(
                "hang: threshold -> that incident seen by a reader", i, runs, "seen", "+ 10 ms poll"
            )
        )
        rows.append(
            _row("hang: threshold -> SIGTERM", i, runs, "term", f"0-{interval:g} s + py-spy")
        )
        rows.append(_row("hang: SIGTERM -> child exited", i, runs, "exit_after_term", "-"))
    for interval, (runs, _ending) in orphans.items():
        i = f"{interval:g} s"
        rows.append(
            _row(
                "orphans: master SIGKILL -> SIGTERM to the orphan, minus G",
                i,
                runs,
                "term",
                f"0-{2 * interval:g} s",
            )
        )
        rows.append(
            _row(
                "orphans: master SIGKILL -> orphan dead, minus G",
                i,
                runs,
                "reaped",
                f"0-{2 * interval:g} s",
            )
        )
        rows.append(_row("orphans: master SIGKILL -> pool child gone", i, runs, "child_gone", "-"))
    print_table(
        f"Detection to action ({args.runs} runs each; child_hard_mib {args.limit_mib:g}, "
        f"sustain_samples {SUSTAIN}; hang.min_seconds {args.hang_seconds:g}; "
        f"orphans.grace_seconds G = {args.orphan_grace:g})",
        ["measurement", "interval", "median", "min", "max", "runs", "expected"],
        rows,
    )
    notes = []
    smaps = [v for runs in memory.values() for v in _values(runs, "smaps_ms")]
    if smaps:
        uss = [v for runs in memory.values() for v in _values(runs, "uss_mib")]
        notes.append(
            f"smaps_rollup read of the child at {statistics.median(uss):.0f} MiB USS: "
            f"{statistics.median(smaps):.2f} ms (median; {min(smaps):.2f}-{max(smaps):.2f})"
        )
    gaps = [
        (r["term"] - r["decided"]) * 1000
        for runs in memory.values()
        for r in runs
        if r["term"] is not None and r["decided"] is not None
    ]
    if gaps:
        notes.append(
            f"memory: incident written -> SIGTERM sent {statistics.median(gaps):.1f} ms (median)"
        )
    for interval, runs in hang.items():
        ok = sum(bool(r["stack_ok"]) for r in runs)
        lag = _values(runs, "body_lag_ms")
        notes.append(
            f"hang {interval:g} s: {ok}/{len(runs)} stacks name the task's line"
            + (
                f"; the task body starts {statistics.median(lag):.1f} ms after the probe's start"
                if lag
                else ""
            )
        )
    for interval, (runs, ending) in orphans.items():
        by_guard = sum(bool(r["child_by_guard"]) for r in runs)
        counted = _values(runs, "counted")
        late = sum(c >= args.orphan_grace + interval / 2 for c in counted)
        notes.append(
            f"orphans {interval:g} s: the guard had counted the orphan "
            f"{', '.join(f'{c:.2f}' for c in counted)} s orphaned when it acted (G = "
            f"{args.orphan_grace:g}): one sweep more than G in {late}/{len(counted)}; the pool "
            f"child got the guard's SIGTERM in {by_guard}/{len(runs)} (else it left by itself); "
            f"{ending}"
        )
    if celery and memory:
        alt = statistics.median(_values(celery, "exit")) if _values(celery, "exit") else None
        for interval, runs in memory.items():
            exits = _values(runs, "exit")
            if exits and alt:
                warden = statistics.median(exits)
                notes.append(
                    f"side by side, {interval:g} s sweeps: a child over the line is gone "
                    f"{warden:.2f} s after crossing it with the warden, {alt:.2f} s with "
                    f"--max-memory-per-child ({alt / warden:.1f}x later; the task held it "
                    f"{args.hold:g} s), {CRON_SECONDS / 2:.0f} s on average with a "
                    f"{CRON_SECONDS:.0f} s cron"
                )
    for note in notes:
        print(note)
    return verdicts(memory, hang, orphans)


SLACK_SECONDS = 0.1  # the smaps read, the incident's write, a thread's start, a signal


def verdicts(
    memory: dict[float, list[Run]],
    hang: dict[float, list[Run]],
    orphans: dict[float, tuple[list[Run], str]],
) -> bool:
    """One line per measurement: did every run act, within the bound its sweeps set?
    (No target was set for these: the bound is the design's.) False if a run missed."""
    checks: list[tuple[str, list[Run], str, float, float]] = []
    for interval, runs in memory.items():
        bound = (SUSTAIN - 1) * interval, SUSTAIN * interval + SLACK_SECONDS
        checks.append((f"memory -> SIGTERM, {interval:g} s sweeps", runs, "term", *bound))
    for interval, runs in hang.items():
        spy = max(_values(runs, "py_spy"), default=0.0)
        bound = 0.0, interval + spy + SLACK_SECONDS
        checks.append((f"hang threshold -> SIGTERM, {interval:g} s sweeps", runs, "term", *bound))
    for interval, (runs, _) in orphans.items():
        bound = 0.0, 2 * interval + SLACK_SECONDS
        checks.append((f"orphans reaped minus G, {interval:g} s sweeps", runs, "reaped", *bound))
    acted = True
    for what, runs, key, low, high in checks:
        values = _values(runs, key)
        inside = sum(low <= v <= high for v in values)
        acted = acted and len(values) == len(runs)
        verdict = "met" if inside == len(runs) else "MISSED"
        print(f"{what}: {inside}/{len(runs)} runs within {low:g}-{high:.2f} s ({verdict})")
    return acted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (>= 5 advised)")
    parser.add_argument(
        "--intervals", default="1,0.5", help="sweep intervals to measure, comma separated"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        choices=("memory", "celery", "hang", "orphans"),
        default=("memory", "celery", "hang", "orphans"),
    )
    parser.add_argument("--limit-mib", type=float, default=120.0, help="child_hard_mib")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds the task holds it")
    parser.add_argument("--hang-seconds", type=float, default=3.0, help="hang.min_seconds")
    parser.add_argument("--orphan-grace", type=float, default=2.0, help="orphans.grace_seconds")
    parser.add_argument("--seed", type=int, default=None, help="for the runs' random phases")
    args = parser.parse_args()
    intervals = [float(x) for x in args.intervals.split(",")]
    rng = random.Random(args.seed)
    print(f"Machine: {describe_machine()}; load {load_average()}", flush=True)
    client = Celery("bench_guard_client", broker=BROKER)
    client.conf.broker_connection_retry_on_startup = True
    began = time.monotonic()
    memory: dict[float, list[Run]] = {}
    hang: dict[float, list[Run]] = {}
    orphans: dict[float, tuple[list[Run], str]] = {}
    celery: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="warden-bench-guard-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            for interval in intervals:
                if "memory" in args.only:
                    memory[interval] = measure_memory(tmp, client, interval, args, rng)
            if "celery" in args.only:
                celery = measure_celery(tmp, client, args)
            for interval in intervals:
                if "hang" in args.only:
                    hang[interval] = measure_hang(tmp, client, interval, args, rng)
            for interval in intervals:
                if "orphans" in args.only:
                    orphans[interval] = measure_orphans(tmp, client, interval, args, rng)
        finally:
            client.close()
            forget_queues()
            if os.environ.get("BENCH_GUARD_KEEP"):
                kept = Path(tempfile.mkdtemp(prefix="warden-bench-guard-kept-"))
                for item in tmp.iterdir():
                    if item.is_file():
                        (kept / item.name).write_bytes(item.read_bytes())
                print(f"logs and stores kept in {kept}")

    acted = report(args, memory, celery, hang, orphans)
    print(f"Load average after: {load_average()}; took {time.monotonic() - began:.0f} s")
    return 0 if acted else 1


if __name__ == "__main__":
    sys.exit(main())
