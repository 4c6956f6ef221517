"""``celery-warden demo``: the whole path end to end, with no server to install.

Three workers of a bundled app (one queue each) run under the warden on kombu's
filesystem transport; one task leaks, two do not. The demo sends the tasks, shows the
progress, lets the guard recycle the leaking child softly once its private memory
passes a threshold, stops the workers with a warm shutdown and prints the report.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from celery_warden._procs import find_worker_masters
from celery_warden.analysis.report import build_report
from celery_warden.commands._common import Context
from celery_warden.commands.diagnose import probed_children
from celery_warden.diagnose import diagnose, store_diagnosis
from celery_warden.exceptions import NoWorkerFound, WardenError
from celery_warden.guard import attach_guard, load_config
from celery_warden.reporters import TextReporter
from celery_warden.runner import forward_to_masters, run_workers
from celery_warden.session import Session
from celery_warden.store import Store, read_snapshot

__all__ = ["command"]

_QUEUES = ("leaky", "churn", "nap")
_START_TIMEOUT_SECONDS = 60.0
_STALL_SECONDS = 20.0
# The leaking child passes 48 MiB of private memory about half way through the default
# run (its siblings stay under 30 MiB): the guard asks it to leave after its task, and a
# fresh child takes over. The hard threshold is out of reach, on purpose.
_GUARD = {"memory.child_soft_mib": 48, "memory.child_hard_mib": 1024, "act": True}


def _worker_command(queue: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "celery_warden.demo.app", "worker",
        "--pool", "prefork", "-c", "1", "-Q", queue, "-n", f"{queue}@%h",
        "-l", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


@click.command("demo")
@click.option(
    "--tasks",
    "task_count",
    type=click.IntRange(min=30),
    default=3000,
    show_default=True,
    help="How many tasks to send, spread over the three task names.",
)
@click.option(
    "--store",
    "store_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Keep the demo's store here (default: a temporary folder, removed after).",
)
@click.pass_obj
def command(ctx: Context, task_count: int, store_path: Path | None) -> int:
    """Run a bundled leaking app under the warden and show what it finds.

    Needs no server: the broker is a folder (kombu's filesystem transport).
    """
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="celery-warden-demo-") as folder:
        os.environ["CELERY_WARDEN_DEMO_DIR"] = folder
        store = Store.open(store_path or Path(folder) / "warden.db")
        try:
            # kombu's filesystem transport can read a message file while it is still
            # being written (the worker then dies on a JSON error), so every message is
            # queued before any worker starts.
            _queue_tasks(task_count)
            session = Session(
                store, mode="demo", command=f"celery-warden demo --tasks {task_count}"
            )
            guard = attach_guard(session, load_config(None, _GUARD), store.path)
            diagnosis = _Diagnosis(store.path, console)
            driver = threading.Thread(
                target=_follow, args=(session, task_count, console, diagnosis), daemon=True
            )
            driver.start()
            with (Path(folder) / "workers.log").open("wb") as log:
                run_workers(
                    session,
                    [_worker_command(q) for q in _QUEUES],
                    stdout=log,
                    stderr=log,
                    guard=guard,
                )
            driver.join(timeout=5)
            report = build_report(read_snapshot(store.connection, session.session_id))
        finally:
            store.close()
    TextReporter.from_report(report, verbose=ctx.verbose > 0).render(sys.stdout)
    return 0


def _queue_tasks(task_count: int) -> None:
    # Imported late, on purpose: the app reads its broker folder from the environment.
    from celery_warden.demo.app import churn, leaky, nap  # noqa: PLC0415

    tasks = (leaky, churn, nap)
    with leaky.app.producer_or_acquire() as producer:
        for n in range(task_count):
            tasks[n % len(tasks)].apply_async((n,), producer=producer)


class _Diagnosis:
    """What `celery-warden diagnose --worker leaky --task demo.leaky` does: trace the
    leaking task's next calls in its live child and store the finding for the report.

    Armed as soon as the child answers: its calls are quick and were all queued before
    it started (the demo's broker needs that), so waiting would find them done."""

    CALLS = 20
    READY_SECONDS = 60.0

    def __init__(self, store_path: Path, console: Console) -> None:
        self.store_path = store_path
        self.console = console
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _child(self) -> int:
        deadline = time.monotonic() + self.READY_SECONDS
        while True:
            for master in find_worker_masters("leaky@"):
                for child in probed_children(master):
                    return child.pid
            if time.monotonic() > deadline:
                raise NoWorkerFound("the leaky worker's child did not start")
            time.sleep(0.05)

    def _run(self) -> None:
        try:
            child = self._child()
            self.console.print(
                f"[bold]diagnose[/]: tracing the next {self.CALLS} calls of demo.leaky "
                f"in its child, PID {child}"
            )
            document = diagnose(
                child, task="demo.leaky", calls=self.CALLS, timeout=60, census=False
            )
            store_diagnosis(self.store_path, document)
        except (WardenError, psutil.Error) as exc:
            self.console.print(f"[yellow]diagnose: could not run ({exc})[/]")


def _follow(session: Session, task_count: int, console: Console, diagnosis: _Diagnosis) -> None:
    """Show progress until every task ran (or the workers stall), then stop them;
    diagnose the leaking task on the way."""
    try:
        with Progress(
            TextColumn("[bold]tasks"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("tasks", total=task_count)
            diagnosis.thread.start()
            stalled_at = time.monotonic() + _START_TIMEOUT_SECONDS
            last = -1
            while session.tasks_finished < task_count and time.monotonic() < stalled_at:
                done = session.tasks_finished
                if done != last:
                    last, stalled_at = done, time.monotonic() + _STALL_SECONDS
                progress.update(bar, completed=done)
                time.sleep(0.1)
            progress.update(bar, completed=session.tasks_finished)
        time.sleep(1.5)  # one more sweep after the last task
        if diagnosis.thread.ident is not None:
            diagnosis.thread.join(timeout=120)
    finally:
        forward_to_masters(session, signal.SIGTERM, [])
