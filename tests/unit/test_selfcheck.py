"""The startup self-check (RELIABILITY.md, tests 9, 24 and 40): Celery settings, the
process manager and ptrace, against fixtures for each combination, plus a real ptrace
matrix run as another user with and without CAP_SYS_PTRACE."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from celery_warden.guard import selfcheck
from celery_warden.guard._stacks import find_py_spy
from celery_warden.guard.selfcheck import (
    Finding,
    check_process_manager,
    check_ptrace,
    check_settings,
    predict_redelivery_seconds,
)

NOBODY = 65534
ALL_CAPS = "000001ffffffffff"
NO_PTRACE = f"{int(ALL_CAPS, 16) & ~(1 << 19):016x}"  # Docker's default bounding set lacks it
AMBIENT_PTRACE = f"{1 << 19:016x}"
WORKER = 4242


def keys(findings: Sequence[Finding]) -> dict[str, str]:
    return {f.key: f.severity for f in findings}


# ---------------------------------------------------------------------------------------
# Settings


def test_nothing_set_only_says_there_is_no_time_limit() -> None:
    """Celery's defaults raise only the missing time limit, as info."""
    assert keys(check_settings({})) == {"no-time-limit": "info"}


def test_none_values_are_unset() -> None:
    """Keys the probe sends as None count as unset."""
    settings = dict.fromkeys(
        (
            "task_acks_late",
            "task_reject_on_worker_lost",
            "worker_max_memory_per_child",
            "task_time_limit",
            "broker_transport",
            "visibility_timeout",
            "tasks",
        )
    )
    assert keys(check_settings(settings)) == {"no-time-limit": "info"}


def test_acks_late_without_reject_warns_that_hard_kills_lose_tasks() -> None:
    """acks_late without reject_on_worker_lost warns that hard kills lose tasks (test 9)."""
    [finding] = [
        f for f in check_settings({"task_acks_late": True}) if f.key == "acks-late-without-reject"
    ]
    assert finding.severity == "warning"
    assert "hard kills will lose" in finding.message
    assert "WorkerLostError" in finding.message
    assert "task_reject_on_worker_lost = True" in finding.fix


def test_acks_late_with_reject_is_fine() -> None:
    """acks_late with reject_on_worker_lost and a time limit raise nothing."""
    settings = {"task_acks_late": True, "task_reject_on_worker_lost": True, "task_time_limit": 60}
    assert check_settings(settings) == []


def test_named_tasks_are_listed_five_at_most() -> None:
    """Tasks that are lossy on their own are named, five at most, then counted."""
    tasks = {f"proj.t{i}": {"acks_late": True} for i in range(7)}
    tasks["proj.safe"] = {"acks_late": True, "reject_on_worker_lost": True}
    tasks["proj.early"] = {"time_limit": 5}
    [finding] = [f for f in check_settings({"tasks": tasks}) if f.key == "acks-late-without-reject"]
    assert "proj.t0, proj.t1, proj.t2, proj.t3, proj.t4 and 2 more" in finding.message
    assert "proj.safe" not in finding.message
    assert "proj.early" not in finding.message


def test_a_task_overriding_reject_is_named() -> None:
    """A task turning reject off is named; a task attribute left at None takes the app's."""
    settings = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "tasks": {
            "proj.risky": {"reject_on_worker_lost": False},
            "proj.other": {"acks_late": None},
        },
    }
    [finding] = [f for f in check_settings(settings) if f.key == "acks-late-without-reject"]
    assert "proj.risky" in finding.message
    assert "proj.other" not in finding.message  # None: the app-wide value, which is safe


def test_max_memory_per_child_warns_it_reads_the_peak() -> None:
    """worker_max_memory_per_child warns that it recycles on the peak RSS."""
    [finding] = [
        f
        for f in check_settings({"worker_max_memory_per_child": 204800})
        if f.key == "max-memory-per-child"
    ]
    assert finding.severity == "warning"
    assert "204800 KiB (200 MiB)" in finding.message
    assert "PEAK" in finding.message
    assert "#4125" in finding.message
    assert "unset worker_max_memory_per_child" in finding.fix


