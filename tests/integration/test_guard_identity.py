"""The guard signals only the processes it discovered, never a PID that now names another
(RELIABILITY.md A1-A6), survives its own crash without a stray signal (F26), and sends
nothing in a dry run (F28).

A1 and A2 reuse PIDs on purpose, which takes a PID namespace of their own
(``unshare -Urpf``, ``ns_last_pid``): they run ``app/pid_reuse.py`` as its init. The
other tests run real prefork workers of ``app/warden_guard.py`` on Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests._support import wait_until
from tests.integration._workers import APP_DIR, BROKERS, query, warden_command, worker_env

Spawn = Callable[..., subprocess.Popen[bytes]]

PID_REUSE = APP_DIR / "pid_reuse.py"
NS_PREFIX = ["unshare", "-Urpf", "--mount-proc", "--kill-child"]
STRACE = "/usr/bin/strace"
# What strace records: the three ways to send a signal, and, to tell the warden's own
# processes from others, the calls that make processes and threads; ptrace too, since
# a py-spy that attaches stops the worker.
TRACED = "kill,tgkill,tkill,pidfd_send_signal,ptrace,clone,clone3,fork,vfork,execve"


@pytest.fixture
def broker() -> str:
    """The guard's live tests run on Redis only (RELIABILITY.md names it)."""
    return BROKERS["redis"]


@pytest.fixture
def strays() -> Iterator[list[psutil.Process]]:
    """Processes a killed warden leaves behind, reparented away from the test: killed
    (psutil checks each one's identity first) and waited for when the test ends."""
    procs: list[psutil.Process] = []
    yield procs
    family = list(procs)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            family += proc.children(recursive=True)  # replacements forked since
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.resume()
            proc.kill()
    psutil.wait_procs(family, timeout=10)


# -- inside a PID namespace --------------------------------------------------------------


