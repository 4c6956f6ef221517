"""The demo's Celery app: one task that leaks, two that do not, on an embedded broker.

The broker is kombu's filesystem transport in a folder named by ``$CELERY_WARDEN_DEMO_DIR``,
so the demo needs no server. Start a worker with
``celery -A celery_warden.demo.app worker -Q leaky``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from celery import Celery

__all__ = ["QUEUES", "app", "churn", "leaky", "nap"]

DEMO_DIR_ENV = "CELERY_WARDEN_DEMO_DIR"
QUEUES = ("leaky", "churn", "nap")
_folder = Path(os.environ.get(DEMO_DIR_ENV) or tempfile.gettempdir()) / "broker"
_control = _folder / "control"  # kombu keeps its exchange tables in ./control unless told
_control.mkdir(parents=True, exist_ok=True)

app = Celery("celery_warden_demo")
app.conf.update(
    broker_url="filesystem://localhost/",  # the host kombu would assume, without its warning
    broker_transport_options={
        "data_folder_in": str(_folder),
        "data_folder_out": str(_folder),
        "store_processed": False,
        "control_folder": str(_control),
        "polling_interval": 0.02,
    },
    task_ignore_result=True,
    task_routes={f"demo.{name}": {"queue": name} for name in QUEUES},
    worker_prefetch_multiplier=8,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

# What `leaky` keeps: a module-level list that only ever grows, the most common leak.
_RESULTS: list[list[str]] = []


@app.task(name="demo.leaky")
def leaky(n: int) -> int:
    """Keeps about 40 KB of strings per call in a module-level list: a real leak.
    Waits 3 ms too, so the guard sees it grow over seconds, not in a burst."""
    _RESULTS.append([f"record-{n}-{i:06d}" for i in range(800)])
    time.sleep(0.003)
    return len(_RESULTS)


@app.task(name="demo.churn")
def churn(n: int) -> int:
    """Builds and drops about 2 MB per call: busy, but keeps nothing."""
    rows = [{"id": i, "value": str(i) * 4} for i in range(8000)]
    return len(rows) + n


@app.task(name="demo.nap")
def nap(n: int) -> int:
    """Waits 2 ms, as an IO-bound task does: keeps nothing."""
    time.sleep(0.002)
    return n