@pytest.mark.parametrize("value", [0, None, "200MB", True])
def test_max_memory_per_child_off_or_unreadable_says_nothing(value: object) -> None:
    """A limit of 0, None or a non-number is off, as in billiard."""
    assert "max-memory-per-child" not in keys(
        check_settings({"worker_max_memory_per_child": value})
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, 3600.0),  # kombu's default visibility_timeout
        ({"visibility_timeout": 7200}, 7200.0),
        ({"visibility_timeout": 15}, 100.0),  # the restore sweep: 10 s x 10 (RELIABILITY 5)
        ({"visibility_timeout": 15, "unacked_restore_interval": 2}, 20.0),
        ({"visibility_timeout": 15, "unacked_restore_throttle": 1}, 15.0),
        ({"visibility_timeout": 5, "unacked_restore_throttle": 0}, 10.0),  # 0: every call
        ({"visibility_timeout": 5, "unacked_restore_interval": 0}, 100.0),  # <= 0: default
    ],
)
def test_redelivery_prediction(extra: dict[str, Any], expected: float) -> None:
    """The prediction is max(visibility_timeout, interval x throttle), with kombu's defaults."""
    settings = {"broker_transport": "redis", "task_acks_late": True, **extra}
    assert predict_redelivery_seconds(settings) == expected


@pytest.mark.parametrize("transport", ["redis", "rediss", "sentinel", "Redis"])
def test_every_redis_transport_counts(transport: str) -> None:
    """redis, rediss and sentinel are all kombu's Redis transport."""
    assert predict_redelivery_seconds({"broker_transport": transport, "task_acks_late": True})


@pytest.mark.parametrize(
    "settings",
    [
        {"broker_transport": "amqp", "task_acks_late": True},
        {"broker_transport": None, "task_acks_late": True},
        {"broker_transport": "redis"},
        {"broker_transport": "redis", "task_acks_late": False},
    ],
)
def test_no_redelivery_to_predict(settings: dict[str, Any]) -> None:
    """Another broker, or tasks acked before they run, have nothing to redeliver."""
    assert predict_redelivery_seconds(settings) is None
    assert "redis-redelivery" not in keys(check_settings(settings))


def test_redelivery_follows_the_task_s_own_acks_late() -> None:
    """A task name's own acks_late decides whether it is redelivered."""
    settings = {
        "broker_transport": "redis",
        "visibility_timeout": 300,
        "tasks": {"proj.late": {"acks_late": True}},
    }
    assert predict_redelivery_seconds(settings) == 300.0  # some task is acks_late
    assert predict_redelivery_seconds(settings, "proj.late") == 300.0
    assert predict_redelivery_seconds(settings, "proj.other") is None


def test_redis_redelivery_is_info_up_to_an_hour() -> None:
    """Kombu's default hour of visibility timeout is quoted as info."""
    settings = {"broker_transport": "redis", "task_acks_late": True}
    [finding] = [f for f in check_settings(settings) if f.key == "redis-redelivery"]
    assert finding.severity == "info"
    assert "about 60 min" in finding.message
    assert "visibility_timeout 3600 s" in finding.message
    assert "every 10 s x 10" in finding.message
    assert "visibility_timeout" in finding.fix


def test_redis_redelivery_over_an_hour_warns() -> None:
    """A redelivery over an hour away warns, and the fix keeps ETAs in mind."""
    settings = {"broker_transport": "redis", "task_acks_late": True, "visibility_timeout": 43200}
    [finding] = [f for f in check_settings(settings) if f.key == "redis-redelivery"]
    assert finding.severity == "warning"
    assert "12.0 h" in finding.message
    assert "ETA" in finding.fix


def test_a_short_visibility_timeout_points_at_the_sweep() -> None:
    """When the sweep dominates, the fix points at the restore interval."""
    settings = {"broker_transport": "redis", "task_acks_late": True, "visibility_timeout": 15}
    [finding] = [f for f in check_settings(settings) if f.key == "redis-redelivery"]
    assert "about 100 s" in finding.message
    assert "unacked_restore_interval" in finding.fix


@pytest.mark.parametrize(
    "settings",
    [
        {"task_time_limit": 300},
        {"tasks": {"proj.long": {"time_limit": 3600}}},
    ],
)
def test_a_time_limit_anywhere_is_enough(settings: dict[str, Any]) -> None:
    """A hard time limit, app-wide or on one task, silences the finding."""
    assert "no-time-limit" not in keys(check_settings(settings))


def test_a_soft_limit_alone_is_said_not_to_stop_c_code() -> None:
    """A soft limit alone is said not to stop a task stuck in C code."""
    [finding] = check_settings({"task_soft_time_limit": 60, "task_time_limit": 0})
    assert finding.key == "no-time-limit"
    assert "hang policy" in finding.message
    assert "C code" in finding.message


COMBINATIONS = list(
    itertools.product(
        [False, True],  # task_acks_late
        [False, True],  # task_reject_on_worker_lost
        [None, 512000],  # worker_max_memory_per_child
        ["amqp", "redis"],  # broker_transport
        [None, 7200],  # visibility_timeout
        [None, 300],  # task_time_limit
    )
)


