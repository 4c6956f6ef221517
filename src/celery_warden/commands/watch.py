"""``celery-warden watch``: attach to workers already running."""

from __future__ import annotations

import shlex
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
from celery_warden.exceptions import ProcessNotFound
from celery_warden.guard import attach_guard, dump_config, guard_config
from celery_warden.runner import resolve_masters, watch_workers
from celery_warden.session import Session
from celery_warden.store import Store

__all__ = ["command"]


@click.command(
    "watch",
    epilog="\b\nExamples:\n  celery-warden watch\n  celery-warden watch --pid 4242 --duration 600",
)
@click.option("--pid", "pids", type=int, multiple=True, help="A worker's PID (repeatable).")
@click.option("--match", "pattern", help="Only workers whose command line contains this.")
@seconds_option(
    "--interval", "interval_seconds", default=1.0, minimum=0.05, help="Seconds between sweeps."
)
@seconds_option(
    "--duration",
    "duration_seconds",
    default=None,
    minimum=0.0,
    help="Stop after this many seconds (default: until Ctrl-C, or the workers stop).",
)
@click.option(
    "--act",
    is_flag=True,
    help="Let the guard act (recycle, kill, reap); without it, it decides and records only.",
)
@guard_options
@store_option
def command(
    pids: tuple[int, ...],
    pattern: str | None,
    interval_seconds: float,
    duration_seconds: float | None,
    act: bool,
    config_path: Path | None,
    print_config: bool,
    store_path: Path | None,
    **flags: Any,
) -> int:
    """Sample Celery workers that are already running, until stopped.

    Workers are found by command line (`celery ... worker`, `python -m celery ...
    worker`) or named with --pid. Out of process only: per-task figures need the probe
    (`celery-warden run`).

    The guard runs dry unless --act: every decision is logged and recorded as an
    incident (`report` shows them), and no signal is sent.
    """
    config = guard_config(config_path, guard_overrides(flags), act=act)
    if print_config:
        click.echo(dump_config(config), nl=False)
        return 0
    for pid in pids:
        if pid <= 0:
            raise ProcessNotFound(
                f"--pid {pid} names no single process (0 and negative PIDs mean process "
                "groups, -1 every process); pass the PID of a `celery ... worker` master"
            )
    masters = resolve_masters(pids, pattern)  # fail before touching the store
    store = Store.open(resolve_store(store_path))
    try:
        described = " ".join(f"--pid {p}" for p in pids) or f"--match {shlex.quote(pattern or '')}"
        session = Session(
            store,
            mode="watch",
            command=described,
            config=SamplerConfig(interval_seconds=interval_seconds),
            with_probe=False,
        )
        path = resolve_store(store_path)
        return watch_workers(
            session,
            masters,
            pattern,
            follow=not pids,
            duration_seconds=duration_seconds,
            guard=attach_guard(session, config, path),
        )
    finally:
        store.close()
