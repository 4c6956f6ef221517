"""The terminal report: rich tables, verdicts first, one line per worker, process and
task name."""

from __future__ import annotations

import datetime
from typing import IO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from celery_warden._records import Incident, Outcome, Role, Verdict
from celery_warden.analysis._format import bytes_unit, format_bytes, format_duration
from celery_warden.analysis.attribution import TaskAttribution
from celery_warden.analysis.report import ProcessReport, Report
from celery_warden.reporters.diagnosis import render_diagnosis_into

__all__ = ["TextReporter"]

_STYLE = {
    Verdict.LEAK: "bold red",
    Verdict.NATIVE_LEAK: "bold red",
    Verdict.FRAGMENTATION: "yellow",
    Verdict.WARMING_UP: "yellow",
    Verdict.STABLE: "green",
    Verdict.INSUFFICIENT_DATA: "dim",
}


# The outcomes where the guard ended a process by force, or could not do what it meant to.
_FORCED = frozenset({Outcome.KILLED, Outcome.TERMINATED, Outcome.FAILED})
_STACK_LINES = 12  # the innermost frames: where the process was stuck or growing


def _size(value: float | None) -> str:
    return "-" if value is None else format_bytes(value)


def _slope(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{format_bytes(value)}/{unit}"


def _verdict(verdict: Verdict) -> Text:
    return Text(str(verdict), style=_STYLE[verdict])


def _life(p: ProcessReport) -> str:
    if p.ended_at is None:
        return "alive"
    code = "" if p.exit_code is None else f" ({p.exit_code})"
    return f"{p.end_reason or 'ended'}{code}"


class TextReporter:
    """Renders a report for a person at a terminal."""

    def __init__(self, report: Report, *, verbose: bool = False) -> None:
        self.report = report
        self.verbose = verbose

    @classmethod
    def from_report(cls, report: Report, *, verbose: bool = False) -> TextReporter:
        return cls(report, verbose=verbose)

    def render(self, outfile: IO[str], *, width: int | None = None) -> None:
        console = Console(file=outfile, width=width, highlight=False)
        if width is None and not console.is_terminal:
            console.width = 120  # rich's 80 columns wrap every row of these tables
        r = self.report
        started = datetime.datetime.fromtimestamp(r.session.started_at).strftime("%Y-%m-%d %H:%M")
        if r.session.ended_at is None:
            # Still recording, or its warden was killed before it could close it.
            span = "not closed (still recording, or its warden was stopped abruptly)"
        else:
            span = format_duration(r.session.ended_at - r.session.started_at)
        console.print(
            f"[bold]celery-warden[/] session {r.session.id} ({r.session.mode}) on "
            f"{r.session.hostname}, {started}, {span}: {r.session.command}"
        )
        if not r.processes:
            console.print("No worker process was seen in this session.")
            return
        self._diagnoses(console)
        self._incidents(console)
        console.print(self._workers())
        console.print(self._processes())
        self._findings(console)
        if r.tasks:
            console.print(self._tasks())
            self._task_findings(console)
        if r.session.probe_dropped:
            console.print(
                f"[yellow]The probe dropped {r.session.probe_dropped} messages "
                "(the warden was slow or absent).[/]"
            )

    def _diagnoses(self, console: Console) -> None:
        """The newest diagnosis of each diagnosed process, first: it says why and where."""
        for p in self.report.processes:
            if p.diagnosis is not None:
                console.print(
                    f"\n[bold]Diagnosis[/] of PID {p.pid} at "
                    + datetime.datetime.fromtimestamp(p.diagnosis.at).strftime("%H:%M:%S")
                )
                render_diagnosis_into(console, p.diagnosis.document)
        if any(p.diagnosis is not None for p in self.report.processes):
            console.print()

    def _incidents(self, console: Console) -> None:
        """What the guard did (or would have), one line each, then the tail of the stack
        it captured before acting: the reason a person reads the report after a kill."""
        if not self.report.incidents:
            return
        console.print("\n[bold]Incidents[/]")
        for incident in self.report.incidents:
            console.print(_incident_line(incident))
            if incident.stack:
                tail = incident.stack.rstrip("\n").splitlines()[-_STACK_LINES:]
                console.print(Text("\n".join("      " + line for line in tail), style="dim"))
        console.print()

    def _workers(self) -> Table:
        table = Table(title="Workers", title_justify="left")
        columns = ("verdict", "master", "node", "pool", "children", "processes", "tasks")
        for column in (*columns, "RSS", "USS"):
            numeric = column in {"children", "processes", "tasks"}
            table.add_column(column, justify="right" if numeric else "left")
        for w in self.report.workers:
            table.add_row(
                _verdict(w.verdict),
                str(w.master_pid),
                w.nodename or "-",
                f"{w.pool or '?'} x{w.concurrency}" if w.concurrency else (w.pool or "-"),
                str(w.children_alive),
                str(w.processes),
                f"{w.tasks_run:,}",
                format_bytes(w.rss_bytes),
                _size(w.uss_bytes),
            )
        return table

    def _processes(self) -> Table:
        table = Table(title="Processes", title_justify="left")
        columns = ("verdict", "pid", "role", "life", "tasks", "now", "peak", "per task", "per hour")
        for column in columns:
            table.add_column(column)
        shown = [
            p
            for p in self.report.processes
            if self.verbose or p.role is not Role.DESCENDANT or p.verdict is Verdict.LEAK
        ]
        for p in shown:
            metric = p.memory.metric.upper()
            now = p.uss_bytes if metric == "USS" and p.uss_bytes is not None else p.rss_bytes
            peak = p.uss_peak_bytes if metric == "USS" else p.rss_peak_bytes
            table.add_row(
                _verdict(p.verdict),
                str(p.pid),
                str(p.role),
                _life(p),
                f"{p.tasks_run:,}",
                f"{_size(now)} {metric}",
                _size(peak),
                _slope(p.memory.slope_bytes_per_task, "task"),
                _slope(p.memory.slope_bytes_per_hour, "h"),
            )
        hidden = len(self.report.processes) - len(shown)
        if hidden:
            table.caption = f"{hidden} task-spawned processes not shown (-v shows them)"
        return table

    def _findings(self, console: Console) -> None:
        for p in self.report.processes:
            if p.verdict in (Verdict.LEAK, Verdict.WARMING_UP) or self.verbose:
                console.print(f"  [{_STYLE[p.verdict]}]{p.role} {p.pid}[/]: {p.memory.reason}")
            for g in p.growth:
                console.print(f"  [bold red]{g.kind}[/] in {p.role} {p.pid}: {g.reason}")
            if p.missing and self.verbose:
                console.print(f"  [dim]{p.role} {p.pid}: not read: {', '.join(p.missing)}[/]")

    def _tasks(self) -> Table:
        """Leaking task names first, with the bytes each call keeps; then how the calls
        spend their time (CPU or waiting) and how they end."""
        table = Table(title="Tasks", title_justify="left")
        columns = (
            "memory",
            "task",
            "calls",
            "kept/call",
            "interval",
            "class",
            "cpu p50",
            "wall p50",
            "wall p95",
            "failures",
        )
        for column in columns:
            table.add_column(column, justify="left" if column in {"memory", "task"} else "right")
        for t in self.report.tasks:
            s, m = t.summary, t.memory
            kept, interval = _kept(m)
            table.add_row(
                _verdict(m.verdict) if m is not None else Text("-", style="dim"),
                s.name,
                f"{s.calls:,}",
                kept,
                interval,
                s.cpu_class or "-",
                _ms(s.cpu_p50_seconds),
                _ms(s.wall_p50_seconds),
                _ms(s.wall_p95_seconds),
                f"{s.failures:,}",
            )
        captions = []
        if any(t.memory is not None for t in self.report.tasks):
            level = self.report.tasks[0].confidence
            captions.append(
                f"kept/call: memory each call leaves behind ({level * 100:g}% interval)"
            )
        if self.report.tasks_running:
            captions.append(f"{self.report.tasks_running} tasks still running or lost")
        table.caption = "; ".join(captions) or None
        return table

    def _task_findings(self, console: Console) -> None:
        for t in self.report.tasks:
            if t.leaks and t.memory is not None:
                console.print(f"  [bold red]leak[/] in task {t.name}: {t.memory.reason}")


def _incident_line(i: Incident) -> Text:
    """Time, kind, PID, task, outcome and reason; as Text, never markup, since the
    reason and the task name may hold brackets rich would read as styles."""
    line = Text("  " + datetime.datetime.fromtimestamp(i.t).strftime("%H:%M:%S") + "  ")
    line.append(str(i.kind), style="bold")
    line.append(f"  pid {i.pid}  {i.task_name or '-'}  ")
    line.append(str(i.outcome), style="red" if i.outcome in _FORCED else "")
    if i.dry_run and i.outcome is not Outcome.DRY_RUN:  # refused, say, in a dry run
        line.append(" (dry run)", style="yellow")
    line.append(f": {i.reason}")
    return line


def _kept(m: TaskAttribution | None) -> tuple[str, str]:
    """Bytes kept per call and its interval, in one unit."""
    if m is None or m.retained_bytes_per_call is None:
        return "-", "-"
    if m.interval_low is None or m.interval_high is None:
        return format_bytes(m.retained_bytes_per_call), "-"
    unit = bytes_unit(max(abs(m.interval_low), abs(m.interval_high)))
    low, high = (format_bytes(v, unit, sign="+") for v in (m.interval_low, m.interval_high))
    return format_bytes(m.retained_bytes_per_call, unit), f"{low.split()[0]}..{high}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"
