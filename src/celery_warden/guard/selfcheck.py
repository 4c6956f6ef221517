"""The startup self-check: settings and surroundings that make the guard's actions lose
tasks, fight another recycler, or leave it blind, said once at startup with their fix.

Every check returns :class:`Finding` records and prints nothing: the caller prints them
and records the warnings as ``config`` incidents. Each check reads only what it is given,
or ``/proc`` under an injectable root (and runs ``systemctl`` through an injectable
runner), so every combination is tested against fixtures (RELIABILITY.md, test 40).

Finding keys: ``acks-late-without-reject``, ``max-memory-per-child``,
``redis-redelivery``, ``no-time-limit`` (from the worker's settings),
``systemd-killmode``, ``supervisord-stopasgroup`` (from its process manager) and
``py-spy-blocked`` (from the kernel's ptrace rules).
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from celery_warden.analysis._format import format_duration
from celery_warden.guard._stacks import find_py_spy

__all__ = [
    "Finding",
    "SystemctlRunner",
    "check_process_manager",
    "check_ptrace",
    "check_settings",
    "predict_redelivery_seconds",
]

Severity = Literal["warning", "info"]

# kombu's Redis transport (QoS.restore_visible in kombu/transport/redis.py, read in 5.3.0,
# 5.6.2 and 5.7.0: https://github.com/celery/kombu/blob/main/kombu/transport/redis.py):
# a message delivered but not acked goes back to its queue once it is older than
# visibility_timeout, at the next restore sweep. A worker sweeps when it starts, then
# calls the sweep every unacked_restore_interval seconds, and it scans Redis only on
# every unacked_restore_throttle-th call. Both are fixed at 10 before kombu 5.7, and are
# transport options with the same defaults from 5.7 on.
_VISIBILITY_TIMEOUT_SECONDS = 3600.0
_RESTORE_INTERVAL_SECONDS = 10.0
_RESTORE_THROTTLE = 10
_REDIS_TRANSPORTS = frozenset({"redis", "rediss", "sentinel"})
_LONG_REDELIVERY_SECONDS = 3600.0
_NAMES_SHOWN = 5

_CAP_SYS_PTRACE = 19  # linux/capability.h
_VFS_CAP_FLAGS_EFFECTIVE = 0x000001  # in magic_etc of the security.capability xattr
_USER_MANAGER = re.compile(r"user@(\d+)\.service")

# Runs ``systemctl`` with these arguments: its stdout, or None when it failed.
SystemctlRunner = Callable[[Sequence[str]], str | None]


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the self-check found: what it means for the guard, and how to fix it."""

    key: str  # stable, for scripts and tests (the module docstring lists them)
    severity: Severity
    message: str
    fix: str


# ---------------------------------------------------------------------------------------
# The worker's Celery settings


def check_settings(settings: Mapping[str, Any]) -> list[Finding]:
    """Check the settings the probe in a worker's master sends.

    Keys read (each may be missing or None): ``task_acks_late``,
    ``task_reject_on_worker_lost``, ``task_time_limit``, ``task_soft_time_limit``,
    ``worker_max_memory_per_child`` (KiB), ``broker_transport`` (``"redis"``,
    ``"amqp"``...), ``visibility_timeout``, ``unacked_restore_interval`` and
    ``unacked_restore_throttle`` (from ``broker_transport_options``; kombu 5.7+ reads the
    last two), and ``tasks``: per task name, the ``acks_late``, ``reject_on_worker_lost``,
    ``time_limit`` and ``soft_time_limit`` that differ from the app-wide ones.

    >>> [f.key for f in check_settings({"task_acks_late": True, "task_time_limit": 60})]
    ['acks-late-without-reject']
    """
    checks = (
        _find_lossy_acks,
        _find_peak_recycling,
        _find_slow_redelivery,
        _find_missing_time_limit,
    )
    return [finding for check in checks if (finding := check(settings)) is not None]