@pytest.mark.parametrize(
    ("acks_late", "reject", "max_memory", "transport", "visibility", "time_limit"), COMBINATIONS
)
def test_every_combination(
    acks_late: bool,
    reject: bool,
    max_memory: int | None,
    transport: str,
    visibility: int | None,
    time_limit: int | None,
) -> None:
    """Each combination of settings gives exactly the findings its rules call for (test 40)."""
    settings = {
        "task_acks_late": acks_late,
        "task_reject_on_worker_lost": reject,
        "worker_max_memory_per_child": max_memory,
        "broker_transport": transport,
        "visibility_timeout": visibility,
        "task_time_limit": time_limit,
    }
    expected = {}
    if acks_late and not reject:
        expected["acks-late-without-reject"] = "warning"
    if max_memory:
        expected["max-memory-per-child"] = "warning"
    if transport == "redis" and acks_late:
        expected["redis-redelivery"] = "warning" if visibility == 7200 else "info"
    if time_limit is None:
        expected["no-time-limit"] = "info"
    assert keys(check_settings(settings)) == expected


# ---------------------------------------------------------------------------------------
# A fake /proc


class FakeProc:
    """A /proc tree with this process (``self``), the worker's processes and Yama."""

    def __init__(
        self,
        root: Path,
        *,
        uid: int = 1000,
        gid: int = 1000,
        euid: int | None = None,
        cap_amb: str = "0" * 16,
        cap_bnd: str = ALL_CAPS,
        no_new_privs: int = 0,
        yama: int | None = None,
    ) -> None:
        self.root = root
        e = uid if euid is None else euid
        self._status(
            "self",
            f"Uid:\t{uid}\t{e}\t{e}\t{e}\nGid:\t{gid}\t{gid}\t{gid}\t{gid}\n"
            f"CapInh:\t{'0' * 16}\nCapPrm:\t{cap_amb}\nCapEff:\t{cap_amb}\n"
            f"CapBnd:\t{cap_bnd}\nCapAmb:\t{cap_amb}\nNoNewPrivs:\t{no_new_privs}\n",
        )
        if yama is not None:
            (root / "sys/kernel/yama").mkdir(parents=True)
            (root / "sys/kernel/yama/ptrace_scope").write_text(f"{yama}\n")

    def _status(self, pid: str, text: str) -> Path:
        (self.root / pid).mkdir(parents=True, exist_ok=True)
        path = self.root / pid / "status"
        path.write_text(f"Name:\tcelery\n{text}")
        return path

    def process(
        self,
        pid: int,
        *,
        uids: Sequence[int] = (1000, 1000, 1000),
        gids: Sequence[int] = (1000, 1000, 1000),
        dumpable: bool = True,
        ppid: int = 1,
        pgrp: int | None = None,
        cgroup: str | None = None,
        environ: dict[str, str] | None = None,
        cmdline: Sequence[str] = ("celery", "-A", "proj", "worker"),
    ) -> None:
        status = self._status(
            str(pid),
            f"Uid:\t{uids[0]}\t{uids[1]}\t{uids[2]}\t{uids[1]}\n"
            f"Gid:\t{gids[0]}\t{gids[1]}\t{gids[2]}\t{gids[1]}\n",
        )
        # The kernel gives a dumpable process's /proc files to its euid, else to root.
        if os.geteuid() == 0:
            owner = uids[1] if dumpable else 0
            os.chown(status, owner, owner)
        directory = self.root / str(pid)
        (directory / "stat").write_text(
            f"{pid} (cel ery) S {ppid} {pid if pgrp is None else pgrp} 1 0 -1 0\n"
        )
        (directory / "cmdline").write_bytes(b"\0".join(a.encode() for a in cmdline) + b"\0")
        if cgroup is not None:
            (directory / "cgroup").write_text(cgroup)
        if environ is not None:
            (directory / "environ").write_bytes(
                b"".join(f"{k}={v}\0".encode() for k, v in environ.items())
            )


@pytest.fixture
def no_tracer(tmp_path: Path) -> str:
    """A py-spy path without file capabilities (it does not exist)."""
    return str(tmp_path / "no-py-spy")


# ---------------------------------------------------------------------------------------
# The process manager


