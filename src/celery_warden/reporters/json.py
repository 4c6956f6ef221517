"""The JSON report: a stable, versioned document for scripts and alerting.

The schema is ``schemas/report-v4.schema.json`` (documented in docs/report-schema.md).
Later versions only add fields; a consumer checks ``schema_version`` and ignores what
it does not know. Version 2 added, per task name, CPU time and the CPU/IO class, the
exception types of failures, and ``memory``: retained bytes per call and the verdict.
Version 3 added what ``celery-warden diagnose`` found: per task name ``sites[]``,
``types[]`` and ``roots[]``; per process ``diagnosis`` (where the memory is, the
verdict, its evidence and advice) and ``trend_verdict``; the new verdicts
``native-leak`` and ``fragmentation``; and ``diagnoses[]``. Version 4 added what the
guard did: ``incidents[]`` (each decision, its measurements, outcome and captured
stack) and ``signals[]`` (every signal sent, refused or dry-run).
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

from celery_warden._records import (
    DiagnosisRecord,
    GrowthFinding,
    Incident,
    MemoryFinding,
    SignalAudit,
)
from celery_warden._version import __version__
from celery_warden.analysis.attribution import TaskAttribution
from celery_warden.analysis.report import ProcessReport, Report, TaskReport, WorkerReport

__all__ = ["SCHEMA_VERSION", "JsonReporter"]

SCHEMA_VERSION = 4


def _evidence(finding: MemoryFinding) -> dict[str, Any]:
    return {
        "metric": finding.metric,
        "growth_bytes": finding.growth_bytes,
        "noise_bytes": finding.noise_bytes,
        "confidence": round(finding.confidence, 4),
        "window": {
            "start": finding.window_start,
            "end": finding.window_end,
            "tasks": finding.window_tasks,
        },
        "points": finding.points,
        "reason": finding.reason,
    }


def _growth(finding: GrowthFinding) -> dict[str, Any]:
    return {
        "kind": finding.kind,
        "start_value": finding.start_value,
        "end_value": finding.end_value,
        "slope_per_hour": finding.slope_per_hour,
        "slope_per_task": finding.slope_per_task,
        "confidence": round(finding.confidence, 4),
        "points": finding.points,
        "reason": finding.reason,
    }


def _process(p: ProcessReport) -> dict[str, Any]:
    return {
        "pid": p.pid,
        "start_ticks": p.start_ticks,
        "role": str(p.role),
        "master_pid": p.master_pid,
        "cmdline": p.cmdline,
        "started_at": p.started_at,
        "ended_at": p.ended_at,
        "end_reason": str(p.end_reason) if p.end_reason else None,
        "exit_code": p.exit_code,
        "rss_bytes": p.rss_bytes,
        "rss_peak_bytes": p.rss_peak_bytes,
        "uss_bytes": p.uss_bytes,
        "uss_peak_bytes": p.uss_peak_bytes,
        "pss_bytes": p.pss_bytes,
        "pss_peak_bytes": p.pss_peak_bytes,
        "threads": p.threads,
        "open_fds": p.open_fds,
        "cpu_seconds": p.cpu_seconds,
        "tasks_run": p.tasks_run,
        "samples": p.samples,
        "slope_bytes_per_task": p.memory.slope_bytes_per_task,
        "slope_bytes_per_hour": p.memory.slope_bytes_per_hour,
        "verdict": str(p.verdict),
        "trend_verdict": str(p.memory.verdict),
        "evidence": _evidence(p.memory),
        "diagnosis": None if p.diagnosis is None else _process_diagnosis(p.diagnosis),
        "findings": [_growth(g) for g in p.growth],
        "missing": list(p.missing),
    }


_BREAKDOWN_KEYS = (
    "rss", "uss", "pss", "py_allocated_blocks", "pymalloc_arenas", "pymalloc_used",
    "pymalloc_free", "tracemalloc_traced", "malloc_arena", "malloc_in_use", "malloc_free",
    "malloc_mmapped", "malloc_releasable",
)  # fmt: skip


def _breakdown(table: object) -> dict[str, Any] | None:
    if not isinstance(table, dict):
        return None
    return {key: table.get(key) for key in _BREAKDOWN_KEYS}


def _process_diagnosis(d: DiagnosisRecord) -> dict[str, Any]:
    doc = d.document
    trim = doc.get("trim") if isinstance(doc.get("trim"), dict) else None
    return {
        "at": d.at,
        "verdict": str(d.verdict),
        "task": d.task_name,
        "evidence": list(doc.get("evidence") or []),
        "advice": list(doc.get("advice") or []),
        "memory": _breakdown(doc.get("after") or doc.get("breakdown")),
        "memory_before": _breakdown(doc.get("before")),
        "trim": None
        if trim is None
        else {"released_bytes": trim.get("released"), "seconds": trim.get("seconds")},
        "show_values": d.show_values,
    }


def _sites(trace: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [
        {
            "file": s["file"],
            "line": s["line"],
            "bytes_per_call": s["bytes_per_call"],
            "count_per_call": s.get("count_per_call"),
            "calls_keeping": s.get("calls_keeping"),
            "stack": list(s.get("stack") or []),
        }
        for s in (trace or {}).get("sites") or []
    ]


def _types(trace: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [
        {
            "type": t["type"],
            "count_per_call": t["count_per_call"],
            "bytes_per_call": t["bytes_per_call"],
        }
        for t in (trace or {}).get("types") or []
    ]


def _roots(trace: dict[str, Any] | None) -> list[str]:
    return [str(r["path"]) for r in (trace or {}).get("roots") or []]


def _task_diagnosis(report: TaskReport) -> dict[str, Any] | None:
    d, trace = report.diagnosis, report.trace
    if d is None or trace is None:
        return None
    return {
        "at": d.at,
        "pid": d.pid,
        "verdict": str(d.verdict),
        "calls_traced": trace.get("calls_traced"),
        "kept_bytes_per_call": trace.get("kept_bytes_per_call"),
        "kept_after_next_call": trace.get("kept_after_next_call"),
    }


def _worker(w: WorkerReport) -> dict[str, Any]:
    return {
        "master_pid": w.master_pid,
        "nodename": w.nodename,
        "pool": w.pool,
        "concurrency": w.concurrency,
        "processes": w.processes,
        "children_alive": w.children_alive,
        "tasks_run": w.tasks_run,
        "verdict": str(w.verdict),
        "rss_bytes": w.rss_bytes,
        "uss_bytes": w.uss_bytes,
    }


def _memory(m: TaskAttribution, confidence: float) -> dict[str, Any]:
    return {
        "verdict": str(m.verdict),
        "retained_bytes_per_call": m.retained_bytes_per_call,
        "interval": {"low": m.interval_low, "high": m.interval_high, "confidence": confidence},
        "calls": m.calls,
        "processes": m.processes,
        "py_blocks_per_call": m.py_blocks_per_call,
        "reason": m.reason,
    }


def _task(report: TaskReport) -> dict[str, Any]:
    t = report.summary
    return {
        "name": t.name,
        "calls": t.calls,
        "failures": t.failures,
        "retries": t.retries,
        "wall_p50_seconds": t.wall_p50_seconds,
        "wall_p95_seconds": t.wall_p95_seconds,
        "wall_max_seconds": t.wall_max_seconds,
        "cpu_p50_seconds": t.cpu_p50_seconds,
        "cpu_p95_seconds": t.cpu_p95_seconds,
        "cpu_ratio": None
        if t.cpu_ratio_p50 is None
        else {"p25": t.cpu_ratio_p25, "p50": t.cpu_ratio_p50, "p75": t.cpu_ratio_p75},
        "cpu_class": t.cpu_class,
        "exceptions": [{"type": kind, "count": count} for kind, count in t.exceptions],
        "memory": None if report.memory is None else _memory(report.memory, report.confidence),
        "diagnosis": _task_diagnosis(report),
        "sites": _sites(report.trace),
        "types": _types(report.trace),
        "roots": _roots(report.trace),
    }


def _incident(i: Incident) -> dict[str, Any]:
    return {
        "id": i.id,
        "kind": str(i.kind),
        "pid": i.pid,
        "start_ticks": i.start_ticks,
        "master_pid": i.master_pid,
        "t": i.t,
        "reason": i.reason,
        "numbers": dict(i.numbers),
        "outcome": str(i.outcome),
        "dry_run": i.dry_run,
        "task_name": i.task_name,
        "task_id": i.task_id,
        "stack": i.stack,
        "ended_at": i.ended_at,
    }


def _signal(a: SignalAudit) -> dict[str, Any]:
    return {
        "t": a.t,
        "pid": a.pid,
        "start_ticks": a.start_ticks,
        "signal": a.signal,
        "result": a.result,
        "incident_id": a.incident_id,
        "detail": a.detail,
    }


class JsonReporter:
    """Renders a report as one JSON document."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    @classmethod
    def from_report(cls, report: Report) -> JsonReporter:
        s = report.session
        return cls(
            {
                "schema_version": SCHEMA_VERSION,
                "generator": f"celery-warden {__version__}",
                "generated_at": time.time(),
                "session": {
                    "id": s.id,
                    "mode": s.mode,
                    "command": s.command,
                    "hostname": s.hostname,
                    "started_at": s.started_at,
                    "ended_at": s.ended_at,
                    "exit_code": s.exit_code,
                    "interval_seconds": s.interval_seconds,
                    "probe_dropped": s.probe_dropped,
                },
                "workers": [_worker(w) for w in report.workers],
                "processes": [_process(p) for p in report.processes],
                "tasks": [_task(t) for t in report.tasks],
                "tasks_running": report.tasks_running,
                "diagnoses": [
                    {
                        "pid": d.pid,
                        "start_ticks": d.start_ticks,
                        "at": d.at,
                        "task": d.task_name,
                        "verdict": str(d.verdict),
                        "show_values": d.show_values,
                    }
                    for d in report.diagnoses
                ],
                "incidents": [_incident(i) for i in report.incidents],
                "signals": [_signal(a) for a in report.signals],
            }
        )

    def render(self, outfile: IO[str]) -> None:
        json.dump(self.document, outfile, indent=2)
        outfile.write("\n")