def predict_redelivery_seconds(
    settings: Mapping[str, Any], task_name: str | None = None
) -> float | None:
    """About how long after its worker died a task still unacked comes back to its queue,
    with the Redis broker: ``max(visibility_timeout, interval x throttle)``.

    It counts from the task's delivery when the visibility timeout dominates, and from
    the first sweep of a worker still (or again) consuming the queue otherwise; it can be
    up to one sweep period (100 s by default) later. None when the broker is not Redis
    or the task (``task_name``, else any task) is acked before it runs: then nothing is
    redelivered.

    >>> predict_redelivery_seconds({"broker_transport": "redis", "task_acks_late": True,
    ...                             "visibility_timeout": 15})
    100.0
    """
    if not _is_redis(settings):
        return None
    tasks = _read_task_overrides(settings)
    if task_name is not None:
        acks_late = bool(_effective(settings, tasks.get(task_name, {}), "acks_late"))
    else:
        acks_late = bool(settings.get("task_acks_late")) or any(
            _effective(settings, overrides, "acks_late") for overrides in tasks.values()
        )
    if not acks_late:
        return None
    visibility, interval, throttle = _read_redis_timings(settings)
    return max(visibility, interval * throttle)


def _find_lossy_acks(settings: Mapping[str, Any]) -> Finding | None:
    tasks = _read_task_overrides(settings)
    app_wide = bool(settings.get("task_acks_late")) and not settings.get(
        "task_reject_on_worker_lost"
    )
    named = sorted(
        name
        for name, overrides in tasks.items()
        if _effective(settings, overrides, "acks_late")
        and not _effective(settings, overrides, "reject_on_worker_lost")
    )
    why = "Celery acks a task whose child died (WorkerLostError) instead of redelivering it"
    loop = (
        " (a task whose child keeps dying is then redelivered each time; the guard kills "
        "one task id at most poison.max_kills times)"
    )
    if app_wide:
        return Finding(
            key="acks-late-without-reject",
            severity="warning",
            message=(
                "hard kills will lose tasks: task_acks_late is on without "
                f"task_reject_on_worker_lost, and {why}"
            ),
            fix=f"set task_reject_on_worker_lost = True{loop}",
        )
    if not named:
        return None
    shown = ", ".join(named[:_NAMES_SHOWN])
    if len(named) > _NAMES_SHOWN:
        shown += f" and {len(named) - _NAMES_SHOWN} more"
    return Finding(
        key="acks-late-without-reject",
        severity="warning",
        message=(
            f"hard kills will lose these tasks: {shown} (acks_late without "
            f"reject_on_worker_lost): {why}"
        ),
        fix=f"set reject_on_worker_lost=True on these tasks, or task_reject_on_worker_lost "
        f"= True{loop}",
    )


def _find_peak_recycling(settings: Mapping[str, Any]) -> Finding | None:
    limit_kib = _number(settings.get("worker_max_memory_per_child"))
    if limit_kib is None or limit_kib <= 0:  # billiard: 0 or unset is off
        return None
    return Finding(
        key="max-memory-per-child",
        severity="warning",
        message=(
            f"worker_max_memory_per_child = {limit_kib:.0f} KiB ({limit_kib / 1024:.0f} MiB) "
            "recycles a child after any task that leaves its PEAK resident memory above "
            "it: Celery reads ru_maxrss after each task, which never comes down and also "
            "counts pages shared with the master, so a child that spiked once is recycled "
            "though it freed the memory, and children of a large master can be recycled "
            "after every task (celery/celery#4125); it will fight the guard's thresholds, "
            "which read current private memory"
        ),
        fix=(
            "unset worker_max_memory_per_child (and --max-memory-per-child) and let the "
            "guard's memory policy decide (memory.child_soft_mib, memory.child_hard_mib)"
        ),
    )


def _find_slow_redelivery(settings: Mapping[str, Any]) -> Finding | None:
    predicted = predict_redelivery_seconds(settings)
    if predicted is None:
        return None
    visibility, interval, throttle = _read_redis_timings(settings)
    message = (
        f"with the Redis broker, an acks_late task whose worker died comes back to its "
        f"queue only after about {format_duration(predicted)}: max(visibility_timeout "
        f"{visibility:.0f} s, kombu's restore sweep every {interval:.0f} s x {throttle}); "
        "the guard's orphan incidents quote this figure"
    )
    if visibility >= interval * throttle:
        shorten = (
            "lower visibility_timeout in broker_transport_options, keeping it above your "
            "longest task and your longest ETA/countdown delay (a message older than it "
            "is delivered again, even while it runs)"
        )
    else:
        shorten = (
            "lower unacked_restore_interval or unacked_restore_throttle in "
            "broker_transport_options (kombu 5.7+)"
        )
    if predicted > _LONG_REDELIVERY_SECONDS:
        return Finding("redis-redelivery", "warning", message, f"to shorten it, {shorten}")
    return Finding("redis-redelivery", "info", message, f"nothing needed; to shorten it, {shorten}")


