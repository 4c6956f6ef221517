"""The guard's decisions on a hand-made view and clock (dry run: nothing is sent), with
real processes behind the handles: hang thresholds from history and time limits, a
wall clock stepped by an hour (I39), heartbeat silence, debounce, poison, orphans."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from celery_warden import _procs
from celery_warden._records import (
    Incident,
    ProcessInfo,
    Role,
    RunningTask,
    Sample,
    TaskFinished,
    TaskState,
)
from celery_warden.guard import Guard, GuardConfig, GuardView
from celery_warden.guard._config import HangPolicy, MemoryPolicy, OrphanPolicy

MIB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _python_sleeping() -> subprocess.Popen[bytes]:
    """A Python process past its start-up (its memory is its own by then)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; print(flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()
    return proc


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = _python_sleeping()
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _info(proc: subprocess.Popen[bytes], role: Role = Role.CHILD, master: int = 1) -> ProcessInfo:
    ticks = _procs.read_stat(proc.pid).start_ticks
    return ProcessInfo(proc.pid, ticks, master, role, time.time(), "python", master)


class World:
    """A view the test edits between ticks, and the handles of real processes."""

    def __init__(self, config: GuardConfig, clock: Clock, *, act: bool = False) -> None:
        self.tracked: list[ProcessInfo] = []
        self.latest: dict[int, Sample] = {}
        self.running: dict[tuple[int, int], tuple[tuple[RunningTask, ...], float | None]] = {}
        self.guard = Guard(
            replace(config, act=act),
            view=lambda: GuardView(self.tracked, self.latest, self.running, []),
            handle=self.handle,
            store_path=None,
            clock=clock,
        )

    def handle(self, pid: int, ticks: int) -> _procs.ProcessHandle | None:
        for info in self.tracked:
            if (info.pid, info.start_ticks) == (pid, ticks):
                return _procs.open_verified(pid, ticks)
        return None

    def incidents(self) -> list[Incident]:
        self.guard.stop(timeout=5)
        return sorted(self.guard.recorder.incidents.values(), key=lambda i: i.t)


def _hang_config(**hang: object) -> GuardConfig:
    return GuardConfig(hang=replace(HangPolicy(stack="none"), **hang))  # type: ignore[arg-type]


def test_a_name_without_history_waits_for_min_seconds(child: subprocess.Popen[bytes]) -> None:
    clock = Clock()
    world = World(_hang_config(min_seconds=100.0, history_min_seconds=1.0), clock)
    info = _info(child)
    world.tracked = [info]
    task = RunningTask("id-1", "proj.batch", time.time(), None)
    world.running = {(info.pid, info.start_ticks): ((task,), time.time())}
    world.guard.tick()
    clock.now += 99
    world.guard.tick()
    assert world.guard.recorder.incidents == {}
    clock.now += 2
    world.guard.tick()
    [incident] = world.incidents()
    assert (incident.kind, incident.outcome, incident.task_id) == ("hang", "dry-run", "id-1")
    assert "too little history" in incident.reason


def test_history_sets_the_threshold_of_a_known_name(child: subprocess.Popen[bytes]) -> None:
    clock = Clock()
    world = World(_hang_config(min_seconds=1e6, history_min_seconds=5.0, factor=10.0), clock)
    for _ in range(20):
        world.guard.on_task(
            TaskFinished(1, 1, "x", "proj.quick", 0.0, 2.0, TaskState.SUCCESS, None)
        )
    info = _info(child)
    world.tracked = [info]
    task = RunningTask("id-2", "proj.quick", time.time(), None)
    world.running = {(info.pid, info.start_ticks): ((task,), time.time())}
    world.guard.tick()
    clock.now += 19  # under 10 x its p99 of 2 s
    world.guard.tick()
    assert world.guard.recorder.incidents == {}
    clock.now += 2
    world.guard.tick()
    [incident] = world.incidents()
    assert "10 x its p99 of 2 s" in incident.reason


def test_a_wall_clock_jump_makes_nothing_hung(
    child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runtimes and silences are monotonic: stepping the wall clock an hour ahead after
    the task was first seen changes nothing."""
    clock = Clock()
    world = World(_hang_config(min_seconds=600.0, stalled_seconds=60.0), clock)
    info = _info(child)
    world.tracked = [info]
    beat = time.time()
    task = RunningTask("id-3", "proj.task", beat, None)
    world.running = {(info.pid, info.start_ticks): ((task,), beat)}
    world.guard.tick()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    clock.now += 5
    world.running = {(info.pid, info.start_ticks): ((task,), beat + 5)}  # beats go on
    world.guard.tick()
    assert world.incidents() == []


def test_heartbeat_silence_with_a_task_running_is_a_hang(child: subprocess.Popen[bytes]) -> None:
    clock = Clock()
    world = World(_hang_config(min_seconds=1e6, stalled_seconds=30.0), clock)
    info = _info(child)
    world.tracked = [info]
    task = RunningTask("id-4", "proj.c_call", time.time(), None)
    world.running = {(info.pid, info.start_ticks): ((task,), 5.0)}
    world.guard.tick()
    clock.now += 29
    world.guard.tick()
    assert world.guard.recorder.incidents == {}
    clock.now += 2  # the same beat for 31 s
    world.guard.tick()
    [incident] = world.incidents()
    assert "no heartbeat for 31 s" in incident.reason


def _sample(info: ProcessInfo, t: float, rss_mib: float) -> Sample:
    return Sample(info.pid, info.start_ticks, t, "sleeping", int(rss_mib * MIB), 0.0, 0.0, 1)


def test_one_spike_does_not_trip_the_hard_threshold(child: subprocess.Popen[bytes]) -> None:
    """RSS bounds USS from above: readings under the threshold cost no smaps read, and
    two readings in a row over it are needed (sustain_samples = 2)."""
    clock = Clock()
    config = GuardConfig(memory=MemoryPolicy(child_hard_mib=1.0, sustain_samples=2))
    world = World(config, clock)
    info = _info(child)
    world.tracked = [info]
    for t, rss in ((1.0, 0.5), (2.0, 500.0), (3.0, 0.5), (4.0, 500.0)):
        world.latest = {info.pid: _sample(info, t, rss)}
        world.guard.tick()
    assert world.guard.recorder.incidents == {}  # never two readings in a row over it
    world.latest = {info.pid: _sample(info, 5.0, 500.0)}
    world.guard.tick()
    [incident] = world.incidents()
    assert incident.kind == "memory-hard"
    assert incident.numbers["uss_mib"] > 1.0  # the child's real USS, read through smaps


def test_orphans_wait_for_their_grace_and_zombies_never_count(
    child: subprocess.Popen[bytes],
) -> None:
    clock = Clock()
    world = World(GuardConfig(orphans=OrphanPolicy(grace_seconds=10.0)), clock)
    master = _python_sleeping()
    try:
        master_info = _info(master, Role.MASTER, master=master.pid)
        info = replace(_info(child), master_pid=master.pid)
        world.tracked = [master_info, info]
        world.guard.tick()
        world.tracked = [info]  # the master is gone
        world.guard.tick()
        clock.now += 9
        world.guard.tick()
        assert world.guard.recorder.incidents == {}
        world.latest = {info.pid: _sample(info, 1.0, 10.0)._replace(state="zombie")}
        clock.now += 5
        world.guard.tick()
        assert world.guard.recorder.incidents == {}  # a zombie is not a target
        world.latest = {}
        world.guard.tick()
        [incident] = world.incidents()
        assert (incident.kind, incident.pid, incident.outcome) == ("orphan", child.pid, "dry-run")
    finally:
        master.kill()
        master.wait()


def test_a_dry_run_records_each_decision_once_and_none_hides_another(
    child: subprocess.Popen[bytes],
) -> None:
    """A hung task in a child over the hard threshold: both decisions recorded, once each,
    however many sweeps see them."""
    clock = Clock()
    config = GuardConfig(
        memory=MemoryPolicy(child_hard_mib=1.0, sustain_samples=1),
        hang=HangPolicy(stack="none", min_seconds=10.0),
    )
    world = World(config, clock)
    info = _info(child)
    world.tracked = [info]
    task = RunningTask("id-5", "proj.slow", time.time(), None)
    world.running = {(info.pid, info.start_ticks): ((task,), time.time())}
    for step in range(5):
        clock.now += 20
        world.latest = {info.pid: _sample(info, float(step), 500.0)}
        world.guard.tick()
    assert sorted(str(i.kind) for i in world.incidents()) == ["hang", "memory-hard"]


def test_a_soft_recycle_that_cannot_be_asked_backs_off_and_costs_no_budget(
    child: subprocess.Popen[bytes],
) -> None:
    """No probe in that child: asked again only after 2 s, then 4 s (not at every
    sweep), and the worker's hourly budget is left for the hard recycles."""
    clock = Clock()
    config = GuardConfig(memory=MemoryPolicy(child_soft_mib=1.0, sustain_samples=1))
    world = World(config, clock, act=True)
    info = _info(child)
    world.tracked = [info]
    for step in range(6):  # at 1001 (then not before 1003), 1003 (then 1007)
        clock.now += 1
        world.latest = {info.pid: _sample(info, float(step), 500.0)}
        world.guard.tick()
        time.sleep(0.2)  # the ask runs on a thread of its own
    incidents = world.incidents()
    assert [(i.kind, i.outcome) for i in incidents] == [("memory-soft", "refused")] * 2
    assert "probe" in str(incidents[0].numbers["outcome_detail"])
    assert child.poll() is None  # nothing was sent
    budget = world.guard._budgets[info.master_pid]
    assert not budget.started
    assert not budget.soft_in_flight
