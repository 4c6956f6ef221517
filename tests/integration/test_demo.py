"""`celery-warden demo`: the whole path on the embedded broker, no server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration._workers import warden_command

pytestmark = pytest.mark.integration


def test_the_demo_finds_the_leaking_task_and_only_it(tmp_path: Path) -> None:
    """The demo's leaking worker's child is a leak; the other workers' processes are not;
    the guard recycles the leaking child softly, and no task is lost."""
    # GIVEN nothing but the package
    store = tmp_path / "demo.db"
    # WHEN the demo runs
    demo = subprocess.run(
        warden_command("demo", "--tasks", "2100", "--store", str(store)),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    # THEN it succeeds and says so in its tables
    assert demo.returncode == 0, demo.stderr
    assert "leak" in demo.stdout
    assert "demo.leaky" in demo.stdout
    # AND the stored session shows every task and the verdicts where they belong
    report = subprocess.run(
        warden_command("report", "--store", str(store), "--format", "json"),
        capture_output=True,
        text=True,
        check=True,
    )
    document = json.loads(report.stdout)
    assert {t["name"]: (t["calls"], t["failures"]) for t in document["tasks"]} == {
        "demo.leaky": (700, 0),
        "demo.churn": (700, 0),
        "demo.nap": (700, 0),
    }
    node_of = {w["master_pid"]: w["nodename"].split("@")[0] for w in document["workers"]}
    children = [p for p in document["processes"] if p["role"] == "child"]
    (fat,) = [p for p in children if p["end_reason"] == "recycled"]
    assert node_of[fat["master_pid"]] == "leaky"
    assert fat["verdict"] == "leak"
    for child in children:
        if node_of[child["master_pid"]] != "leaky":
            assert child["verdict"] == "stable"
    masters = [p for p in document["processes"] if p["role"] == "master"]
    assert not [p for p in masters if p["verdict"] == "leak"]
    # AND the guard asked the leaking child, and only it, to leave after its task
    recycles = [i for i in document["incidents"] if i["kind"] == "memory-soft"]
    assert [(i["pid"], i["outcome"]) for i in recycles] == [(fat["pid"], "recycled")]
    # (no signal: the child left by itself; the masters got the warm shutdown's TERM)
    sent = {(s["pid"], s["signal"]) for s in document["signals"] if s["result"] == "sent"}
    assert sent == {(p["pid"], "SIGTERM") for p in masters}
    assert document["session"]["probe_dropped"] == 0
    # AND the leaking task was diagnosed live: its line, its type, its root
    leaky = next(t for t in document["tasks"] if t["name"] == "demo.leaky")
    assert leaky["diagnosis"]["verdict"] == "leak"
    assert leaky["sites"][0]["file"].endswith("celery_warden/demo/app.py")
    assert leaky["roots"][0].startswith("celery_warden.demo.app._RESULTS[")
    assert "Diagnosis of PID" in demo.stdout