def _find_missing_time_limit(settings: Mapping[str, Any]) -> Finding | None:
    tasks = _read_task_overrides(settings)
    if _positive(settings.get("task_time_limit")) or any(
        _positive(overrides.get("time_limit")) for overrides in tasks.values()
    ):
        return None
    soft = _positive(settings.get("task_soft_time_limit")) or any(
        _positive(overrides.get("soft_time_limit")) for overrides in tasks.values()
    )
    message = "no task_time_limit: a hung task is only caught by the guard's hang policy"
    if soft:
        message += (
            " (a soft time limit raises in Python code only: a task stuck in C code never sees it)"
        )
    return Finding(
        key="no-time-limit",
        severity="info",
        message=message,
        fix=(
            "set task_time_limit (or time_limit= on the long tasks) above the longest "
            "healthy run; the guard leaves a task with a limit to Celery until limit x "
            "hang.time_limit_factor"
        ),
    )


def _read_task_overrides(settings: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    tasks = settings.get("tasks")
    if not isinstance(tasks, Mapping):
        return {}
    return {str(name): value for name, value in tasks.items() if isinstance(value, Mapping)}


def _effective(settings: Mapping[str, Any], overrides: Mapping[str, Any], key: str) -> Any:
    """A task's own value of ``key``, else the app-wide ``task_<key>``: Celery fills a
    task attribute left at None from the app's configuration."""
    value = overrides.get(key)
    return settings.get(f"task_{key}") if value is None else value


def _is_redis(settings: Mapping[str, Any]) -> bool:
    return str(settings.get("broker_transport") or "").lower() in _REDIS_TRANSPORTS


def _read_redis_timings(settings: Mapping[str, Any]) -> tuple[float, float, int]:
    """visibility_timeout, unacked_restore_interval and unacked_restore_throttle, with
    kombu's defaults and its handling of odd values (an interval <= 0 means the default,
    a throttle of 0 means every call)."""
    visibility = _number(settings.get("visibility_timeout"))
    interval = _number(settings.get("unacked_restore_interval"))
    throttle = _number(settings.get("unacked_restore_throttle"))
    return (
        _VISIBILITY_TIMEOUT_SECONDS if visibility is None else max(visibility, 0.0),
        _RESTORE_INTERVAL_SECONDS if interval is None or interval <= 0 else interval,
        _RESTORE_THROTTLE if throttle is None else max(int(throttle), 1),
    )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _positive(value: object) -> bool:
    number = _number(value)
    return number is not None and number > 0


# ---------------------------------------------------------------------------------------
# The worker's process manager


def _run_systemctl(args: Sequence[str]) -> str | None:
    """``systemctl ARGS``'s output; None if systemctl is missing, fails (no systemd as
    PID 1, as in most containers) or takes over 2 s."""
    try:
        done = subprocess.run(
            ["systemctl", *args], capture_output=True, text=True, timeout=2, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def check_process_manager(
    pid: int, *, proc_root: str = "/proc", systemctl: SystemctlRunner = _run_systemctl
) -> list[Finding]:
    """Check how the worker whose master is ``pid`` gets stopped: a stop that sends
    SIGTERM to the pool children too kills their tasks at once (RELIABILITY.md, point 7).

    systemd: the unit is read from ``/proc/PID/cgroup`` and its ``KillMode`` asked of
    systemctl (no finding when that fails, or for a unit of another user's manager).
    supervisord: its ``stopasgroup`` cannot be read from here, so the finding is an
    ``info`` that says what to check.
    """
    findings = []
    unit = _parse_systemd_unit(_read_text(f"{proc_root}/{pid}/cgroup") or "")
    if unit is not None:
        name, owner = unit
        scope = ["--user"] if owner is not None else []
        if owner is None or owner == os.getuid():
            mode = systemctl([*scope, "show", "-p", "KillMode", "--value", name])
            if mode == "control-group":
                findings.append(_warn_killmode(name, scope))
    program = _find_supervisor_program(pid, proc_root)
    if program is not None:
        findings.append(
            Finding(
                key="supervisord-stopasgroup",
                severity="info",
                message=(
                    f"the worker runs under supervisord (program {program}): if that "
                    "program sets stopasgroup=true, a stop sends SIGTERM to the pool "
                    "children too and their in-flight tasks die at once, which defeats "
                    "warm shutdown"
                ),
                fix=(
                    f"in [program:{program}], leave stopasgroup false (its default); "
                    "killasgroup=true alone is fine (it only widens the final SIGKILL), and "
                    "stopwaitsecs must exceed your longest task"
                ),
            )
        )
    return findings


def _warn_killmode(unit: str, scope: list[str]) -> Finding:
    edit = " ".join(["systemctl", *scope, "edit", unit])
    return Finding(
        key="systemd-killmode",
        severity="warning",
        message=(
            f"{unit} has KillMode=control-group (systemd's default): stopping it sends "
            "SIGTERM to every process of the unit at once, so the pool children die "
            "mid-task (their tasks fail with WorkerLostError) instead of finishing in a "
            "warm shutdown"
        ),
        fix=(
            f"set KillMode=mixed in [Service] (`{edit}`): SIGTERM goes to the main process "
            "only, SIGKILL to what is left after TimeoutStopSec, which must exceed your "
            "longest task"
        ),
    )


def _parse_systemd_unit(cgroup: str) -> tuple[str, int | None] | None:
    """The service unit a process runs in, from ``/proc/PID/cgroup``, and the uid of the
    user manager when it is a user unit; None outside any service.

    The innermost ``.service`` or ``.scope`` component is the unit (a unit with
    ``Delegate=`` may have sub-cgroups of any name below it); a scope (a login session,
    a container) has no stop of its own.
    """
    for line in cgroup.splitlines():
        ident, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        unified = ident == "0" and controllers == ""
        if not unified and "name=systemd" not in controllers.split(","):
            continue
        parts = [part for part in path.split("/") if part]
        units = [i for i, part in enumerate(parts) if part.endswith((".service", ".scope"))]
        if not units:
            continue
        name = parts[units[-1]]
        if not name.endswith(".service") or _USER_MANAGER.fullmatch(name):
            return None
        for part in parts[: units[-1]]:
            if match := _USER_MANAGER.fullmatch(part):
                return name, int(match[1])
        return name, None
    return None


def _find_supervisor_program(pid: int, proc_root: str) -> str | None:
    """The supervisord program ``pid`` belongs to, if a stop of that program reaches it.

    supervisord puts every program in its own process group and ``stopasgroup``
    signals that group; ``celery-warden run`` starts the worker in a session of its own,
    which such a stop does not reach. When the group cannot be read, assume it does.
    """
    try:
        environ = _read_bytes(f"{proc_root}/{pid}/environ")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    env = {}
    for entry in environ.split(b"\0"):
        key, _, value = entry.partition(b"=")
        env[key] = value.decode("utf-8", "replace")
    if b"SUPERVISOR_ENABLED" not in env:
        return None
    program = env.get(b"SUPERVISOR_PROCESS_NAME") or "?"
    try:
        _, group = _read_parent_and_group(proc_root, pid)
        parent, _ = _read_parent_and_group(proc_root, group)  # the group leader's parent
        parent_argv = _read_bytes(f"{proc_root}/{parent}/cmdline").split(b"\0")
    except (OSError, IndexError, ValueError):
        return program
    under_supervisord = any(os.path.basename(arg).startswith(b"supervisord") for arg in parent_argv)
    return program if under_supervisord else None


def _read_parent_and_group(proc_root: str, pid: int) -> tuple[int, int]:
    """ppid and pgrp from ``/proc/PID/stat`` (after the command name, which is in
    parentheses and may hold spaces or parentheses itself)."""
    data = _read_bytes(f"{proc_root}/{pid}/stat")
    rest = data[data.rfind(b")") + 2 :].split()
    return int(rest[1]), int(rest[2])


# ---------------------------------------------------------------------------------------
# ptrace, for py-spy


def check_ptrace(
    pid: int, *, proc_root: str = "/proc", tracer: str | None = None
) -> Finding | None:
    """Whether py-spy, started by this process (the warden), may read ``pid``'s stacks.

    The kernel (ptrace(2), "Ptrace access mode checking",
    https://man7.org/linux/man-pages/man2/ptrace.2.html) lets a tracer in when its real
    uid and gid equal the target's real, effective and saved ones and the target is
    dumpable, or when the tracer holds CAP_SYS_PTRACE; Yama's ``ptrace_scope`` then
    narrows that (1: descendants only, which py-spy never is, being the warden's child;
    2: CAP_SYS_PTRACE only; 3: nobody). What counts is the capability py-spy holds
    *after exec*: root's, an ambient one, or py-spy's own file capability (``tracer``,
    the py-spy executable; None: the one the guard would run), never one only this process has.
    py-spy also reads the worker's interpreter to find its symbols. None: nothing in
    the way (or ``pid`` is gone); else a warning naming each cause.
    """
    ours = _read_status(f"{proc_root}/self/status")
    try:
        theirs: dict[str, str] | None = _read_status(f"{proc_root}/{pid}/status")
        status_owner = os.stat(f"{proc_root}/{pid}/status").st_uid
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:  # procfs mounted with hidepid: another user's process
        theirs, status_owner = None, -1
    scope = _read_yama_scope(proc_root)
    capable, ignored = _tracer_holds_ptrace(ours, find_py_spy() if tracer is None else tracer)
    causes: list[str] = []
    same_user_helps = False
    if scope == 3:
        causes.append("Yama's ptrace_scope is 3: no process may ptrace, root included")
    elif not capable:
        credentials, same_user_helps = _explain_credentials(pid, ours, theirs, status_owner)
        same_user_helps = same_user_helps and scope in (None, 0)
        causes += [cause for cause in (credentials, _explain_yama(scope)) if cause]
        if causes:
            causes.append(ignored or "py-spy will not hold CAP_SYS_PTRACE")
    unreadable = None if scope == 3 else _find_unreadable_interpreter(proc_root, pid)
    if unreadable is not None:
        uid = _ids(ours, "Uid", real_only=True)
        causes.append(f"uid {uid} cannot read the worker's interpreter {unreadable}")
    if not causes:
        return None
    return Finding(
        key="py-spy-blocked",
        severity="warning",
        message=f"py-spy cannot read the stacks of PID {pid}: {'; '.join(causes)}",
        fix=_suggest_ptrace_fix(scope, capable, same_user_helps, unreadable),
    )


def _explain_credentials(
    pid: int, ours: Mapping[str, str], theirs: Mapping[str, str] | None, status_owner: int
) -> tuple[str | None, bool]:
    """Why the kernel's own check (before Yama) refuses a tracer without CAP_SYS_PTRACE,
    and whether running as the worker's user would fix it."""
    uid, gid = _ids(ours, "Uid", real_only=True), _ids(ours, "Gid", real_only=True)
    if theirs is None:
        return f"PID {pid} is hidden from uid {uid} (procfs hidepid): another user's", True
    if set(theirs["Uid"].split()[:3]) != {uid}:
        return f"the warden runs as uid {uid} and the worker as uid {_ids(theirs, 'Uid')}", True
    if set(theirs["Gid"].split()[:3]) != {gid}:
        return f"the warden runs as gid {gid} and the worker as gid {_ids(theirs, 'Gid')}", True
    if status_owner == 0 and uid != "0":  # the kernel gives a non-dumpable's /proc to root
        return (
            "the worker is not dumpable: it changed its user after it started (celery "
            "worker --uid), so only a tracer with CAP_SYS_PTRACE may read it, even as the "
            "same user"
        ), False
    return None, False


def _explain_yama(scope: int | None) -> str | None:
    if scope == 2:
        return "Yama's ptrace_scope is 2: only a tracer with CAP_SYS_PTRACE may trace"
    if scope == 1:
        return (
            "Yama's ptrace_scope is 1: without CAP_SYS_PTRACE a process may trace only its "
            "descendants, and py-spy is never an ancestor of the worker"
        )
    return None


def _ids(status: Mapping[str, str], field: str, *, real_only: bool = False) -> str:
    """The real uid or gid of a ``status``, or its real/effective/saved ids when they
    differ (the kernel compares the tracer's real id with all three)."""
    ids = status[field].split()[:3]
    return ids[0] if real_only or len(set(ids)) == 1 else "/".join(ids)


def _suggest_ptrace_fix(
    scope: int | None, capable: bool, same_user: bool, unreadable: str | None
) -> str:
    fallback = (
        "without it, hung children's stacks come from the faulthandler the probe "
        "registers (hang.stack), or none"
    )
    if scope == 3:
        return f"none short of a reboot (Yama's scope 3 cannot be lowered); {fallback}"
    fixes = []
    if same_user:
        fixes.append("run the warden as the worker's user")
    if not capable:
        fixes.append(
            "give py-spy CAP_SYS_PTRACE: AmbientCapabilities=CAP_SYS_PTRACE in the warden's "
            "unit, `setcap cap_sys_ptrace+ep` on the py-spy executable, or --cap-add "
            "SYS_PTRACE in a container"
        )
    if unreadable is not None:
        fixes.append(f"make {unreadable} readable to the warden's user")
    return f"{'; or '.join(fixes)}; {fallback}"


def _tracer_holds_ptrace(ours: Mapping[str, str], tracer: str | None) -> tuple[bool, str]:
    """Whether a program this process execs holds CAP_SYS_PTRACE, and why a file
    capability that would have given it does not (capabilities(7), "Transformation of
    capabilities during execve()", https://man7.org/linux/man-pages/man7/capabilities.7.html).
    """
    bit = 1 << _CAP_SYS_PTRACE
    if int(ours.get("CapAmb", "0"), 16) & bit:
        return True, ""
    bounding = bool(int(ours.get("CapBnd", "0"), 16) & bit)
    if int(ours["Uid"].split()[1]) == 0:  # root's capabilities survive exec
        return bounding, ""
    if tracer is None or not _file_grants_ptrace(tracer) or not bounding:
        return False, ""
    if ours.get("NoNewPrivs", "0").strip() == "1":
        return False, (
            f"{tracer} has cap_sys_ptrace, but the warden runs with no_new_privs "
            "(NoNewPrivileges= or a systemd sandboxing option), which ignores file "
            "capabilities"
        )
    return True, ""


def _file_grants_ptrace(path: str) -> bool:
    """Whether ``path``'s ``security.capability`` xattr grants CAP_SYS_PTRACE, effective
    (``setcap cap_sys_ptrace+ep``): struct vfs_cap_data, little-endian magic_etc, then
    the low 32 permitted bits."""
    try:
        raw = os.getxattr(path, "security.capability")
    except OSError:
        return False
    if len(raw) < 8:
        return False
    magic, permitted = struct.unpack_from("<II", raw)
    return bool(magic & _VFS_CAP_FLAGS_EFFECTIVE) and bool(permitted & 1 << _CAP_SYS_PTRACE)


def _find_unreadable_interpreter(proc_root: str, pid: int) -> str | None:
    """The worker's executable when it exists here but this user cannot read it (a
    virtualenv in a home directory closed to others); None when readable or unknown."""
    try:
        exe = os.readlink(f"{proc_root}/{pid}/exe")
    except OSError:  # gone, or not ours to read: the uid causes say why
        return None
    try:
        os.stat(exe)
    except PermissionError:
        return exe
    except OSError:  # another mount namespace (a container): py-spy finds it there
        return None
    return None if os.access(exe, os.R_OK) else exe


def _read_yama_scope(proc_root: str) -> int | None:
    text = _read_text(f"{proc_root}/sys/kernel/yama/ptrace_scope")
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------
# /proc


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _read_text(path: str) -> str | None:
    """The file's text; None when it is missing or not ours to read."""
    try:
        return _read_bytes(path).decode("utf-8", "replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def _read_status(path: str) -> dict[str, str]:
    """``/proc/PID/status`` as {field: value}."""
    fields = {}
    for line in _read_bytes(path).decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields
