"""``celery-warden diagnose``: look inside one live worker process, no restart."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO

import click
import psutil

from celery_warden import control
from celery_warden._argv import is_pool_title, is_worker_argv
from celery_warden._procs import Vanished, find_worker_masters, read_cmdline
from celery_warden.commands._common import resolve_store, seconds_option, store_option
from celery_warden.diagnose import diagnose, store_diagnosis
from celery_warden.exceptions import NoWorkerFound, StoreError, UsageError, WardenError
from celery_warden.guard._stacks import find_py_spy
from celery_warden.reporters.diagnosis import render_diagnosis

__all__ = ["command", "nodename_of", "probed_children"]

_EPILOG = """\b
Examples:
  celery-warden diagnose 4242                        where pid 4242's memory is
  celery-warden diagnose --worker w1@host --task proj.tasks.fetch --calls 50
  celery-warden diagnose 4242 --trim                 and what malloc_trim gives back
"""


def nodename_of(argv: list[str], hostname: str) -> str:
    """The node name a worker's command line gives it (``-n``/``--hostname``, with
    Celery's ``%h``, ``%n`` and ``%d``), ``celery@<host>`` by default."""
    name = "celery@%h"
    for i, arg in enumerate(argv):
        if arg in ("-n", "--hostname") and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--hostname="):
            name = arg.partition("=")[2]
        elif arg.startswith("-n") and len(arg) > 2 and not arg.startswith("--"):
            name = arg[2:]
    short, _, domain = hostname.partition(".")
    return name.replace("%h", hostname).replace("%n", short).replace("%d", domain)


def _pick_child(name: str) -> int:
    """The fattest live process of worker ``name`` that has a probe to ask: a pool
    child when there are children, else the master (solo, threads)."""
    hostname = socket.gethostname()
    matches = []
    for pid in find_worker_masters():
        try:
            node = nodename_of(read_cmdline(pid), hostname)
        except (Vanished, PermissionError):
            continue
        if name in (node, node.partition("@")[0]):
            matches.append((pid, node))
    if not matches:
        raise NoWorkerFound(f"no running Celery worker named {name!r} on this host")
    if len(matches) > 1:
        shown = ", ".join(f"{node} (pid {pid})" for pid, node in matches)
        raise UsageError(f"{name!r} names several workers: {shown}; pass a PID")
    master = matches[0][0]
    candidates = []
    for child in probed_children(master):
        try:
            candidates.append((child.memory_full_info().uss, child.pid))
        except psutil.Error:
            continue
    return max(candidates)[1] if candidates else master


def probed_children(master: int) -> list[psutil.Process]:
    """The pool children of ``master`` that have a probe to ask."""
    try:
        children = psutil.Process(master).children()
    except psutil.Error:
        return []
    probed = []
    for child in children:
        try:
            argv = child.cmdline()
            if is_worker_argv(argv) or is_pool_title(argv):
                control.socket_for(child.pid)
                probed.append(child)
        except (psutil.Error, WardenError):
            continue
    return probed


def _stacks_without_probe(pid: int, reason: control.NoProbe) -> int:
    """What can still be seen of a process without the probe: its stacks, by py-spy."""
    click.echo(f"celery-warden: {reason}", err=True)
    spy = find_py_spy()
    if spy is None:
        click.echo(
            "celery-warden: without the probe only stacks can be read, with py-spy "
            "(pip install 'celery-warden[stacks]')",
            err=True,
        )
        return 1
    click.echo(
        f"celery-warden: stacks of PID {pid} by py-spy (no heap without the probe):", err=True
    )
    try:
        done = subprocess.run(
            [spy, "dump", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        click.echo("celery-warden: py-spy did not finish within 60 s", err=True)
        return 1
    if done.returncode != 0:
        line = (done.stderr.strip().splitlines() or ["no output"])[-1]
        click.echo(f"celery-warden: py-spy could not read PID {pid}: {line}", err=True)
        return 1
    click.echo(done.stdout)
    return 1


@click.command("diagnose", epilog=_EPILOG)
@click.argument("pid", type=int, required=False)
@click.option(
    "--worker", "worker", help="A worker's node name (w1@host, or w1): its fattest child."
)
@click.option("--task", "task", help="Trace the next calls of this task name in the process.")
@click.option(
    "--calls",
    type=click.IntRange(1, 1000),
    default=50,
    show_default=True,
    help="How many calls of --task to trace (as many more run untraced, measured).",
)
@click.option(
    "--frames",
    type=click.IntRange(1, 64),
    default=10,
    show_default=True,
    help="tracemalloc's frames per allocation (deeper: slower traced calls).",
)
@seconds_option(
    "--timeout",
    "timeout_seconds",
    default=600.0,
    minimum=1.0,
    help="Give up tracing after this long, with what was traced.",
)
@click.option(
    "--trim", is_flag=True, help="Measure what malloc_trim(0) gives back (a short pause)."
)
@click.option(
    "--show-values",
    is_flag=True,
    help="Let dict keys appear on referrer paths (recorded; reports are redacted otherwise).",
)
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.option("--no-store", is_flag=True, help="Print only; do not record the diagnosis.")
@click.option("-o", "--output", type=click.File("w"), default="-", help="Write here, not stdout.")
@store_option
def command(
    pid: int | None,
    worker: str | None,
    task: str | None,
    calls: int,
    frames: int,
    timeout_seconds: float,
    trim: bool,
    show_values: bool,
    fmt: str,
    no_store: bool,
    output: IO[str],
    store_path: Path | None,
) -> int:
    """Where one live worker process's memory is, and, with --task, what the next calls
    of a task name keep: the source lines, the types, and the roots that hold them.

    It asks the probe in the process (started by `celery-warden run` or
    `celery_warden.install(app)`) over a private unix socket; nothing restarts and
    the other task names run untraced. The verdict (leak, native-leak, fragmentation,
    stable) is printed and stored for `report`.
    """
    if (pid is None) == (worker is None):
        raise UsageError("name one process: a PID, or --worker NAME")
    target = pid if pid is not None else _pick_child(str(worker))

    def armed() -> None:
        click.echo(
            f"celery-warden: tracing the next {calls} calls of {task} in PID {target} "
            f"(at most {timeout_seconds:g} s)...",
            err=True,
        )

    try:
        document = diagnose(
            target,
            task=task,
            calls=calls,
            frames=frames,
            timeout=timeout_seconds,
            trim=trim,
            show_values=show_values,
            on_armed=armed,
        )
    except control.NoProbe as exc:
        return _stacks_without_probe(target, exc)
    if not no_store:
        path = resolve_store(store_path)
        try:
            number = store_diagnosis(path, document)
        except StoreError as exc:
            click.echo(f"celery-warden: not stored: {exc}", err=True)
        else:
            document["stored"] = {"store": str(path), "id": number}
    if fmt == "json":
        json.dump(document, output, indent=2)
        output.write("\n")
    else:
        to_terminal = output is sys.stdout or getattr(output, "name", "-") == "-"
        render_diagnosis(document, output, width=None if to_terminal else 120)
    return 0
