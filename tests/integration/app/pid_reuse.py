"""PID reuse on demand, for RELIABILITY.md A1 and A2: run it as the init of a fresh user
and PID namespace, where ``/proc/sys/kernel/ns_last_pid`` is writable::

    unshare -Urpf --mount-proc --kill-child python pid_reuse.py a1 --store S --rounds 50

Writing N - 1 to ``ns_last_pid`` makes the next process created in the namespace PID N,
so an impostor takes a dead target's PID at once, usually within the same clock tick
(the same start time as the target). Every mode prints one JSON line; the test asserts
on it. This process is the namespace's init: when it exits, the kernel kills whatever
is left in the namespace, so nothing started here outlives it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import select
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery_warden import _procs
from celery_warden._records import ProcessInfo, Role, RunningTask, Sample
from celery_warden.guard import Guard, GuardView, load_config
from celery_warden.guard.signals import Signaller, Target
from celery_warden.sampler import Sampler

PY = sys.executable
_IMPOSTOR_CODE = "import time\ndef impostor_frame():\n    time.sleep(300)\nimpostor_frame()\n"
# A worker's master as is_worker_argv sees it (`python .../celery -A fake worker`) that
# forks two pool children (same command line); SIGCHLD ignored: the kernel reaps them.
_FAKE_WORKER = """\
import os, signal, sys, time
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
for _ in range(2):
    if os.fork() == 0:
        held = bytearray(8 * 1024 * 1024)
        for i in range(0, len(held), 4096):
            held[i] = 1
        while True:
            time.sleep(60)
while True:
    time.sleep(60)
