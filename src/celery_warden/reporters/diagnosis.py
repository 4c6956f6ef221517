"""A diagnosis at the terminal: the verdict and its evidence first, then where the
traced calls' memory is kept (sites, types, roots), then where the process's memory
is, side by side before and after."""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from celery_warden._records import Verdict
from celery_warden.analysis._format import format_bytes

__all__ = ["BREAKDOWN_ROWS", "render_diagnosis", "render_diagnosis_into"]

_STYLE = {
    Verdict.LEAK.value: "bold red",
    Verdict.NATIVE_LEAK.value: "bold red",
    Verdict.FRAGMENTATION.value: "yellow",
}

# (key in the probe's breakdown, what a person calls it)
BREAKDOWN_ROWS = (
    ("rss", "RSS"),
    ("uss", "USS (private)"),
    ("pss", "PSS"),
    ("pymalloc_arenas", "pymalloc arenas"),
    ("pymalloc_used", "  used by objects"),
    ("pymalloc_free", "  free in arenas"),
    ("tracemalloc_traced", "traced by tracemalloc"),
    ("malloc_arena", "malloc heap (arena)"),
    ("malloc_in_use", "  in use"),
    ("malloc_free", "  free in arenas"),
    ("malloc_mmapped", "malloc mmapped chunks"),
)


def _size(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else format_bytes(value)


def _short(path: str, keep: int = 3) -> str:
    parts = path.split("/")
    return "/".join(parts[-keep:]) if len(parts) > keep else path


def render_diagnosis(document: Mapping[str, Any], outfile: IO[str], *, width: int | None) -> None:
    console = Console(file=outfile, width=width, highlight=False, soft_wrap=False)
    render_diagnosis_into(console, document)


def render_diagnosis_into(console: Console, document: Mapping[str, Any]) -> None:
    """Print one diagnosis document on ``console``."""
    verdict = str(document.get("verdict", "?"))
    role = "master" if document.get("master") else "process"
    title = Text(f"PID {document.get('pid')} ({role}, pool {document.get('pool') or '?'}): ")
    title.append(verdict, style=_STYLE.get(verdict, "green"))
    console.print(title)
    for line in document.get("evidence") or ():
        console.print(f"  - {line}")
    for line in document.get("advice") or ():
        console.print(f"  what to do: {line}", style="bold")
    trace = document.get("trace")
    if trace:
        _render_trace(console, trace)
    _render_breakdown(console, document)
    census = document.get("census")
    if census:
        table = Table(title="Heap census (largest types)", title_justify="left")
        table.add_column("type")
        table.add_column("objects", justify="right")
        table.add_column("size", justify="right")
        for name, count, size in census[:15]:
            table.add_row(str(name), f"{count:,}", _size(size))
        console.print(table)
    trim = document.get("trim")
    if trim:
        console.print(
            f"malloc_trim(0) gave back {_size(trim.get('released'))} "
            f"in {float(trim.get('seconds') or 0) * 1000:.1f} ms"
        )
    if document.get("show_values"):
        console.print("values were shown on request (--show-values)", style="dim")


def _render_trace(console: Console, trace: Mapping[str, Any]) -> None:
    done = f"{trace.get('calls_traced')} of {trace.get('calls_requested')}"
    console.print(
        f"\nTraced {done} calls of {trace.get('task')} at {trace.get('frames')} frames: "
        f"each kept {_size(trace.get('kept_bytes_per_call'))}"
        + (f" ({trace['error']})" if trace.get("error") else "")
    )
    sites = trace.get("sites") or []
    if sites:
        table = Table(title="Where the kept memory was allocated", title_justify="left")
        table.add_column("file:line")
        table.add_column("per call", justify="right")
        table.add_column("blocks/call", justify="right")
        table.add_column("calls keeping", justify="right")
        table.add_column("called from")
        for site in sites[:10]:
            outer = [_short(f) for f in site.get("stack", [])[1:3]]
            table.add_row(
                f"{_short(site['file'])}:{site['line']}",
                _size(site.get("bytes_per_call")),
                f"{site.get('count_per_call', 0):.1f}",
                str(site.get("calls_keeping", "")),
                " < ".join(outer),
            )
        console.print(table)
    types = trace.get("types") or []
    if types:
        table = Table(title="Types kept per call", title_justify="left")
        table.add_column("type")
        table.add_column("objects/call", justify="right")
        table.add_column("size/call", justify="right")
        for row in types[:10]:
            table.add_row(
                str(row["type"]), f"{row['count_per_call']:.1f}", _size(row["bytes_per_call"])
            )
        console.print(table)
    for root in trace.get("roots") or []:
        console.print(f"kept {root['type']} is reachable from: {root['path']}")


def _render_breakdown(console: Console, document: Mapping[str, Any]) -> None:
    before = document.get("before")
    after = document.get("after") or document.get("breakdown") or {}
    if not after:
        return
    table = Table(title="Where the process's memory is", title_justify="left")
    table.add_column("")
    if before:
        table.add_column("before", justify="right")
    table.add_column("now" if not before else "after", justify="right")
    for key, label in BREAKDOWN_ROWS:
        if after.get(key) is None and not (before and before.get(key) is not None):
            continue
        cells = [_size(before.get(key))] if before else []
        table.add_row(label, *cells, _size(after.get(key)))
    console.print(table)
