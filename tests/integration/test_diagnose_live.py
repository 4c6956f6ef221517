"""``celery-warden diagnose`` on real prefork workers with planted faults: the verdict,
the source line, the type, and the root that keeps the memory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests._support import wait_until
from tests.integration._workers import APP_DIR, BROKERS, query, warden_command, worker_env

pytestmark = pytest.mark.integration

FAULTS_FILE = APP_DIR / "warden_faults.py"
CALLS = 20
_CACHE_ROOT = "functools.lru_cache of warden_faults.lookup"


def _site_line(name: str) -> int:
    for number, line in enumerate(FAULTS_FILE.read_text().splitlines(), start=1):
        if line.rstrip().endswith(f"# site: {name}"):
            return number
    raise AssertionError(f"no site {name} in {FAULTS_FILE}")


def _faults_worker(queue: str) -> list[str]:
    """A prefork worker of the faults app with one child, on this test's queue."""
    return [
        sys.executable, "-m", "celery", "-A", "warden_faults", "worker",
        "--pool", "prefork", "-c", "1", "-Q", queue, "-n", f"{queue}@%h", "-l", "warning",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


@pytest.fixture
def faults_worker(
    spawn: Callable[..., subprocess.Popen[bytes]], queue: str, tmp_path: Path
) -> tuple[Path, str]:
    """A prefork worker with one child running the faults app, under the warden."""
    store = tmp_path / "warden.db"
    worker = _faults_worker(queue)
    spawn(warden_command("run", "--store", str(store), "--", *worker), env=_env())
    wait_until(
        lambda: query(store, "SELECT count(*) FROM processes WHERE role = 'child'") == [(1,)],
        what="the pool child",
    )
    return store, queue


def _env() -> dict[str, str]:
    return worker_env(BROKERS["redis"])


def _sender(queue: str) -> Callable[[str, int], None]:
    from celery import Celery

    app = Celery("warden_faults_client", broker=BROKERS["redis"])
    app.conf.broker_connection_retry_on_startup = True

    def send(name: str, count: int) -> None:
        with app.producer_or_acquire() as producer:
            for _ in range(count):
                app.send_task(name, queue=queue, producer=producer)

    return send


def _diagnose(
    spawn: Callable[..., subprocess.Popen[bytes]], store: Path, queue: str, task: str, *extra: str
) -> dict[str, Any]:
    """Run ``diagnose --task`` on the worker's child while calls of ``task`` arrive."""
    send = _sender(queue)
    send(task, 3)  # warm-up calls, before the trace: first-call caches are not leaks
    argv = warden_command(
        "diagnose", "--worker", queue, "--task", task, "--calls", str(CALLS),
        "--timeout", "120", "--format", "json", "--store", str(store), *extra,
    )  # fmt: skip
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    deadline = time.monotonic() + 150
    while proc.poll() is None and time.monotonic() < deadline:
        send(task, 2)
        time.sleep(0.3)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    document: dict[str, Any] = json.loads(out)
    return document


def _assert_found(document: dict[str, Any], verdict: str, site: str, kind: str, root: str) -> None:
    assert document["verdict"] == verdict, document["evidence"]
    trace = document["trace"]
    assert trace["calls_traced"] == CALLS
    top = trace["sites"][0]
    assert f"{FAULTS_FILE}:{_site_line(site)}" in top["stack"], top
    assert top["calls_keeping"] >= CALLS // 2
    assert kind in [t["type"] for t in trace["types"][:5]], trace["types"]
    paths = [r["path"] for r in trace["roots"]]
    assert any(p.startswith(root) for p in paths), paths


@pytest.mark.parametrize(
    ("task", "site", "kind", "root"),
    [
        ("faults.records", "records", "warden_faults.Record", "warden_faults.RECORDS["),
        ("faults.cache", "cache", "warden_faults.Profile", _CACHE_ROOT),
        ("faults.listeners", "listeners", "function", "warden_faults.LISTENERS["),
        ("faults.errors", "errors", "ValueError", "warden_faults.ERRORS["),
    ],
)  # fmt: skip
def test_a_python_leak_is_found_with_its_line_type_and_root(
    spawn: Callable[..., subprocess.Popen[bytes]],
    faults_worker: tuple[Path, str],
    task: str,
    site: str,
    kind: str,
    root: str,
) -> None:
    """Each planted Python leak: verdict leak, the marked line on the top site's call
    path, the planted type among the kept types, the planted global as the root; the
    diagnosis is stored and `report` shows it."""
    store, queue = faults_worker
    document = _diagnose(spawn, store, queue, task)
    _assert_found(document, "leak", site, kind, root)
    # redacted by default: no key or value text on any path
    assert not document["show_values"]
    rows = query(store, "SELECT task_name, verdict FROM diagnoses")
    assert rows == [(task, "leak")]


def test_a_stored_traceback_root_names_the_frame(
    spawn: Callable[..., subprocess.Popen[bytes]], faults_worker: tuple[Path, str]
) -> None:
    """The stored exception keeps its frame: the path goes through the traceback."""
    store, queue = faults_worker
    document = _diagnose(spawn, store, queue, "faults.errors")
    paths = [r["path"] for r in document["trace"]["roots"]]
    assert any("__traceback__" in p and "errors" in p for p in paths), paths


def test_a_native_leak_is_told_from_a_python_one(
    spawn: Callable[..., subprocess.Popen[bytes]], faults_worker: tuple[Path, str]
) -> None:
    """ctypes malloc, never freed: tracemalloc sees nothing kept, malloc's bytes in use
    grow by about 64 KiB a call: native-leak."""
    store, queue = faults_worker
    document = _diagnose(spawn, store, queue, "faults.native")
    assert document["verdict"] == "native-leak", document["evidence"]
    grown = document["after"]["malloc_in_use"] - document["before"]["malloc_in_use"]
    assert grown >= CALLS * 64 * 1024 * 0.9
    assert document["trace"]["kept_bytes_per_call"] < 1024


def test_a_high_water_plateau_is_fragmentation_not_a_leak(
    spawn: Callable[..., subprocess.Popen[bytes]], faults_worker: tuple[Path, str]
) -> None:
    """~100 MB built and freed per call: no leak, the allocator keeps the freed memory,
    and malloc_trim(0) gives most of it back."""
    store, queue = faults_worker
    document = _diagnose(spawn, store, queue, "faults.churn", "--trim")
    assert document["verdict"] == "fragmentation", document["evidence"]
    assert document["after"]["malloc_free"] > 50 * 2**20
    assert document["trim"]["released"] > 50 * 2**20


def test_diagnose_bad_targets_get_one_line(
    spawn: Callable[..., subprocess.Popen[bytes]], faults_worker: tuple[Path, str]
) -> None:
    """A process without the probe, the prefork master with --task, an unknown PID:
    one line on stderr, a non-zero exit, no traceback."""
    store, _queue = faults_worker
    master = wait_until(lambda: query(store, "SELECT pid FROM workers"), what="the master")[0][0]  # type: ignore[index]
    sleeper = spawn(["sleep", "60"])
    cases = {
        str(sleeper.pid): "no celery-warden probe",
        str(master): "master of a prefork pool",
        "999999999": "no process",
    }
    for pid, expected in cases.items():
        done = subprocess.run(
            warden_command("diagnose", pid, "--task", "faults.noop", "--no-store"),
            capture_output=True, text=True, env=_env(), timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode != 0
        assert expected in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    # the same through Celery's own command line
    celery = [sys.executable, "-m", "celery", "-A", "warden_faults", "warden", "diagnose"]
    done = subprocess.run(
        [*celery, str(sleeper.pid), "--no-store"],
        capture_output=True, text=True, env=_env(), timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "no celery-warden probe" in done.stderr, done.stderr


def test_the_master_answers_for_its_own_memory(
    spawn: Callable[..., subprocess.Popen[bytes]], faults_worker: tuple[Path, str]
) -> None:
    """A prefork master runs no task, but its memory can be asked for."""
    store, _queue = faults_worker
    master = wait_until(lambda: query(store, "SELECT pid FROM workers"), what="the master")[0][0]  # type: ignore[index]
    done = subprocess.run(
        warden_command("diagnose", str(master), "--format", "json", "--store", str(store)),
        capture_output=True, text=True, env=_env(), timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["master"] is True
    assert document["breakdown"]["uss"] > 0
    assert document["census"]  # the heap's types, by size
    assert document["verdict"] in {"insufficient-data", "fragmentation"}


def test_without_the_probe_the_stacks_are_read_with_py_spy(
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    """A Python process with no probe: what it is waiting in, by py-spy, and how to
    attach the probe; exit 1, since no diagnosis was made."""
    code = (
        "import time\ndef waiting_here():\n    print('ready', flush=True)\n"
        "    time.sleep(60)\nwaiting_here()\n"
    )
    sleeper = spawn([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert sleeper.stdout is not None
    assert sleeper.stdout.readline() == b"ready\n"
    done = subprocess.run(
        warden_command("diagnose", str(sleeper.pid), "--no-store"),
        capture_output=True, text=True, env=_env(), timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "no celery-warden probe" in done.stderr
    assert "celery-warden run" in done.stderr
    assert "waiting_here" in done.stdout, done.stderr


def test_a_child_that_dies_mid_diagnosis_is_one_line(
    spawn: Callable[..., subprocess.Popen[bytes]], faults_worker: tuple[Path, str]
) -> None:
    """The traced child is killed while the trace waits: diagnose says so and exits 1;
    the worker replaces the child and goes on."""
    store, _queue = faults_worker
    child = query(store, "SELECT pid FROM processes WHERE role = 'child'")[0][0]
    argv = warden_command(
        "diagnose", str(child), "--task", "faults.noop", "--calls", "1000", "--no-store"
    )
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    assert proc.stderr is not None
    assert b"tracing" in proc.stderr.readline()  # printed just before the request goes
    time.sleep(1.0)
    os.kill(int(str(child)), signal.SIGKILL)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    message = err.decode()
    assert re.search(r"exited before it answered|closed the connection", message), message
    assert "Traceback" not in message


def test_run_traces_a_leaking_name_by_itself(
    spawn: Callable[..., subprocess.Popen[bytes]], queue: str, tmp_path: Path
) -> None:
    """Under `run`, once attribution names a leaking task, the warden traces it in the
    child that ran it and stores the diagnosis, with nobody asking."""
    store = tmp_path / "warden.db"
    worker = _faults_worker(queue)
    env = {**_env(), "CELERY_WARDEN_AUTO_DIAGNOSE_SECONDS": "3"}
    spawn(warden_command("run", "--store", str(store), "--", *worker), env=env)
    send = _sender(queue)
    deadline = time.monotonic() + 240
    found: list[tuple[object, ...]] = []
    while not found and time.monotonic() < deadline:
        send("faults.records", 20)
        time.sleep(0.5)
        found = query(store, "SELECT task_name, verdict, document FROM diagnoses")
    assert found, "no automatic diagnosis"
    task_name, verdict, document = found[0]
    assert (task_name, verdict) == ("faults.records", "leak"), json.loads(str(document))["evidence"]
    trace = json.loads(str(document))["trace"]
    assert f"{FAULTS_FILE}:{_site_line('records')}" in trace["sites"][0]["stack"]
