"""`celery-warden run` on real prefork workers, on Redis and on RabbitMQ."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest

from celery_warden.reporters.json import SCHEMA_VERSION
from tests._support import wait_until
from tests.integration._workers import query, warden_command, worker_command, worker_env

pytestmark = pytest.mark.integration

SCHEMA = Path(__file__).parents[2] / "src/celery_warden/schemas/report-v4.schema.json"


def _live_children(store: Path) -> list[tuple[object, ...]]:
    return query(
        store, "SELECT pid, start_ticks FROM processes WHERE role = 'child' AND ended_at IS NULL"
    )


def _finished(store: Path) -> int:
    rows = query(store, "SELECT count(*) FROM tasks WHERE ended_at IS NOT NULL")
    return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]


def _start(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path, broker: str, queue: str
) -> tuple[subprocess.Popen[bytes], Path]:
    store = tmp_path / "warden.db"
    argv = warden_command("run", "--store", str(store), "--", *worker_command(queue))
    warden = spawn(argv, env=worker_env(broker))
    wait_until(
        lambda: (
            len(_live_children(store)) == 2
            and query(store, "SELECT 1 FROM processes WHERE role = 'master'")
        ),
        what="a master and two pool children",
    )
    return warden, store


def test_run_records_the_tree_and_every_task(
    spawn: Callable[..., subprocess.Popen[bytes]],
    send: Callable[..., None],
    broker: str,
    queue: str,
    tmp_path: Path,
) -> None:
    """A worker under `run` has its master, children and tasks stored, and the leaking
    children are found while the master is not."""
    # GIVEN a prefork worker with two children under the warden
    warden, store = _start(spawn, tmp_path, broker, queue)
    # WHEN it runs a leaking task mixed with clean tasks and failing tasks
    for round_ in range(100):
        send("testapp.leak", 6, 100_000)
        send("testapp.noop", 1)
        if round_ % 10 == 0:
            send("testapp.fail", 1)
    wait_until(lambda: _finished(store) >= 710, timeout=120, what="710 finished tasks")
    warden.send_signal(signal.SIGTERM)
    # THEN the warden forwards the warm shutdown and exits with the worker's code
    assert warden.wait(timeout=60) == 0
    roles = dict(query(store, "SELECT role, count(*) FROM processes GROUP BY role"))
    assert roles["master"] == 1
    assert roles["child"] == 2
    assert query(store, "SELECT count(*) FROM processes WHERE ended_at IS NULL") == [(0,)]
    states = dict(query(store, "SELECT state, count(*) FROM tasks GROUP BY state"))
    assert states == {"success": 700, "failure": 10}
    samples = query(store, "SELECT count(*), count(uss_bytes), count(open_fds) FROM samples")[0]
    assert samples[0] > 0
    assert samples[1] > 0
    assert samples[2] > 0
    # AND the JSON report follows its schema and tells the leak where it is
    out = subprocess.run(
        warden_command("report", "--store", str(store), "--format", "json"),
        capture_output=True,
        check=True,
    )
    document = json.loads(out.stdout)
    jsonschema.validate(document, json.loads(SCHEMA.read_text()))
    assert document["schema_version"] == SCHEMA_VERSION
    verdicts = {p["role"]: p["verdict"] for p in document["processes"] if p["role"] != "child"}
    assert verdicts["master"] != "leak"
    children = [p for p in document["processes"] if p["role"] == "child"]
    assert [p["verdict"] for p in children] == ["leak", "leak"]
    for child in children:
        assert 60_000 < child["slope_bytes_per_task"] < 160_000
    tasks = {t["name"]: t for t in document["tasks"]}
    assert tasks["testapp.leak"]["calls"] == 600
    assert tasks["testapp.fail"]["failures"] == 10
    assert document["workers"][0]["nodename"] == f"{queue}@{os.uname().nodename}"


def test_a_child_killed_by_sigkill_is_replaced_by_a_new_process(
    spawn: Callable[..., subprocess.Popen[bytes]],
    broker: str,
    queue: str,
    tmp_path: Path,
) -> None:
    """When a pool child is SIGKILLed, its life ends in the store and its replacement
    appears as a new process."""
    # GIVEN a worker with two children under the warden
    warden, store = _start(spawn, tmp_path, broker, queue)
    victim_pid, victim_ticks = _live_children(store)[0]
    # WHEN one child is killed
    os.kill(int(victim_pid), signal.SIGKILL)  # type: ignore[call-overload]
    # THEN it ends and a new child takes its place
    wait_until(
        lambda: query(
            store,
            "SELECT ended_at FROM processes WHERE pid = ? AND start_ticks = ?"
            " AND ended_at IS NOT NULL",
            victim_pid,
            victim_ticks,
        ),
        what="the killed child's end",
    )
    wait_until(lambda: len(_live_children(store)) == 2, what="a replacement child")
    assert (victim_pid, victim_ticks) not in _live_children(store)
    (reason,) = query(
        store,
        "SELECT end_reason FROM processes WHERE pid = ? AND start_ticks = ?",
        victim_pid,
        victim_ticks,
    )[0]
    assert reason in {"gone", "killed"}
    warden.send_signal(signal.SIGTERM)
    assert warden.wait(timeout=60) == 0
    children = query(store, "SELECT pid FROM processes WHERE role = 'child'")
    assert len(children) == 3