class Systemctl:
    def __init__(self, answer: str | None) -> None:
        self.answer = answer
        self.calls: list[list[str]] = []

    def __call__(self, args: Sequence[str]) -> str | None:
        self.calls.append(list(args))
        return self.answer


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("0::/system.slice/celery.service\n", "celery.service"),
        ("0::/system.slice/celery-worker@2.service/payload\n", "celery-worker@2.service"),
        (
            "12:cpu,cpuacct:/system.slice/celery.service\n"
            "1:name=systemd:/system.slice/celery.service\n0::/system.slice/celery.service\n",
            "celery.service",
        ),
    ],
)
def test_killmode_control_group_warns(tmp_path: Path, cgroup: str, unit: str) -> None:
    """A service unit with KillMode=control-group warns, whatever the cgroup layout."""
    proc = FakeProc(tmp_path)
    proc.process(WORKER, cgroup=cgroup)
    systemctl = Systemctl("control-group")
    [finding] = check_process_manager(WORKER, proc_root=str(tmp_path), systemctl=systemctl)
    assert systemctl.calls == [["show", "-p", "KillMode", "--value", unit]]
    assert finding.key == "systemd-killmode"
    assert finding.severity == "warning"
    assert unit in finding.message
    assert "KillMode=mixed" in finding.fix


@pytest.mark.parametrize("answer", ["mixed", "process", None])
def test_other_killmodes_or_no_answer_say_nothing(tmp_path: Path, answer: str | None) -> None:
    """mixed, process, or no answer from systemctl, raise nothing."""
    proc = FakeProc(tmp_path)
    proc.process(WORKER, cgroup="0::/system.slice/celery.service\n")
    systemctl = Systemctl(answer)
    assert check_process_manager(WORKER, proc_root=str(tmp_path), systemctl=systemctl) == []
    assert systemctl.calls


@pytest.mark.parametrize(
    "cgroup",
    [
        "0::/\n",  # a container with its own cgroup namespace
        "0::/user.slice/user-1000.slice/session-3.scope\n",  # a login shell
        "0::/system.slice/docker-0123abcd.scope\n",  # a container seen from the host
        "0::/user.slice/user-1000.slice/user@1000.service/init.scope\n",
        "",
    ],
)
def test_no_service_no_systemctl(tmp_path: Path, cgroup: str) -> None:
    """Outside a service unit systemctl is not asked."""
    proc = FakeProc(tmp_path)
    proc.process(WORKER, cgroup=cgroup)
    systemctl = Systemctl("control-group")
    assert check_process_manager(WORKER, proc_root=str(tmp_path), systemctl=systemctl) == []
    assert systemctl.calls == []


def test_a_user_unit_asks_the_user_manager(tmp_path: Path) -> None:
    """A unit of our own user manager is asked of it with --user."""
    proc = FakeProc(tmp_path)
    me = os.getuid()
    proc.process(
        WORKER, cgroup=f"0::/user.slice/user-{me}.slice/user@{me}.service/app.slice/w.service\n"
    )
    systemctl = Systemctl("control-group")
    [finding] = check_process_manager(WORKER, proc_root=str(tmp_path), systemctl=systemctl)
    assert systemctl.calls == [["--user", "show", "-p", "KillMode", "--value", "w.service"]]
    assert "systemctl --user edit w.service" in finding.fix


def test_another_user_s_unit_is_not_asked_of_our_manager(tmp_path: Path) -> None:
    """Another user's unit is not looked up in our manager, where a namesake may live."""
    proc = FakeProc(tmp_path)
    other = os.getuid() + 1
    proc.process(WORKER, cgroup=f"0::/user.slice/user@{other}.service/app.slice/w.service\n")
    systemctl = Systemctl("control-group")
    assert check_process_manager(WORKER, proc_root=str(tmp_path), systemctl=systemctl) == []
    assert systemctl.calls == []