def _in_namespace(spawn: Spawn, tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run ``pid_reuse.py`` as the init of a new user+PID namespace; its JSON line."""
    if subprocess.run([*NS_PREFIX, "true"], check=False, capture_output=True).returncode:
        pytest.skip("needs `unshare -Urpf --mount-proc` (user and PID namespaces)")
    argv = [*NS_PREFIX, sys.executable, str(PID_REUSE), *args]
    argv += ["--store", str(tmp_path / "ns.db")]
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def test_a_reused_pid_is_never_signalled(spawn: Spawn, tmp_path: Path) -> None:
    """A1: a target dies and an impostor takes its PID at once, 50 times: a direct send,
    a hang kill and an orphan kill all end "gone", a hard memory recycle is not even
    decided, the impostor lives on, and not one signal was sent to it."""
    # GIVEN 50 targets discovered through a verified pidfd, each killed, reaped and
    # replaced on the same PID (usually within the same clock tick: same start time)
    # WHEN the warden signals each one, directly and through three guard actions
    result = _in_namespace(spawn, tmp_path, "a1", "--rounds", "50")
    # THEN every PID was reused, most within one tick (what psutil cannot tell apart)
    assert result["reused"] == 50
    assert result["same_tick"] >= 1, "no round reused the PID within the target's tick"
    # AND every send found its target gone
    assert result["send_results"] == ["gone"] * 100
    actions = [
        (action, kind, outcome) for action, kind, outcome, _why, _stack in result["incidents"]
    ]
    # (the memory rule reads memory only through the target's identity: a dead target
    # has none, so it decides nothing, where the hang and orphan rules end target-gone)
    assert sorted(set(actions)) == [
        ("hang", "hang", "target-gone"),
        ("orphan", "orphan", "target-gone"),
    ]
    assert len(actions) == 100
    # AND every impostor was alive 100 ms after it all, and the audit shows 0 sent
    assert result["impostor_alive"] == 50
    assert result["sent"] == 0
    assert {outcome for _pid, _sig, outcome in result["audits"]} == {"gone"}
    assert len(result["audits"]) == 100 + 100


def test_a_hung_childs_stack_is_never_read_from_an_impostor(spawn: Spawn, tmp_path: Path) -> None:
    """A1, with the stack taken before a hang kill: py-spy must not dump (nor stop) the
    process that took the hung child's PID, and the incident must not keep its stack."""
    # GIVEN a hung child, discovered, that died and whose PID a Python impostor took
    # WHEN the guard handles the hang with hang.stack = "py-spy"
    result = _in_namespace(spawn, tmp_path, "a1-stack")
    assert result["reused"] is True
    ((kind, outcome, _why, stack),) = result["incidents"]
    # THEN the kill finds its target gone, the impostor lives, nothing was sent to it
    assert (kind, outcome) == ("hang", "target-gone")
    assert result["impostor_alive"] is True
    assert [r for _p, _s, r in result["audits"]] == ["gone"]
    # AND the stack stored is not the impostor's
    assert "impostor_frame" not in (stack or ""), stack


def test_a_pid_reused_between_scan_and_open_is_not_adopted(spawn: Spawn, tmp_path: Path) -> None:
    """A2: a pool child killed and its PID reused (another command line) exactly between
    the sampler's scan and its pidfd_open is refused with identity_mismatch, and nothing
    is ever sent to the impostor, while an armed guard still acts on the real child."""
    # GIVEN a worker-like master with two children, the sampler's test hook killing the
    # first child and giving its PID to `sleep 301` in the gap
    # WHEN the sampler discovers the tree and a guard (hard threshold 1 MiB) watches it
    result = _in_namespace(spawn, tmp_path, "a2")
    target, impostor = result["target"], result["impostor"]
    # THEN the impostor has the target's PID and was never adopted
    assert impostor == target
    assert target not in [pid for pid, _ticks, _role in result["adopted"]]
    assert target not in result["tracked"]
    # AND the refusal was logged as identity_mismatch, naming the PID
    mismatches = [w for w in result["warnings"] if "identity_mismatch" in w]
    assert len(mismatches) == 1
    assert f"PID {target}" in mismatches[0]
    # AND no signal ever went to that PID, though the guard did act on the other child
    assert [s for s in result["signals"] if s[0] == target] == []
    assert [(p, sig, r) for p, _t, sig, r in result["signals"]] == [
        (result["bystander"], "SIGTERM", "sent")
    ]
    assert result["impostor_alive"] is True


# -- dangerous PIDs on the command line ------------------------------------------------------


@pytest.mark.parametrize("pid", ["0", "-1", "1", "2"])
def test_watch_refuses_a_dangerous_pid_in_one_line(tmp_path: Path, pid: str) -> None:
    """A3: `watch --pid` naming every process (0, -1), init or kthreadd exits 2 with one
    line on stderr, no traceback, and no store."""
    # GIVEN/WHEN watch is pointed at a PID no warden may ever signal
    store = tmp_path / "w.db"
    result = subprocess.run(
        warden_command("watch", "--act", "--pid", pid, "--store", str(store)),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # THEN it is a usage error in one line, and nothing was started or stored
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert pid in lines[0]
    assert not store.exists()


# -- real workers ----------------------------------------------------------------------------


def _worker(queue: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "warden_guard", "worker",
        "--pool", "prefork", "-c", "2", "-Q", queue, "-n", f"{queue}@%h", "-l", "info",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def _tree(store: Path) -> tuple[int, list[int]] | None:
    """The live master and its two live pool children of the latest session."""
    rows = query(
        store,
        "SELECT pid, role FROM processes WHERE ended_at IS NULL"
        " AND session_id = (SELECT max(id) FROM sessions)",
    )
    masters = [int(pid) for pid, role in rows if role == "master"]  # type: ignore[call-overload]
    children = [int(pid) for pid, role in rows if role == "child"]  # type: ignore[call-overload]
    if len(masters) != 1 or len(children) != 2:
        return None
    return masters[0], sorted(children)


def _start(
    spawn: Spawn, tmp_path: Path, queue: str, *options: str
) -> tuple[subprocess.Popen[bytes], Path, int, list[int]]:
    """`celery-warden run OPTIONS -- celery worker -c 2`, once it has seen the tree."""
    store = tmp_path / "warden.db"
    argv = warden_command(
        "run", "--interval", "0.2", "--store", str(store), *options, "--", *_worker(queue)
    )
    with (tmp_path / "warden.log").open("ab") as log:
        warden = spawn(argv, env=worker_env(BROKERS["redis"]), stdout=log, stderr=log)
    tree = wait_until(lambda: _tree(store), what="a master and two pool children")
    assert isinstance(tree, tuple)
    return warden, store, tree[0], tree[1]


def _stop(warden: subprocess.Popen[bytes]) -> int:
    """SIGTERM (forwarded to the master: a warm shutdown), and the exit code."""
    warden.send_signal(signal.SIGTERM)
    return warden.wait(timeout=60)


def _signals(store: Path, pid: int | None = None) -> list[tuple[Any, ...]]:
    """``(pid, start_ticks, signal, result, t, incident_id)`` audited, oldest first."""
    sql = "SELECT pid, start_ticks, signal, result, t, incident_id FROM signals"
    if pid is None:
        return query(store, sql + " ORDER BY id")
    return query(store, sql + " WHERE pid = ? ORDER BY id", pid)


def _incidents(store: Path, where: str = "1", *params: object) -> list[dict[str, Any]]:
    columns = "id, kind, pid, start_ticks, outcome, dry_run, numbers, deadline, t, reason, stack"
    sql = f"SELECT {columns} FROM incidents WHERE {where} ORDER BY t"  # noqa: S608 - our literals
    rows = query(store, sql, *params)
    found = [dict(zip(columns.split(", "), row, strict=True)) for row in rows]
    for incident in found:
        incident["numbers"] = json.loads(str(incident["numbers"]))
    return found


def _running(store: Path, name: str) -> list[tuple[int, int]]:
    """(pid, start_ticks) of the children running a call of ``name`` now."""
    rows = query(
        store, "SELECT pid, start_ticks FROM tasks WHERE name = ? AND ended_at IS NULL", name
    )
    return [(int(p), int(t)) for p, t in rows]  # type: ignore[call-overload]


def _alive(proc: psutil.Process) -> bool:
    """Running (psutil checks the PID still names that process) and not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.integration
def test_an_execd_child_is_reported_foreign_and_never_signalled(
    spawn: Spawn, send: Callable[..., None], queue: str, tmp_path: Path
) -> None:
    """A4: a pool child that execs `sleep` is reported as a foreign process in the worker
    tree, and the guard sends it nothing, even once its "task" is past the hang threshold."""
    # GIVEN a worker under `run` whose hang threshold is 2 s
    warden, store, _master, _children = _start(spawn, tmp_path, queue, "--hang-min-seconds", "2")
    # WHEN a task replaces its pool child with `sleep 300`
    send("guard.execv_sleep")
    found = wait_until(lambda: _incidents(store, "kind = 'foreign'"), what="a foreign incident")
    assert isinstance(found, list)
    (foreign,) = found
    execd = psutil.Process(foreign["pid"])
    try:
        assert execd.cmdline() == ["sleep", "300"]
        # THEN it is reported once, as foreign, with nothing done
        assert foreign["outcome"] == "reported"
        assert "foreign process in worker tree" in foreign["reason"]
        # AND past the hang threshold plus a few sweeps, it is still untouched
        time.sleep(3)
        assert _alive(execd)
        assert _signals(store, foreign["pid"]) == []
        assert [i["kind"] for i in _incidents(store, "pid = ?", foreign["pid"])] == ["foreign"]
    finally:
        execd.kill()  # the worker waits for its "task": end it before the warm shutdown
    assert _stop(warden) == 0


@pytest.mark.integration
def test_a_zombie_child_is_never_a_target(
    spawn: Spawn, send: Callable[..., None], queue: str, tmp_path: Path
) -> None:
    """A5: a child that died while running a task stays a zombie (its master is stopped):
    it is sampled as a zombie with no memory, and never signalled nor escalated, while
    its hung sibling is killed once and left alone once it is a zombie too."""
    # GIVEN both children of a worker running a 60 s task, hang threshold 4 s
    warden, store, master_pid, _children = _start(
        spawn, tmp_path, queue, "--hang-min-seconds", "4", "--recycle-grace-seconds", "10"
    )
    send("guard.sleep_for", 2, 60)
    wait_until(lambda: len(_running(store, "guard.sleep_for")) == 2, what="both children busy")
    (dead, dead_ticks), (hung, hung_ticks) = _running(store, "guard.sleep_for")
    master = psutil.Process(master_pid)
    # WHEN the master stops (a slow reaper) and the first child dies before its task is
    # hung: it stays a zombie
    master.suspend()
    try:
        os.kill(dead, signal.SIGKILL)
        zombie_rows = (
            "SELECT s.state, s.rss_bytes, s.uss_bytes FROM samples s JOIN processes p"
            " ON p.id = s.process_id WHERE p.pid = ? AND p.start_ticks = ? AND s.t > ?"
        )
        killed_at = time.time()
        wait_until(
            lambda: query(store, zombie_rows + " AND s.state = 'zombie'", dead, dead_ticks, 0),
            what="a zombie sample",
        )
        # THEN the hung sibling is handled (the rule is armed)...
        wait_until(
            lambda: _incidents(store, "pid = ? AND outcome != 'pending'", hung),
            timeout=30,
            what="the hung sibling's incident to end",
        )
        time.sleep(1.0)  # five more sweeps: an escalation loop would show here
        # ...and the zombie never is: no signal, no incident, no memory counted
        assert _signals(store, dead) == []
        assert _incidents(store, "pid = ?", dead) == []
        samples = query(store, zombie_rows, dead, dead_ticks, killed_at + 0.5)
        assert samples
        assert set(samples) == {("zombie", 0, None)}
        # AND the sibling got one incident and one TERM, nothing once it was a zombie
        (incident,) = _incidents(store, "pid = ?", hung)
        assert (incident["kind"], incident["outcome"]) == ("hang", "terminated")
        assert [(s[2], s[3]) for s in _signals(store, hung)] == [("SIGTERM", "sent")]
        assert psutil.Process(hung).status() == psutil.STATUS_ZOMBIE
        assert hung_ticks == incident["start_ticks"]
    finally:
        master.resume()
    assert _stop(warden) == 0


@pytest.mark.integration
def test_an_idle_child_that_exits_on_term_gets_no_kill(
    spawn: Spawn, send: Callable[..., None], queue: str, tmp_path: Path
) -> None:
    """A6: an idle child over the hard threshold exits on SIGTERM at once: no SIGKILL is
    ever sent, and the incident records exited_after_term_ms."""
    # GIVEN a worker under `run`, hard threshold 100 MiB, 10 s between TERM and KILL
    warden, store, _master, _children = _start(
        spawn, tmp_path, queue, "--child-hard-mib", "100", "--recycle-grace-seconds", "10"
    )
    # WHEN a task leaves its child holding 200 MiB, idle
    send("guard.alloc_mib", 1, 200, True)
    found = wait_until(
        lambda: _incidents(store, "kind = 'memory-hard' AND outcome != 'pending'"),
        timeout=30,
        what="the hard recycle to end",
    )
    assert isinstance(found, list)
    (incident,) = found
    # THEN it ended on SIGTERM, after its task had finished (it was idle)
    assert incident["outcome"] == "terminated"
    (task_end,) = query(
        store,
        "SELECT ended_at FROM tasks WHERE name = 'guard.alloc_mib' AND pid = ?",
        incident["pid"],
    )[0]
    assert task_end is not None
    assert task_end <= incident["t"]
    ms = incident["numbers"]["exited_after_term_ms"]
    assert isinstance(ms, int)
    assert 0 <= ms < 10_000
    # AND the only signal it got is that TERM: no KILL
    signals = _signals(store, incident["pid"])
    assert [(s[1], s[2], s[3]) for s in signals] == [(incident["start_ticks"], "SIGTERM", "sent")]
    assert _stop(warden) == 0


# -- the warden's own crash (F26) ----------------------------------------------------------


def _hung_and_termed(
    spawn: Spawn,
    send: Callable[..., None],
    queue: str,
    tmp_path: Path,
    strays: list[psutil.Process],
) -> tuple[subprocess.Popen[bytes], Path, Path, psutil.Process, dict[str, Any]]:
    """A worker under `run` whose child is stuck in C (GIL held: SIGTERM does nothing),
    with the guard's hang escalation between its TERM and its KILL."""
    config = tmp_path / "guard.toml"
    config.write_text('[hang]\nmin_seconds = 2\nstack = "none"\n\n[recycle]\ngrace_seconds = 10\n')
    config.chmod(0o600)
    warden, store, master_pid, _children = _start(spawn, tmp_path, queue, "--config", str(config))
    master = psutil.Process(master_pid)
    strays.append(master)
    send("guard.spin_c")
    termed = (
        "kind = 'hang' AND outcome = 'pending' AND id IN (SELECT incident_id FROM signals"
        " WHERE signal = 'SIGTERM' AND result = 'sent')"
    )
    found = wait_until(lambda: _incidents(store, termed), timeout=30, what="TERM to the hung child")
    assert isinstance(found, list)
    (incident,) = found
    strays.extend(master.children(recursive=True))
    return warden, store, config, master, incident


def _watch_act(spawn: Spawn, tmp_path: Path, master: int, store: Path, config: Path) -> Any:
    argv = warden_command(
        "watch", "--act", "--pid", str(master), "--interval", "0.2",
        "--config", str(config), "--store", str(store),
    )  # fmt: skip
    with (tmp_path / "watch.log").open("ab") as log:
        return spawn(argv, stdout=log, stderr=log)


@pytest.mark.integration
def test_a_warden_killed_mid_escalation_resumes_it_only_on_the_same_process(
    spawn: Spawn,
    send: Callable[..., None],
    queue: str,
    tmp_path: Path,
    strays: list[psutil.Process],
) -> None:
    """F26 (a): a warden killed between TERM and KILL sends nothing while it is down;
    the worker and its hung child keep running past the deadline; a warden started
    again on the same store finds the same process there and sends the KILL."""
    # GIVEN a hung child that got TERM, its KILL due in 10 s
    warden, store, config, master, incident = _hung_and_termed(spawn, send, queue, tmp_path, strays)
    child = psutil.Process(incident["pid"])
    # WHEN the warden is killed with SIGKILL, and the deadline passes
    warden.kill()
    warden.wait()
    while time.time() < incident["deadline"] + 1.0:  # the deadline is the window here
        time.sleep(0.2)
    # THEN the worker and the hung child are still running, untouched
    assert _alive(master)
    assert _alive(child)
    assert [(s[2], s[3]) for s in _signals(store)] == [("SIGTERM", "sent")]
    (still,) = _incidents(store, "id = ?", incident["id"])
    assert still["outcome"] == "pending"
    # WHEN a warden is started again on that worker, with the same store
    watch = _watch_act(spawn, tmp_path, master.pid, store, config)
    ended = wait_until(
        lambda: _incidents(store, "id = ? AND outcome != 'pending'", incident["id"]),
        timeout=30,
        what="the resumed escalation",
    )
    assert isinstance(ended, list)
    # THEN it sent the KILL (the identity matched and the deadline had passed), only it
    assert ended[0]["outcome"] == "killed"
    signals = _signals(store, child.pid)
    assert [(s[1], s[2], s[3]) for s in signals] == [
        (incident["start_ticks"], "SIGTERM", "sent"),
        (incident["start_ticks"], "SIGKILL", "sent"),
    ]
    assert signals[1][4] >= incident["deadline"]
    assert signals[1][5] == incident["id"]
    wait_until(lambda: not _alive(child), what="the hung child to die")
    assert _alive(master)
    watch.send_signal(signal.SIGTERM)
    assert watch.wait(timeout=60) == 0


def _writer_blocked(warden: int) -> bool:
    """py-spy shows the warden's store writer inside a store call."""
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    done = subprocess.run(
        [spy, "dump", "--pid", str(warden)], capture_output=True, text=True, timeout=30, check=False
    )
    threads = done.stdout.split("\nThread ")
    return any('"warden-writer"' in t and "store/_store.py" in t for t in threads)


@pytest.mark.integration
def test_a_restarted_warden_never_kills_a_replaced_child(
    spawn: Spawn,
    send: Callable[..., None],
    queue: str,
    tmp_path: Path,
    strays: list[psutil.Process],
) -> None:
    """F26 (b, c): a warden killed mid-escalation while its writer is blocked in a store
    write leaves the worker running and the store sound; once the hung child has been
    replaced, the warden started again ends the escalation target-gone, with no signal."""
    # GIVEN a hung child that got TERM, and another process holding the store's write
    # lock, so the warden's writer is inside a store write
    warden, store, config, master, incident = _hung_and_termed(spawn, send, queue, tmp_path, strays)
    tree = {p.pid: p for p in [master, *master.children()]}
    lock = sqlite3.connect(store, timeout=10, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        wait_until(lambda: _writer_blocked(warden.pid), timeout=30, what="a blocked writer")
        # WHEN the warden is killed with SIGKILL there
        warden.kill()
        warden.wait()
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    time.sleep(1.0)
    # THEN the worker runs on, every process of it the same, and the store is sound
    assert all(_alive(p) for p in tree.values())
    assert query(store, "PRAGMA integrity_check") == [("ok",)]
    # WHEN the hung child is replaced (the master forks a new child), and a warden
    # starts again on the same store
    child = tree[incident["pid"]]
    child.kill()
    wait_until(
        lambda: len([c for c in master.children() if c.pid != child.pid]) == 2,
        what="a replacement child",
    )
    strays.extend(master.children())
    watch = _watch_act(spawn, tmp_path, master.pid, store, config)
    ended = wait_until(
        lambda: _incidents(store, "id = ? AND outcome != 'pending'", incident["id"]),
        timeout=30,
        what="the pending incident to end",
    )
    assert isinstance(ended, list)
    # THEN the escalation ends target-gone and nothing more is sent, to anyone
    assert ended[0]["outcome"] == "target-gone"
    assert [(s[0], s[2], s[3]) for s in _signals(store)] == [(child.pid, "SIGTERM", "sent")]
    time.sleep(1.0)
    assert [(s[0], s[2], s[3]) for s in _signals(store)] == [(child.pid, "SIGTERM", "sent")]
    assert _alive(master)
    watch.send_signal(signal.SIGTERM)
    assert watch.wait(timeout=60) == 0


# -- dry run (F28) --------------------------------------------------------------------------

_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>")


def _calls(trace: Path) -> tuple[set[int], list[tuple[int, str, str, str]]]:
    """The PIDs the trace shows (the traced processes and threads, and those they made),
    and every ``(pid, syscall, first argument, line)`` that can signal or stop one."""
    seen: set[int] = set()
    calls: list[tuple[int, str, str, str]] = []
    for line in trace.read_text().splitlines():
        match = _CALL.match(line) or _RESUMED.match(line)
        if match is None:
            head = line.split(maxsplit=1)
            if head and head[0].isdigit():
                seen.add(int(head[0]))
            continue
        pid, name = int(match[1]), match[2]
        rest = match[3] if match.re is _CALL else ""
        seen.add(pid)
        made = re.search(r"\) += (\d+)$", line)
        if name in ("clone", "clone3", "fork", "vfork") and made:
            seen.add(int(made[1]))
        if rest and name in ("kill", "tgkill", "tkill", "pidfd_send_signal", "ptrace"):
            calls.append((pid, name, rest.split(",")[0].strip(), line))
    return seen, calls


def _strayed(trace: Path) -> list[str]:
    """Calls that signal, or ptrace, a process the warden did not start itself."""
    ours, calls = _calls(trace)
    bad = []
    for _pid, name, first, line in calls:
        if name in ("pidfd_send_signal", "ptrace") or int(first) not in ours:
            bad.append(line)
    return bad


@pytest.mark.integration
def test_a_dry_run_sends_nothing(
    spawn: Spawn, send: Callable[..., None], queue: str, tmp_path: Path
) -> None:
    """F28: with a hung task and a fat child over small thresholds, `run --dry-run` and
    `watch` without --act record their decisions and, under strace, make no kill, tgkill
    or pidfd_send_signal call (nor ptrace: py-spy reads without stopping) at any process
    but their own."""
    thresholds = ("--hang-min-seconds", "2", "--child-hard-mib", "100")
    # GIVEN a worker under `run --dry-run`, traced from now on, and a `watch` of it
    # traced from its start
    warden, store, master, _children = _start(spawn, tmp_path, queue, "--dry-run", *thresholds)
    run_trace, watch_trace = tmp_path / "run.strace", tmp_path / "watch.strace"
    trace = [STRACE, "-f", "-qq", "-e", f"trace={TRACED}", "-o"]
    tracer = spawn([*trace, str(run_trace), "-p", str(warden.pid)], stderr=subprocess.DEVNULL)
    watch_store = tmp_path / "watch.db"
    watch_argv = warden_command(
        "watch", "--pid", str(master), "--interval", "0.2", "--store", str(watch_store),
        *thresholds,
    )  # fmt: skip
    watch = spawn(
        [*trace, str(watch_trace), "--", *watch_argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    threads = [int(t) for t in os.listdir(f"/proc/{warden.pid}/task")]
    wait_until(
        lambda: all(_tracer(warden.pid, t) == tracer.pid for t in threads),
        what="strace attached to every thread of the warden",
    )
    # WHEN one child hangs and the other holds 200 MiB
    send("guard.wait_forever")
    hung = wait_until(lambda: _running(store, "guard.wait_forever"), what="the hung task")
    assert isinstance(hung, list)
    send("guard.alloc_mib", 1, 200, True)
    decided = "outcome = 'dry-run' AND kind IN ('hang', 'memory-hard')"
    wait_until(lambda: len(_incidents(store, decided)) == 2, timeout=30, what="run's decisions")
    wait_until(
        lambda: _incidents(watch_store, "outcome = 'dry-run' AND kind = 'memory-hard'"),
        timeout=30,
        what="watch's decision",
    )
    time.sleep(1.0)  # a few more sweeps under strace
    tracer.send_signal(signal.SIGINT)  # detaches: the warden runs on untraced
    tracer.wait(timeout=30)
    (watch_py,) = psutil.Process(watch.pid).children()
    watch_py.terminate()
    assert watch.wait(timeout=60) == 0
    # THEN the decisions are recorded as dry runs, the hang with the stack py-spy read
    (hang,) = _incidents(store, "kind = 'hang'")
    assert hang["dry_run"] == 1
    assert hang["pid"] == hung[0][0]
    assert {s[3] for s in _signals(store)} == {"dry-run"}
    assert query(watch_store, "SELECT count(*) FROM signals WHERE result != 'dry-run'") == [(0,)]
    # AND neither warden signalled (or ptraced) any process but its own
    assert _strayed(run_trace) == []
    assert _strayed(watch_trace) == []
    # AND the py-spy the dry run started was the non-blocking one
    spies = [line for line in run_trace.read_text().splitlines() if "py-spy" in line]
    assert any("execve(" in line and '"--nonblocking"' in line for line in spies), spies
    assert "wait_forever" in (hang["stack"] or ""), hang["stack"]
    # AND the same trace does see a signal the warden really sends: traced again, it
    # forwards its own SIGTERM to the master (run's warm shutdown) through a pidfd
    psutil.Process(hung[0][0]).kill()  # the worker waits for its task: end it first
    stop_trace = tmp_path / "stop.strace"
    tracer = spawn([*trace, str(stop_trace), "-p", str(warden.pid)], stderr=subprocess.DEVNULL)
    wait_until(lambda: _tracer(warden.pid, warden.pid) == tracer.pid, what="strace again")
    assert _stop(warden) == 0
    tracer.wait(timeout=30)
    _ours, calls = _calls(stop_trace)
    assert [(name, line.split(", ")[1]) for _pid, name, _first, line in calls] == [
        ("pidfd_send_signal", "SIGTERM")
    ]
    forwarded = "SELECT signal, result FROM signals WHERE detail LIKE 'forwarded%'"
    assert query(store, forwarded) == [("SIGTERM", "sent")]


def _tracer(pid: int, tid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0
