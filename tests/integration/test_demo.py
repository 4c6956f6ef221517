"""`celery-warden demo`: the whole path on the embedded broker, no server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration._workers import warden_command

pytestmark = pytest.mark.integration


def test_the_demo_finds_the_leaking_task_and_only_it(tmp_path: Path) -> None:
    """The demo's leaking worker's child is a leak; the other workers' processes are not."""
    # GIVEN nothing but the package
    store = tmp_path / "demo.db"
    # WHEN the demo runs
    demo = subprocess.run(
        warden_command("demo", "--tasks", "900", "--store", str(store)),
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
    assert {t["name"]: t["calls"] for t in document["tasks"]} == {
        "demo.leaky": 300,
        "demo.churn": 300,
        "demo.nap": 300,
    }
    node_of = {w["master_pid"]: w["nodename"].split("@")[0] for w in document["workers"]}
    verdicts = {(node_of[p["master_pid"]], p["role"]): p["verdict"] for p in document["processes"]}
    assert verdicts[("leaky", "child")] == "leak"
    for node in ("churn", "nap"):
        assert verdicts[(node, "child")] == "stable"
    assert not [v for (node, role), v in verdicts.items() if role == "master" and v == "leak"]
    assert document["session"]["probe_dropped"] == 0
    # AND the leaking task was diagnosed live: its line, its type, its root
    leaky = next(t for t in document["tasks"] if t["name"] == "demo.leaky")
    assert leaky["diagnosis"]["verdict"] == "leak"
    assert leaky["sites"][0]["file"].endswith("celery_warden/demo/app.py")
    assert leaky["roots"][0].startswith("celery_warden.demo.app._RESULTS[")
    assert "Diagnosis of PID" in demo.stdout