def test_missing_systemctl_is_no_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host without systemctl gives no finding and no error."""
    proc = FakeProc(tmp_path / "proc")
    proc.process(WORKER, cgroup="0::/system.slice/celery.service\n")
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert check_process_manager(WORKER, proc_root=str(tmp_path / "proc")) == []


def test_a_hanging_systemctl_is_given_up_after_two_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A systemctl that hangs is given up after 2 s."""
    proc = FakeProc(tmp_path / "proc")
    proc.process(WORKER, cgroup="0::/system.slice/celery.service\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemctl"
    fake.write_text(f"#!/bin/sh\nexec {shutil.which('sleep')} 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    started = time.monotonic()
    assert check_process_manager(WORKER, proc_root=str(tmp_path / "proc")) == []
    assert time.monotonic() - started < 10


def test_a_failing_systemctl_is_no_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing systemctl's output is not trusted."""
    proc = FakeProc(tmp_path / "proc")
    proc.process(WORKER, cgroup="0::/system.slice/celery.service\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemctl"
    fake.write_text("#!/bin/sh\necho control-group\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert check_process_manager(WORKER, proc_root=str(tmp_path / "proc")) == []


SUPERVISED = {"SUPERVISOR_ENABLED": "1", "SUPERVISOR_PROCESS_NAME": "celery", "HOME": "/"}


def test_a_worker_in_supervisord_s_program_group_gets_an_info(tmp_path: Path) -> None:
    """A worker that is a supervisord program gets the stopasgroup info."""
    proc = FakeProc(tmp_path)
    proc.process(100, ppid=1, cmdline=("/usr/bin/python3", "/usr/bin/supervisord", "-n"))
    proc.process(WORKER, ppid=100, environ=SUPERVISED)  # the program itself: its own group
    [finding] = check_process_manager(WORKER, proc_root=str(tmp_path), systemctl=Systemctl(None))
    assert finding.key == "supervisord-stopasgroup"
    assert finding.severity == "info"
    assert "program celery" in finding.message
    assert "stopasgroup" in finding.message
    assert "[program:celery]" in finding.fix


def test_a_pool_child_shares_the_program_s_group(tmp_path: Path) -> None:
    """A pool child in the program's process group is reached as well."""
    proc = FakeProc(tmp_path)
    proc.process(100, ppid=1, cmdline=("supervisord",))
    proc.process(WORKER, ppid=100, environ=SUPERVISED)
    proc.process(WORKER + 1, ppid=WORKER, pgrp=WORKER, environ=SUPERVISED)
    findings = check_process_manager(WORKER + 1, proc_root=str(tmp_path), systemctl=Systemctl(None))
    assert keys(findings) == {"supervisord-stopasgroup": "info"}


def test_a_worker_in_its_own_session_under_run_is_not_reached(tmp_path: Path) -> None:
    """A worker in its own session under `run` is out of stopasgroup's reach."""
    proc = FakeProc(tmp_path)
    proc.process(100, ppid=1, cmdline=("supervisord",))
    proc.process(200, ppid=100, environ=SUPERVISED, cmdline=("celery-warden", "run", "--"))
    proc.process(WORKER, ppid=200, environ=SUPERVISED)  # start_new_session: pgrp == pid
    assert check_process_manager(WORKER, proc_root=str(tmp_path), systemctl=Systemctl(None)) == []


def test_an_unreadable_group_is_assumed_reached(tmp_path: Path) -> None:
    """When the process group cannot be read, the info is given anyway."""
    proc = FakeProc(tmp_path)
    proc.process(WORKER, ppid=100, pgrp=99, environ=SUPERVISED)  # the leader 99 is gone
    findings = check_process_manager(WORKER, proc_root=str(tmp_path), systemctl=Systemctl(None))
    assert keys(findings) == {"supervisord-stopasgroup": "info"}


@pytest.mark.parametrize("environ", [None, {"HOME": "/", "SUPERVISOR_X": "1"}])
def test_no_supervisord_no_finding(tmp_path: Path, environ: dict[str, str] | None) -> None:
    """Without SUPERVISOR_ENABLED in the environment there is no finding."""
    proc = FakeProc(tmp_path)
    proc.process(100, cmdline=("supervisord",))
    proc.process(WORKER, ppid=100, environ=environ)
    assert check_process_manager(WORKER, proc_root=str(tmp_path), systemctl=Systemctl(None)) == []


def test_both_managers_at_once(tmp_path: Path) -> None:
    """systemd and supervisord findings come together."""
    proc = FakeProc(tmp_path)
    proc.process(
        WORKER, environ=SUPERVISED, pgrp=99, cgroup="0::/system.slice/supervisor.service\n"
    )
    findings = check_process_manager(
        WORKER, proc_root=str(tmp_path), systemctl=Systemctl("control-group")
    )
    assert keys(findings) == {"systemd-killmode": "warning", "supervisord-stopasgroup": "info"}


# ---------------------------------------------------------------------------------------
# ptrace


def test_same_user_no_yama_is_fine(tmp_path: Path, no_tracer: str) -> None:
    """The same user without Yama may trace."""
    proc = FakeProc(tmp_path)
    proc.process(WORKER)
    assert check_ptrace(WORKER, proc_root=str(tmp_path), tracer=no_tracer) is None


def test_a_gone_worker_has_nothing_to_check(tmp_path: Path, no_tracer: str) -> None:
    """A worker that is gone gives no finding."""
    FakeProc(tmp_path)
    assert check_ptrace(WORKER, proc_root=str(tmp_path), tracer=no_tracer) is None


def test_uid_mismatch_names_both_uids_and_the_capability(tmp_path: Path, no_tracer: str) -> None:
    """A uid mismatch names both uids, the capability and every fix (test 24)."""
    proc = FakeProc(tmp_path, uid=NOBODY, gid=NOBODY)
    proc.process(WORKER, uids=(0, 0, 0), gids=(0, 0, 0))
    finding = check_ptrace(WORKER, proc_root=str(tmp_path), tracer=no_tracer)
    assert finding is not None
    assert finding.key == "py-spy-blocked"
    assert finding.severity == "warning"
    assert f"the warden runs as uid {NOBODY} and the worker as uid 0" in finding.message
    assert "CAP_SYS_PTRACE" in finding.message
    assert "run the warden as the worker's user" in finding.fix
    assert "AmbientCapabilities=CAP_SYS_PTRACE" in finding.fix
    assert "setcap cap_sys_ptrace+ep" in finding.fix
    assert "faulthandler" in finding.fix


def test_mixed_worker_uids_are_shown_real_effective_saved(tmp_path: Path, no_tracer: str) -> None:
    """Differing real, effective and saved uids are all shown."""
    proc = FakeProc(tmp_path)
    proc.process(WORKER, uids=(1000, 0, 1000))
    finding = check_ptrace(WORKER, proc_root=str(tmp_path), tracer=no_tracer)
    assert finding is not None
    assert "the worker as uid 1000/0/1000" in finding.message


def test_gid_mismatch(tmp_path: Path, no_tracer: str) -> None:
    """The same uid with another gid is refused too."""
    proc = FakeProc(tmp_path)
    proc.process(WORKER, gids=(2000, 2000, 2000))
    finding = check_ptrace(WORKER, proc_root=str(tmp_path), tracer=no_tracer)
    assert finding is not None
    assert "gid 1000 and the worker as gid 2000" in finding.message


def test_an_ambient_capability_overrides_a_uid_mismatch(tmp_path: Path, no_tracer: str) -> None:
    """An ambient CAP_SYS_PTRACE, which py-spy inherits, overrides a uid mismatch."""
    proc = FakeProc(tmp_path, uid=NOBODY, gid=NOBODY, cap_amb=AMBIENT_PTRACE)
    proc.process(WORKER, uids=(0, 0, 0), gids=(0, 0, 0))
    assert check_ptrace(WORKER, proc_root=str(tmp_path), tracer=no_tracer) is None


def test_root_keeps_its_capability_across_exec(tmp_path: Path, no_tracer: str) -> None:
    """root passes on its capabilities to py-spy."""
    proc = FakeProc(tmp_path, uid=0, gid=0)
    proc.process(WORKER)
    assert check_ptrace(WORKER, proc_root=str(tmp_path), tracer=no_tracer) is None


def test_root_without_the_capability_in_its_bounding_set(tmp_path: Path, no_tracer: str) -> None:
    """root without CAP_SYS_PTRACE in its bounding set is an ordinary user."""
    proc = FakeProc(tmp_path, uid=0, gid=0, cap_bnd=NO_PTRACE)
    proc.process(WORKER)  # uid 1000: root no longer matches, and the capability is gone
    finding = check_ptrace(WORKER, proc_root=str(tmp_path), tracer=no_tracer)
    assert finding is not None
    assert "uid 0 and the worker as uid 1000" in finding.message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a fake /proc file to root")
def test_a_worker_that_changed_its_user_is_not_dumpable(tmp_path: Path, no_tracer: str) -> None:
    """A worker that changed its user is non-dumpable: the same user is not enough."""
    proc = FakeProc(tmp_path)
    proc.process(WORKER, dumpable=False)
    finding = check_ptrace(WORKER, proc_root=str(tmp_path), tracer=no_tracer)
    assert finding is not None
    assert "not dumpable" in finding.message
    assert "--uid" in finding.message
    assert "run the warden as the worker's user" not in finding.fix  # it already is


def test_a_hidden_worker_is_another_user_s(
    tmp_path: Path, no_tracer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker hidden by hidepid is said to be another user's."""
    proc = FakeProc(tmp_path)
    proc.process(WORKER)
    read = selfcheck._read_bytes
    hidden = str(tmp_path / str(WORKER) / "status")

    def hidepid(path: str) -> bytes:
        if path == hidden:
            raise PermissionError(path)
        return read(path)

    monkeypatch.setattr(selfcheck, "_read_bytes", hidepid)
    finding = check_ptrace(WORKER, proc_root=str(tmp_path), tracer=no_tracer)
    assert finding is not None
    assert "hidepid" in finding.message


@pytest.mark.parametrize(
    ("scope", "same_user_ok", "capable_ok"),
    [(0, True, True), (1, False, True), (2, False, True), (3, False, False)],
)
def test_yama_scopes(
    tmp_path: Path, no_tracer: str, scope: int, same_user_ok: bool, capable_ok: bool
) -> None:
    """Yama's scopes 1 and 2 need CAP_SYS_PTRACE and scope 3 refuses everyone."""
    plain = FakeProc(tmp_path / "plain", yama=scope)
    plain.process(WORKER)
    capable = FakeProc(tmp_path / "capable", yama=scope, cap_amb=AMBIENT_PTRACE)
    capable.process(WORKER)
    for proc, ok in ((plain, same_user_ok), (capable, capable_ok)):
        finding = check_ptrace(WORKER, proc_root=str(proc.root), tracer=no_tracer)
        assert (finding is None) == ok, finding
        if finding is not None:
            assert f"ptrace_scope is {scope}" in finding.message
            assert "run the warden as the worker's user" not in finding.fix  # it would not help
    if scope == 3:
        finding = check_ptrace(WORKER, proc_root=str(capable.root), tracer=no_tracer)
        assert finding is not None
        assert "reboot" in finding.fix
        assert "faulthandler" in finding.fix
    if scope == 1:
        finding = check_ptrace(WORKER, proc_root=str(plain.root), tracer=no_tracer)
        assert finding is not None
        assert "never an ancestor" in finding.message


def test_yama_and_uid_mismatch_are_both_named(tmp_path: Path, no_tracer: str) -> None:
    """Yama and a uid mismatch are named together, and running as the same user is not offered."""
    proc = FakeProc(tmp_path, uid=NOBODY, gid=NOBODY, yama=2)
    proc.process(WORKER, uids=(0, 0, 0), gids=(0, 0, 0))
    finding = check_ptrace(WORKER, proc_root=str(tmp_path), tracer=no_tracer)
    assert finding is not None
    assert "uid 65534 and the worker as uid 0" in finding.message
    assert "ptrace_scope is 2" in finding.message
    assert "run the warden as the worker's user" not in finding.fix


@pytest.fixture
def capable_py_spy(tmp_path: Path) -> str:
    """A file with ``setcap cap_sys_ptrace+ep``'s xattr (struct vfs_cap_data, rev. 2)."""
    path = tmp_path / "py-spy"
    path.write_bytes(b"")
    data = struct.pack("<5I", 0x02000000 | 1, 1 << 19, 0, 0, 0)
    try:
        os.setxattr(path, "security.capability", data)
    except OSError as exc:
        pytest.skip(f"cannot set a file capability here: {exc.strerror}")
    return str(path)


def test_py_spy_s_file_capability_counts(tmp_path: Path, capable_py_spy: str) -> None:
    """py-spy's own cap_sys_ptrace+ep file capability counts."""
    proc = FakeProc(tmp_path / "proc", uid=NOBODY, gid=NOBODY)
    proc.process(WORKER, uids=(0, 0, 0), gids=(0, 0, 0))
    assert check_ptrace(WORKER, proc_root=str(proc.root), tracer=capable_py_spy) is None


def test_no_new_privs_voids_py_spy_s_file_capability(tmp_path: Path, capable_py_spy: str) -> None:
    """no_new_privs voids py-spy's file capability, and the finding says so."""
    proc = FakeProc(tmp_path / "proc", uid=NOBODY, gid=NOBODY, no_new_privs=1)
    proc.process(WORKER, uids=(0, 0, 0), gids=(0, 0, 0))
    finding = check_ptrace(WORKER, proc_root=str(proc.root), tracer=capable_py_spy)
    assert finding is not None
    assert "no_new_privs" in finding.message


def test_a_capability_only_the_warden_has_does_not_pass_to_py_spy(
    tmp_path: Path, no_tracer: str
) -> None:
    """CapEff without CapAmb (``setcap`` on python itself) is dropped by the exec."""
    proc = FakeProc(tmp_path, uid=NOBODY, gid=NOBODY)
    status = tmp_path / "self" / "status"
    status.write_text(
        status.read_text().replace(f"CapEff:\t{'0' * 16}", "CapEff:\t0000000000080000")
    )
    proc.process(WORKER, uids=(0, 0, 0), gids=(0, 0, 0))
    assert check_ptrace(WORKER, proc_root=str(tmp_path), tracer=no_tracer) is not None


# ---------------------------------------------------------------------------------------
# The real thing: another user, with and without CAP_SYS_PTRACE (RELIABILITY.md, test 24)

# Run by the system's Python from a world-readable folder of its own (the checkout, its
# virtualenv and py-spy may sit where uid 65534 cannot read, as CI's clone does): the
# selfcheck module is loaded by path, with the two helpers it imports given here.
CHILD = """
import importlib.util, json, subprocess, sys, types
stage, pid, spy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for name in ("celery_warden", "celery_warden.analysis", "celery_warden.guard"):
    sys.modules[name] = types.ModuleType(name)
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
load("celery_warden.analysis._format", stage + "/_format.py")
stacks = types.ModuleType("celery_warden.guard._stacks")
stacks.find_py_spy = lambda: spy or None
sys.modules["celery_warden.guard._stacks"] = stacks
check_ptrace = load("celery_warden.guard.selfcheck", stage + "/selfcheck.py").check_ptrace
finding = check_ptrace(pid)
dumped = None
if spy:
    done = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, timeout=30)
    dumped = done.returncode == 0
print(json.dumps({"finding": finding and finding.message, "dumped": dumped}))
"""


@pytest.fixture(scope="module")
def stage() -> Iterator[Path]:
    """A world-readable folder with what the child runs: selfcheck, its formatter, and
    a copy of py-spy."""
    folder = Path(tempfile.mkdtemp(prefix="warden-selfcheck-"))
    try:
        folder.chmod(0o755)
        package = Path(selfcheck.__file__).parents[1]
        for source in (package / "guard/selfcheck.py", package / "analysis/_format.py"):
            shutil.copy(source, folder / source.name)
        spy = find_py_spy()
        if spy is not None:
            shutil.copy(spy, folder / "py-spy")
        for path in folder.iterdir():
            path.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


AS_NOBODY = ["--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
WITH_PTRACE = ["--inh-caps", "+sys_ptrace", "--ambient-caps", "+sys_ptrace"]


def _as_nobody(stage: Path, pid: int, extra: list[str], spy: bool = False) -> dict[str, Any]:
    """Run the check (and py-spy when ``spy``) against ``pid`` as uid 65534."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root to become uid 65534")
    python = SYSTEM_PYTHON
    if python is None:
        pytest.skip("no python3 in /usr/bin or /bin for uid 65534 to run")
    copied = stage / "py-spy"
    if spy and not copied.exists():
        pytest.skip("py-spy is not installed")
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [python, "-I", "-c", CHILD, str(stage), str(pid), str(copied) if spy else ""]
    done = subprocess.run(
        [setpriv, *AS_NOBODY, *extra, *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=stage,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        if extra and "setpriv" in done.stderr:
            pytest.skip(f"the kernel refused ambient capabilities: {done.stderr.strip()}")
        pytest.fail(done.stderr)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.fixture
def root_sleep(spawn: Any) -> int:
    proc: subprocess.Popen[bytes] = spawn(["sleep", "300"])
    return proc.pid


def test_as_nobody_against_root_is_refused(stage: Path, root_sleep: int) -> None:
    """Run as uid 65534 against a root process, the check names the uid mismatch (test 24)."""
    result = _as_nobody(stage, root_sleep, [])
    assert result["finding"] is not None
    assert f"the warden runs as uid {NOBODY} and the worker as uid 0" in result["finding"]
    assert "CAP_SYS_PTRACE" in result["finding"]


def test_as_nobody_with_ambient_cap_sys_ptrace_is_allowed(stage: Path, root_sleep: int) -> None:
    """Run as uid 65534 with ambient CAP_SYS_PTRACE, the check finds nothing in the way."""
    yama = Path("/proc/sys/kernel/yama/ptrace_scope")
    if yama.exists() and yama.read_text().strip() == "3":
        pytest.skip("Yama's ptrace_scope is 3 here: nothing may ptrace")
    assert _as_nobody(stage, root_sleep, WITH_PTRACE)["finding"] is None


# This interpreter may live where uid 65534 cannot read it (a home directory closed to
# others), which blocks py-spy even with CAP_SYS_PTRACE; the system's usually is readable.
INTERPRETERS = [sys.executable, SYSTEM_PYTHON]


@pytest.mark.parametrize("extra", [[], WITH_PTRACE], ids=["plain", "cap_sys_ptrace"])
@pytest.mark.parametrize("interpreter", INTERPRETERS, ids=["ours", "system"])
def test_the_check_agrees_with_py_spy(
    stage: Path, spawn: Any, extra: list[str], interpreter: str | None
) -> None:
    """Whatever the environment (Yama, where the interpreter lives), the check says
    py-spy is blocked exactly when py-spy fails."""
    spy = find_py_spy()
    if spy is None:
        pytest.skip("py-spy is not installed")
    if interpreter is None:
        pytest.skip("no python3 in /usr/bin or /bin")
    target: subprocess.Popen[bytes] = spawn(
        [interpreter, "-c", "import time; print('ready', flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE,
    )
    assert target.stdout is not None
    assert target.stdout.readline() == b"ready\n"  # an interpreter py-spy can read
    result = _as_nobody(stage, target.pid, extra, spy=True)
    assert (result["finding"] is None) == result["dumped"], result
