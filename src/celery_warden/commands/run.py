"""``celery-warden run -- COMMAND``: start a worker under the warden."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

import click

from celery_warden._config import SamplerConfig
from celery_warden.commands._common import resolve_store, seconds_option, store_option
from celery_warden.runner import check_commands, run_workers
from celery_warden.session import Session
from celery_warden.store import Store

__all__ = ["command", "run_under_warden"]


interval_option = seconds_option(
    "--interval",
    "interval_seconds",
    default=1.0,
    minimum=0.05,
    help="Seconds between sweeps of the worker tree.",
)


@click.command(
    "run",
    context_settings={"ignore_unknown_options": True},
    epilog="\b\nExample:\n  celery-warden run --interval 2 -- celery -A proj worker -c 4",
)
@interval_option
@click.option("--no-probe", is_flag=True, help="Do not attach the in-worker probe.")
@store_option
@click.argument("worker_command", nargs=-1, type=click.UNPROCESSED)
def command(
    interval_seconds: float,
    no_probe: bool,
    store_path: Path | None,
    worker_command: tuple[str, ...],
) -> int:
    """Start COMMAND (a Celery worker) under watch; exit with its exit code.

    Every process of the worker's tree is sampled and every task recorded (through a
    probe attached with no change to your code). SIGINT and SIGTERM are forwarded to
    the worker's master only, so Celery's warm shutdown lets running tasks finish.
    """
    return run_under_warden(worker_command, interval_seconds, no_probe, store_path)


def run_under_warden(
    worker_command: Sequence[str],
    interval_seconds: float,
    no_probe: bool,
    store_path: Path | None,
) -> int:
    """Start ``worker_command`` under a new session; return its exit code."""
    check_commands([worker_command])
    store = Store.open(resolve_store(store_path))
    try:
        session = Session(
            store,
            mode="run",
            command=shlex.join(worker_command),
            config=SamplerConfig(interval_seconds=interval_seconds),
            with_probe=not no_probe,
        )
        return run_workers(session, [list(worker_command)])
    finally:
        store.close()
