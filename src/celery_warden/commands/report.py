"""``celery-warden report``: verdicts on a recorded session."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO

import click

from celery_warden._records import Verdict
from celery_warden.analysis.report import build_report, verdict_rank
from celery_warden.commands._common import Context, resolve_store, store_option
from celery_warden.reporters import JsonReporter, TextReporter
from celery_warden.store import Store, list_sessions, read_snapshot

__all__ = ["command"]

FAIL_EXIT_CODE = 3


@click.command(
    "report",
    epilog="\b\nExamples:\n  celery-warden report\n  celery-warden report --format json "
    "--fail-on leak > report.json",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Terminal tables, or the JSON document (docs/report-schema.md).",
)
@click.option("--session", "session_id", type=int, help="Which session (default: the newest).")
@click.option("--list", "list_only", is_flag=True, help="List the recorded sessions.")
@click.option(
    "--fail-on",
    type=click.Choice(
        [
            v.value
            for v in (Verdict.LEAK, Verdict.NATIVE_LEAK, Verdict.FRAGMENTATION, Verdict.WARMING_UP)
        ]
    ),
    help=f"Exit {FAIL_EXIT_CODE} when a process's verdict is this or worse.",
)
@click.option(
    "-o", "--output", type=click.File("w"), default="-", help="Write here instead of stdout."
)
@store_option
@click.pass_obj
def command(
    ctx: Context,
    fmt: str,
    session_id: int | None,
    list_only: bool,
    fail_on: str | None,
    output: IO[str],
    store_path: Path | None,
) -> int:
    """Report on what a session recorded: per worker, per process, per task name."""
    store = Store.open(resolve_store(store_path), readonly=True)
    try:
        if list_only:
            for s in list_sessions(store.connection):
                click.echo(f"{s.id}\t{s.mode}\t{s.hostname}\t{s.command}", file=output)
            return 0
        snapshot = read_snapshot(store.connection, session_id)
    finally:
        store.close()
    report = build_report(snapshot)
    if fmt == "json":
        JsonReporter.from_report(report).render(output)
    else:
        to_terminal = output is sys.stdout or getattr(output, "name", "-") == "-"
        width = None if to_terminal else 120
        TextReporter.from_report(report, verbose=ctx.verbose > 0).render(output, width=width)
    if fail_on is not None:
        limit = verdict_rank(Verdict(fail_on))
        if any(verdict_rank(p.verdict) <= limit for p in report.processes):
            return FAIL_EXIT_CODE
    return 0
