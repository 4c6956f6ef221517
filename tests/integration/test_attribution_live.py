"""Attribution on a real prefork worker: which task name carries the growth."""

from __future__ import annotations

import json
import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests._support import wait_until
from tests.integration._workers import query, warden_command, worker_command, worker_env

pytestmark = pytest.mark.integration

CALLS = 3000
LEAK_BYTES = 64 * 1024


def test_only_the_leaking_name_is_blamed_in_a_mixed_pool(
    spawn: Callable[..., subprocess.Popen[bytes]],
    send: Callable[..., None],
    broker: str,
    queue: str,
    tmp_path: Path,
) -> None:
    """Two children each run a 1:9 mix of a name that keeps 64 KiB per call with two
    clean names, one of which fills and frees 8 MB in one block per call. The leaking name is a
    leak, of about the size it keeps; the clean names are stable, with zero in their
    intervals."""
    # GIVEN a prefork worker with two children under the warden
    store = tmp_path / "warden.db"
    argv = warden_command("run", "--store", str(store), "--", *worker_command(queue))
    warden = spawn(argv, env=worker_env(broker))
    wait_until(
        lambda: query(store, "SELECT count(*) FROM processes WHERE role = 'child'") == [(2,)],
        what="two pool children",
    )
    # WHEN 3,000 calls run in a random 1:9 mix
    rng = random.Random(20261202)
    for _ in range(CALLS):
        pick = rng.random()
        if pick < 0.1:
            send("testapp.leak", 1, LEAK_BYTES)
        elif pick < 0.55:
            send("testapp.noop", 1)
        else:
            send("testapp.bulge", 1, 8_000_000)
    wait_until(
        lambda: query(store, "SELECT count(*) FROM tasks WHERE ended_at IS NOT NULL") == [(CALLS,)],
        timeout=240,
        what=f"{CALLS} finished calls",
    )
    warden.send_signal(signal.SIGTERM)
    assert warden.wait(timeout=60) == 0
    # THEN the report blames the leaking name, and only it
    out = subprocess.run(
        warden_command("report", "--store", str(store), "--format", "json"),
        capture_output=True,
        text=True,
        check=True,
    )
    tasks = {t["name"]: t["memory"] for t in json.loads(out.stdout)["tasks"]}
    leak = tasks["testapp.leak"]
    assert leak["verdict"] == "leak", leak["reason"]
    # What a call really keeps is the payload plus the bytes object's header, malloc's
    # chunk overhead and the list's slot; RSS adds page and heap-step granularity.
    assert 0.8 * LEAK_BYTES <= leak["retained_bytes_per_call"] <= 1.25 * LEAK_BYTES
    assert leak["interval"]["low"] > 0
    for clean in ("testapp.noop", "testapp.bulge"):
        memory = tasks[clean]
        assert memory["verdict"] == "stable", memory["reason"]
        assert memory["interval"]["low"] <= 0 <= memory["interval"]["high"], memory["reason"]
