"""``celery_warden.install(app)``: the probe for workers started without the warden.

One line in the module that creates the Celery app. It does nothing until a worker
starts in this process (importing the app in a web process, in ``beat`` or in a shell
costs nothing and records nothing). When a ``celery worker`` starts:

- under ``celery-warden run`` (or ``celery warden run``), the warden is already
  listening: the probe sends to it, as it would with no code change;
- otherwise the worker starts a collector beside itself, ``python -m celery_warden
  collect``, which is exactly what ``run`` does minus starting the worker: it samples
  the worker's tree, receives the probe's messages and writes the same records to the
  store. The probe's socket is bound here, before any pool child forks, and handed to
  the collector, so no message is lost while it starts; the worker holds no thread of
  the warden's (a thread in a process that forks pool children is a hazard).

If the collector cannot start or dies, the worker runs exactly as before and the probe
drops (and counts) what it cannot send.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from celery_warden._argv import is_worker_argv
from celery_warden.probe._boot import SOCKET_ENV

__all__ = ["install"]

log = logging.getLogger("celery_warden")


def install(
    app: Any = None,
    *,
    store: str | os.PathLike[str] | None = None,
    interval_seconds: float = 1.0,
) -> None:
    """Record every task of the Celery workers this process starts.

    Args:
        app: The Celery app. When given, only its workers are recorded.
        store: Where the collector keeps its history (default: ``$CELERY_WARDEN_STORE``,
            else the user's state directory, as for every command).
        interval_seconds: Seconds between two samples of the worker's processes.

    Only a process started as a worker (``celery ... worker``, ``python -m celery ...
    worker``) starts a collector; a worker embedded in a test suite does not.
    """
    from celery import signals

    from celery_warden.probe._hooks import connect

    path = os.environ.get(SOCKET_ENV)
    if path:  # a warden already listens for this worker
        connect(path)
        return

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if app is not None and getattr(sender, "app", app) is not app:
            return
        argv = getattr(sys, "orig_argv", sys.argv)
        if not is_worker_argv(argv):
            return
        try:
            socket_path = _start_collector(store, interval_seconds)
        except Exception as exc:  # the worker must start whatever happens here
            log.warning("celery-warden: the collector did not start (%s); not recording", exc)
            return
        # A worker restarted by SIGHUP re-execs itself with the same PID: its collector
        # goes on, and the environment, which survives the exec, leads the new image's
        # install() back to it instead of starting a second one.
        os.environ[SOCKET_ENV] = socket_path
        connect(socket_path)

    signals.worker_init.connect(on_worker_init, weak=False, dispatch_uid="celery_warden.install")


def _start_collector(store: str | os.PathLike[str] | None, interval_seconds: float) -> str:
    """Bind the probe's socket, start the collector with it, and return its path."""
    from celery_warden.listener import bind_server

    private_dir = tempfile.mkdtemp(prefix="celery-warden-")  # mode 0700
    socket_path = os.path.join(private_dir, "probe.sock")
    server = bind_server(socket_path)
    argv = [
        sys.executable,
        "-m",
        "celery_warden",
        "collect",
        "--pid",
        str(os.getpid()),
        "--listen-fd",
        str(server.fileno()),
        "--socket",
        socket_path,
        "--interval",
        repr(float(interval_seconds)),
    ]
    if store is not None:
        argv += ["--store", str(Path(store))]
    try:
        # A session of its own: Ctrl-C in the worker's terminal reaches the worker, which
        # shuts down warmly while the collector records it, then ends with it.
        subprocess.Popen(
            argv,
            pass_fds=(server.fileno(),),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except BaseException:
        os.unlink(socket_path)
        os.rmdir(private_dir)
        raise
    finally:
        server.close()  # the collector holds it now; pool children must not
    return socket_path
