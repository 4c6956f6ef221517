"""``celery-warden collect``: the collector ``install(app)`` starts beside a worker.

Hidden: a worker starts it, not a person. It is ``watch`` with the probe's socket
(bound by the worker, passed as a descriptor): it records the worker's tree and every
task into the store until the worker has ended.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import click

from celery_warden import _procs
from celery_warden._config import SamplerConfig
from celery_warden.commands._common import resolve_store, seconds_option, store_option
from celery_warden.exceptions import ProcessNotFound
from celery_warden.runner import watch_workers
from celery_warden.session import Session
from celery_warden.store import Store

__all__ = ["command"]


@click.command("collect", hidden=True)
@click.option("--pid", type=int, required=True, help="The worker that started us.")
@click.option("--listen-fd", type=int, required=True, help="The probe's listening socket.")
@click.option("--socket", "socket_path", required=True, help="Where that socket is bound.")
@seconds_option(
    "--interval", "interval_seconds", default=1.0, minimum=0.05, help="Seconds between sweeps."
)
@store_option
def command(
    pid: int,
    listen_fd: int,
    socket_path: str,
    interval_seconds: float,
    store_path: Path | None,
) -> int:
    """Record the worker PID and its tasks until it ends (started by install(app))."""
    try:
        server = socket.socket(fileno=listen_fd)
    except OSError as exc:
        raise click.BadParameter(
            f"not a socket: {exc.strerror}", param_hint="--listen-fd"
        ) from None
    try:
        cmdline = " ".join(_procs.read_cmdline(pid))
    except (_procs.Vanished, PermissionError):
        server.close()
        raise ProcessNotFound(f"no process {pid} to collect from") from None
    try:
        store = Store.open(resolve_store(store_path))
    except BaseException:
        server.close()
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(socket_path))  # only if it is empty
        raise
    try:
        session = Session(
            store,
            mode="install",
            command=cmdline,
            config=SamplerConfig(interval_seconds=interval_seconds),
            listen_on=(socket_path, server),
        )
        return watch_workers(session, [pid], None, follow=False)
    finally:
        store.close()
