"""``celery-warden run -- COMMAND``: start a worker under the warden."""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from celery_warden._config import SamplerConfig
from celery_warden.commands._common import (
    guard_options,
    guard_overrides,
    resolve_store,
    seconds_option,
    store_option,
)
from celery_warden.diagnose import AutoDiagnoser
from celery_warden.guard import Guard, GuardConfig, attach_guard, dump_config, guard_config
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
@click.option(
    "--no-auto-diagnose",
    is_flag=True,
    help="Do not trace a task name automatically when attribution finds it leaks.",
)
@click.option(
    "--dry-run", is_flag=True, help="Let the guard decide and record, but send no signal."
)
@guard_options
@store_option
@click.argument("worker_command", nargs=-1, type=click.UNPROCESSED)
def command(
    interval_seconds: float,
    no_probe: bool,
    no_auto_diagnose: bool,
    dry_run: bool,
    config_path: Path | None,
    print_config: bool,
    store_path: Path | None,
    worker_command: tuple[str, ...],
    **flags: Any,
) -> int:
    """Start COMMAND (a Celery worker) under watch; exit with its exit code.

    Every process of the worker's tree is sampled and every task recorded (through a
    probe attached with no change to your code). SIGINT and SIGTERM are forwarded to
    the worker's master only, so Celery's warm shutdown lets running tasks finish.

    Every 10 minutes the session is analysed as `report` does; a task name found to
    leak is traced once, in the child that ran it most (`diagnose --task`), and the
    diagnosis stored (--no-auto-diagnose turns this off).

    The guard acts on the worker it owns (--dry-run: decide and record only):
    children over --child-soft-mib leave after their task, over --child-hard-mib
    get TERM then KILL, hung tasks are stacked and killed, orphans reaped
    (docs/configuration.md).
    """
    config = guard_config(config_path, guard_overrides(flags), act=not dry_run)
    if print_config:
        click.echo(dump_config(config), nl=False)
        return 0
    return run_under_warden(
        worker_command,
        interval_seconds,
        no_probe,
        store_path,
        auto_diagnose=not no_auto_diagnose,
        guard=config,
    )


def _seconds(text: str | None, default: float) -> float:
    try:
        value = float(text) if text else default
    except ValueError:
        return default
    return value if math.isfinite(value) else default


def run_under_warden(
    worker_command: Sequence[str],
    interval_seconds: float,
    no_probe: bool,
    store_path: Path | None,
    *,
    auto_diagnose: bool = True,
    guard: GuardConfig | None = None,
) -> int:
    """Start ``worker_command`` under a new session; return its exit code."""
    check_commands([worker_command])
    path = resolve_store(store_path)
    store = Store.open(path)
    doctor: AutoDiagnoser | None = None
    try:
        session = Session(
            store,
            mode="run",
            command=shlex.join(worker_command),
            config=SamplerConfig(interval_seconds=interval_seconds),
            with_probe=not no_probe,
        )
        check = _seconds(os.environ.get(AutoDiagnoser.CHECK_ENV), 600.0)
        if auto_diagnose and not no_probe and check > 0:
            doctor = AutoDiagnoser(path, lambda: session.session_id, check_seconds=check)
            doctor.start()
        warden: Guard | None = None
        if guard is not None:
            warden = attach_guard(session, guard, path)
        return run_workers(session, [list(worker_command)], guard=warden)
    finally:
        if doctor is not None:
            doctor.stop()
        store.close()