"""


def _spawn(argv: list[str]) -> int:
    """Start ``argv``; return once its exec is complete (its command line is ``argv``).

    posix_spawn's vfork returns as soon as the exec replaces the memory map, a moment
    before the kernel fills the new command line in.
    """
    pid = os.posix_spawn(argv[0], argv, os.environ)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if _procs.read_cmdline(pid) == argv:
                return pid
        except _procs.Vanished:
            pass
    raise RuntimeError(f"PID {pid} never showed {argv}")


def _reuse(pid: int, argv: list[str]) -> int:
    """Start ``argv`` as the very next process of this namespace, on PID ``pid``.

    A process reaped by the kernel itself (its parent ignores SIGCHLD) leaves /proc a
    moment before its PID number is free again (Linux 6.15+ frees PIDs after dropping
    tasklist_lock): a process started in that moment gets the next free PID instead, and
    is ended, and the reuse tried again.
    """
    for _ in range(100):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        got = os.posix_spawn(argv[0], argv, os.environ)
        if got == pid:
            return got
        _end(got)
        time.sleep(0.001)
    return got


def _execd(pid: int, argv: list[str]) -> None:
    """Wait until ``pid`` runs ``argv`` (the guard then reads the impostor's /proc as
    it would read any settled process)."""
    deadline = time.monotonic() + 10
    while _procs.read_cmdline(pid) != argv and time.monotonic() < deadline:
        time.sleep(0.001)


def _alive(child: int) -> bool:
    """Our child ``child`` is running (not exited, not a zombie waiting for us)."""
    return os.waitpid(child, os.WNOHANG) == (0, 0)


def _end(child: int) -> None:
    os.kill(child, signal.SIGKILL)  # our own unreaped child: its PID cannot be reused
    os.waitpid(child, 0)


def _dup(handle: _procs.ProcessHandle) -> Callable[[int, int], _procs.ProcessHandle | None]:
    """What ``Sampler.handle`` gives the guard: a duplicate of the discovered pidfd for
    the discovered (pid, start_ticks), None for anything else."""

    def handle_of(pid: int, start_ticks: int) -> _procs.ProcessHandle | None:
        if (pid, start_ticks) != (handle.pid, handle.start_ticks):
            return None
        return _procs.ProcessHandle(pid, start_ticks, os.dup(handle.fd))

    return handle_of


class _Views:
    """The hand-made state one guard reads, changed between its ticks."""

    def __init__(self, view: GuardView) -> None:
        self.now = view

    def __call__(self) -> GuardView:
        return self.now


def _guard_action(
    action: str,
    handle: _procs.ProcessHandle,
    master: ProcessInfo,
    store: Path,
    stack: str = "none",
) -> list[Any]:
    """Run one real guard action on the discovered (now dead) target; its incidents as
    ``[kind, outcome, detail, stack]``."""
    pid, ticks = handle.pid, handle.start_ticks
    child = ProcessInfo(pid, ticks, master.pid, Role.CHILD, time.time(), "sleep 300", master.pid)
    over = 1 << 30
    fat = Sample(pid, ticks, time.time(), "sleeping", over, 0.0, 0.0, 1, 3, over, over)
    base: dict[str, object] = {
        "act": True,
        "hang.enabled": False,
        "hang.stack": stack,
        "recycle.grace_seconds": 2.0,
        "recycle.min_interval_seconds": 0.0,
    }
    views = _Views(GuardView([master, child], {}, {}, []))
    if action == "memory-hard":
        base.update({"memory.child_hard_mib": 0.01, "memory.sustain_samples": 1})
        base["memory.hysteresis_mib"] = 0.0
        views.now = GuardView([master, child], {pid: fat}, {}, [])
        ticks_to_run = [views.now]
    elif action == "hang":
        # Two ticks a (fake) second apart: a task is never older than its process, so
        # its runtime is counted from the first tick that sees it.
        base.update({"hang.enabled": True, "hang.min_seconds": 0.5})
        task = RunningTask("task-a1", "guard.wait_forever", time.time(), None)
        views.now = GuardView([master, child], {}, {(pid, ticks): ((task,), time.time())}, [])
        ticks_to_run = [views.now, views.now]
    else:  # orphan: the master is seen in one tick, gone in the next
        base.update({"orphans.action": "kill", "orphans.grace_seconds": 0.001})
        gone = GuardView([child], {}, {}, [])
        ticks_to_run = [views.now, gone, gone]
    clock = itertools.count(1000.0)
    guard = Guard(
        load_config(None, base),
        view=views,
        handle=_dup(handle),
        store_path=store,
        clock=lambda: float(next(clock)),
    )
    try:
        for view in ticks_to_run:
            views.now = view
            guard.tick()
    finally:
        guard.stop(timeout=10)
    return [
        [str(i.kind), str(i.outcome), i.numbers.get("outcome_detail"), i.stack]
        for i in guard.recorder.incidents.values()
    ]


def _signals(store: Path) -> list[list[Any]]:
    if not store.exists():
        return []
    conn = sqlite3.connect(store)
    try:
        rows = conn.execute("SELECT pid, start_ticks, signal, result FROM signals ORDER BY id")
        return [list(row) for row in rows]
    finally:
        conn.close()


def a1(rounds: int, store: Path) -> dict[str, Any]:
    """Discover a target, kill and reap it, give its PID to an impostor, then act."""
    master_pid = _spawn(["/bin/sleep", "600"])  # also keeps PIDs 1 and 2 out of the way
    master_ticks = _procs.read_stat(master_pid).start_ticks
    master = ProcessInfo(
        master_pid, master_ticks, 1, Role.MASTER, time.time(), "fake master", master_pid
    )
    audits: list[Any] = []
    signaller = Signaller(dry_run=False, audit=audits.append)
    out: dict[str, Any] = {
        "rounds": rounds,
        "reused": 0,
        "same_tick": 0,
        "impostor_alive": 0,
        "send_results": [],
        "incidents": [],
    }
    for _ in range(rounds):
        target = _spawn(["/bin/sleep", "300"])
        # Discovery, as Sampler._adopt does it: scan, then open and verify.
        stat = _procs.read_stat(target)
        handle = _procs.open_verified(target, stat.start_ticks, _procs.read_cmdline(target))
        _end(target)
        impostor = _reuse(target, ["/bin/sleep", "301"])
        try:
            out["reused"] += impostor == target
            out["same_tick"] += _procs.read_stat(impostor).start_ticks == stat.start_ticks
            _execd(impostor, ["/bin/sleep", "301"])
            for signum in (signal.SIGTERM, signal.SIGKILL):
                dup = _procs.ProcessHandle(target, stat.start_ticks, os.dup(handle.fd))
                out["send_results"].append(signaller.send(Target(dup, Role.CHILD), signum))
                dup.close()
            for action in ("memory-hard", "orphan", "hang"):
                out["incidents"] += [
                    [action, *i] for i in _guard_action(action, handle, master, store)
                ]
            time.sleep(0.1)
            out["impostor_alive"] += _alive(impostor)
        finally:
            handle.close()
            _end(impostor)
    stored = _signals(store)
    out["audits"] = [[a.pid, a.signal, a.result] for a in audits] + [
        [pid, sig, result] for pid, _ticks, sig, result in stored
    ]
    out["sent"] = sum(1 for a in out["audits"] if a[2] == "sent")
    return out


def a1_stack(store: Path) -> dict[str, Any]:
    """A hung child's stack is captured before the kill: never from an impostor."""
    _spawn(["/bin/sleep", "600"])  # PID 2 is never a target
    master_pid = _spawn(["/bin/sleep", "600"])
    master_ticks = _procs.read_stat(master_pid).start_ticks
    master = ProcessInfo(
        master_pid, master_ticks, 1, Role.MASTER, time.time(), "fake master", master_pid
    )
    target = _spawn([PY, "-c", "import time; time.sleep(300)"])
    stat = _procs.read_stat(target)
    handle = _procs.open_verified(target, stat.start_ticks, _procs.read_cmdline(target))
    _end(target)
    impostor = _reuse(target, [PY, "-c", _IMPOSTOR_CODE])
    try:
        time.sleep(0.5)  # let the impostor reach impostor_frame()
        incidents = _guard_action("hang", handle, master, store, stack="py-spy")
        time.sleep(0.1)
        alive = _alive(impostor)
    finally:
        handle.close()
        _end(impostor)
    return {
        "reused": impostor == target,
        "incidents": incidents,
        "impostor_alive": alive,
        "audits": [[pid, sig, result] for pid, _t, sig, result in _signals(store)],
    }


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def a2(store: Path) -> dict[str, Any]:
    """The sampler's discovery with the PID reused between its scan and its pidfd_open."""
    _spawn(["/bin/sleep", "600"])  # PID 2 is never a target
    folder = Path(tempfile.mkdtemp())
    (folder / "celery").write_text(_FAKE_WORKER)
    master = _spawn([PY, str(folder / "celery"), "-A", "fake", "worker"])
    deadline = time.monotonic() + 10
    children: list[int] = []
    while len(children) < 2 and time.monotonic() < deadline:
        children = sorted(p for p in _procs.list_pids() if _ppid(p) == master)
    target, bystander = children
    warnings = _Warnings()
    logging.getLogger("celery_warden").addHandler(warnings)
    gap: dict[str, Any] = {}

    def before_open(pid: int) -> None:
        """Kill the target in the gap, and start the impostor on its PID."""
        if pid != target or gap:
            return
        fd = os.pidfd_open(pid)
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        select.select([fd], [], [], 10)
        os.close(fd)
        while os.path.exists(f"/proc/{pid}"):  # its master reaps it (SIGCHLD ignored)
            time.sleep(0.001)
        gap["impostor"] = _reuse(pid, ["/bin/sleep", "301"])

    _procs.before_open = before_open
    sampler = Sampler()
    sampler.add_anchor(master)
    latest: dict[int, Sample] = {}
    adopted: list[list[Any]] = []

    def view() -> GuardView:
        return GuardView(sampler.tracked, dict(latest), {}, [])

    config = {
        "act": True,
        "hang.enabled": False,
        "memory.child_hard_mib": 1.0,
        "memory.sustain_samples": 1,
        "memory.hysteresis_mib": 0.0,
        "recycle.grace_seconds": 2.0,
        "recycle.min_interval_seconds": 0.0,
        "recycle.min_serving": 0,
    }
    guard = Guard(load_config(None, config), view=view, handle=sampler.handle, store_path=store)
    try:
        for _ in range(10):
            for record in sampler.sweep():
                if isinstance(record, ProcessInfo):
                    adopted.append([record.pid, record.start_ticks, str(record.role)])
                elif isinstance(record, Sample):
                    latest[record.pid] = record
            guard.tick()
            time.sleep(0.1)
    finally:
        guard.stop(timeout=10)
        _procs.before_open = None
    impostor = gap.get("impostor", -1)
    out = {
        "master": master,
        "target": target,
        "bystander": bystander,
        "impostor": impostor,
        "adopted": adopted,
        "tracked": [i.pid for i in sampler.tracked],
        "warnings": warnings.lines,
        "signals": _signals(store),
        "impostor_alive": impostor > 0 and _alive(impostor),
    }
    if impostor > 0:
        _end(impostor)
    return out


def _ppid(pid: int) -> int:
    try:
        return _procs.read_stat(pid).ppid
    except _procs.Vanished:
        return -1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["a1", "a1-stack", "a2"])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    if os.getpid() != 1:
        raise SystemExit("run me as the init of a new PID namespace (unshare -Urpf)")
    if args.mode == "a1":
        result = a1(args.rounds, args.store)
    elif args.mode == "a1-stack":
        result = a1_stack(args.store)
    else:
        result = a2(args.store)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
