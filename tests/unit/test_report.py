"""From a stored session to the report: series choice, verdict order, JSON schema, text."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import jsonschema

from celery_warden._records import (
    DiagnosisRecord,
    EndReason,
    Incident,
    IncidentKind,
    Outcome,
    ProcessHistory,
    ProcessInfo,
    Role,
    Sample,
    SessionInfo,
    SignalAudit,
    Snapshot,
    TaskFinished,
    TaskState,
    Verdict,
    WorkerInfo,
)
from celery_warden.analysis.report import build_report
from celery_warden.reporters import JsonReporter, TextReporter
from celery_warden.reporters.json import SCHEMA_VERSION

SCHEMA = Path(__file__).parents[2] / "src/celery_warden/schemas/report-v4.schema.json"
T0 = 1_800_000_000.0
MB = 1024 * 1024
SESSION = SessionInfo(1, "run", "celery -A proj worker", "host", T0, T0 + 700, 0, 1.0, 0)


def _history(
    info: ProcessInfo, rss: list[float], tasks: list[TaskFinished], ended: float | None = None
) -> ProcessHistory:
    samples = tuple(
        Sample(info.pid, info.start_ticks, T0 + i, "sleeping", int(v), 1.0, 0.1, 4, open_fds=12)
        for i, v in enumerate(rss)
    )
    reason = EndReason.EXITED if ended else None
    return ProcessHistory(info, ended, reason, 0 if ended else None, samples, tuple(tasks))


def _tasks(info: ProcessInfo, per_task_bytes: float, n: int = 600) -> list[TaskFinished]:
    return [
        TaskFinished(
            info.pid,
            info.start_ticks,
            f"id-{info.pid}-{i}",
            "proj.leaky" if per_task_bytes else "proj.clean",
            T0 + i,
            0.01 * (1 + i % 10),
            TaskState.FAILURE if i % 100 == 0 else TaskState.SUCCESS,
            int(60 * MB + per_task_bytes * i + (i % 7) * 4096),
            T0 + i - 0.01,
        )
        for i in range(n)
    ]


def _snapshot(ended: float | None = None) -> Snapshot:
    master = ProcessInfo(10, 100, 1, Role.MASTER, T0, "celery -A proj worker", 10)
    leaky = ProcessInfo(11, 101, 10, Role.CHILD, T0, "celery -A proj worker", 10)
    clean = ProcessInfo(12, 102, 10, Role.CHILD, T0, "celery -A proj worker", 10)
    return Snapshot(
        session=SESSION,
        workers=(WorkerInfo(10, 100, "w1@host", "prefork", 2, None, None),),
        processes=(
            _history(master, [50 * MB] * 600, [], ended),
            _history(clean, [60 * MB] * 600, _tasks(clean, 0), ended),
            _history(leaky, [60 * MB] * 600, _tasks(leaky, 50_000), ended),
        ),
        running_tasks=(),
    )


def test_the_leaking_child_comes_first_with_its_per_task_slope() -> None:
    """A child whose RSS after each task grows is a leak, listed before the others."""
    # GIVEN a worker with a leaking child, a clean child and a quiet master
    # WHEN the report is built
    report = build_report(_snapshot())
    # THEN the leak comes first, measured per task from the probe's readings
    first = report.processes[0]
    assert (first.pid, first.verdict, first.memory.metric) == (11, Verdict.LEAK, "rss")
    assert first.memory.slope_bytes_per_task is not None
    assert abs(first.memory.slope_bytes_per_task - 50_000) < 2_000
    assert {p.pid: p.verdict for p in report.processes[1:]} == {
        12: Verdict.STABLE,
        10: Verdict.STABLE,
    }
    assert report.workers[0].verdict is Verdict.LEAK
    assert report.workers[0].children_alive == 2


def test_task_names_are_summarised_with_failures_and_percentiles() -> None:
    """tasks[] counts calls and failures per name, with wall-time percentiles."""
    report = build_report(_snapshot())
    tasks = {t.name: t.summary for t in report.tasks}
    assert tasks["proj.leaky"].calls == 600
    assert tasks["proj.leaky"].failures == 6
    assert 0.01 <= tasks["proj.clean"].wall_p50_seconds <= tasks["proj.clean"].wall_p95_seconds


def test_a_stopped_worker_reports_what_it_held_when_it_stopped() -> None:
    """A worker whose processes all ended still shows its children and memory at the end."""
    report = build_report(_snapshot(ended=T0 + 650))
    worker = report.workers[0]
    assert worker.children_alive == 2
    assert worker.rss_bytes == 170 * MB


def test_the_json_document_follows_its_schema() -> None:
    """The JSON reporter's document validates against the published schema."""
    out = io.StringIO()
    JsonReporter.from_report(build_report(_snapshot())).render(out)
    document = json.loads(out.getvalue())
    jsonschema.validate(document, json.loads(SCHEMA.read_text()))
    leak = document["processes"][0]
    assert leak["verdict"] == "leak"
    assert leak["evidence"]["metric"] == "rss"
    assert leak["evidence"]["reason"]


def test_the_text_report_puts_the_verdict_and_its_reason_first() -> None:
    """The terminal report names the leaking process and says why."""
    out = io.StringIO()
    TextReporter.from_report(build_report(_snapshot())).render(out, width=140)
    text = out.getvalue()
    assert text.index("leak") < text.index("stable")
    assert "child 11: grows" in text
    assert "proj.leaky" in text


def test_the_leaking_task_name_comes_first_with_its_bytes_per_call() -> None:
    """tasks[] puts the name that carries the growth first, with what each call keeps;
    the clean name is stable, its interval holding zero."""
    report = build_report(_snapshot())
    leaky, clean = report.tasks
    assert (leaky.name, clean.name) == ("proj.leaky", "proj.clean")
    assert leaky.memory is not None
    assert clean.memory is not None
    assert leaky.memory.verdict is Verdict.LEAK
    assert leaky.memory.interval_low is not None
    assert leaky.memory.interval_high is not None
    assert leaky.memory.interval_low <= 50_000 <= leaky.memory.interval_high
    assert clean.memory.verdict is Verdict.STABLE
    assert clean.memory.interval_low is not None
    assert clean.memory.interval_high is not None
    assert clean.memory.interval_low <= 0 <= clean.memory.interval_high
    out = io.StringIO()
    JsonReporter.from_report(report).render(out)
    first = json.loads(out.getvalue())["tasks"][0]
    assert first["memory"]["verdict"] == "leak"
    assert first["memory"]["interval"]["confidence"] == 0.999


def _diagnosed(snapshot: Snapshot, verdict: Verdict, pid: int, ticks: int) -> Snapshot:
    document = {
        "pid": pid,
        "verdict": str(verdict),
        "evidence": ["the clean child's calls keep nothing, malloc grows"],
        "advice": ["look at the C extensions"],
        "before": {"uss": 60 * MB, "malloc_in_use": 10 * MB},
        "after": {"uss": 64 * MB, "malloc_in_use": 14 * MB, "malloc_free": MB},
        "trace": {
            "task": "proj.clean",
            "calls_traced": 50,
            "calls_requested": 50,
            "kept_bytes_per_call": 0.0,
            "kept_after_next_call": None,
            "sites": [
                {
                    "file": "/app/proj.py",
                    "line": 7,
                    "bytes_per_call": 100.0,
                    "count_per_call": 1.0,
                    "calls_keeping": 3,
                    "stack": ["/app/proj.py:7"],
                }
            ],
            "types": [{"type": "dict", "count_per_call": 1.0, "bytes_per_call": 100.0}],
            "roots": [{"type": "dict", "path": "proj.CACHE[...]"}],
        },
    }
    record = DiagnosisRecord(pid, ticks, T0 + 600, "proj.clean", verdict, False, document)
    return dataclasses.replace(snapshot, diagnoses=(record,))


def test_a_diagnosis_overrules_the_trend_and_is_shown_first() -> None:
    """A stored diagnosis names the process's verdict (native-leak over the trend's
    stable), gives the task name its sites, types and roots in JSON (schema v3), and
    leads the terminal report."""
    report = build_report(_diagnosed(_snapshot(), Verdict.NATIVE_LEAK, 12, 102))
    clean = next(p for p in report.processes if p.pid == 12)
    assert (clean.verdict, clean.memory.verdict) == (Verdict.NATIVE_LEAK, Verdict.STABLE)
    out = io.StringIO()
    JsonReporter.from_report(report).render(out)
    document = json.loads(out.getvalue())
    jsonschema.validate(document, json.loads(SCHEMA.read_text()))
    task = next(t for t in document["tasks"] if t["name"] == "proj.clean")
    assert task["sites"][0]["line"] == 7
    assert task["types"][0]["type"] == "dict"
    assert task["roots"] == ["proj.CACHE[...]"]
    process = next(p for p in document["processes"] if p["pid"] == 12)
    assert process["diagnosis"]["memory"]["malloc_in_use"] == 14 * MB
    text = io.StringIO()
    TextReporter.from_report(report).render(text, width=140)
    assert text.getvalue().index("Diagnosis") < text.getvalue().index("Workers")
    assert "native-leak" in text.getvalue()


def test_a_stable_diagnosis_leaves_the_trend_verdict() -> None:
    report = build_report(_diagnosed(_snapshot(), Verdict.STABLE, 11, 101))
    leaky = next(p for p in report.processes if p.pid == 11)
    assert leaky.verdict is Verdict.LEAK


def _guarded(snapshot: Snapshot) -> Snapshot:
    """The leaky child killed over its hard limit, and a hang seen in a dry run."""
    stack = "\n".join(f'  File "/app/proj.py", line {n}, in frame_{n}' for n in range(1, 21))
    killed = Incident(
        id="inc-kill",
        kind=IncidentKind.MEMORY_HARD,
        pid=11,
        start_ticks=101,
        master_pid=10,
        t=T0 + 500,
        reason="USS 1.2 GiB over the hard limit [1 GiB]",
        numbers={"uss_bytes": 1_288_490_188, "limit_bytes": 1 << 30, "over": 1.2, "why": None},
        outcome=Outcome.KILLED,
        task_name="proj.leaky",
        task_id="id-11-500",
        stack=stack,
        ended_at=T0 + 511,
    )
    hang = Incident(
        id="inc-hang",
        kind=IncidentKind.HANG,
        pid=12,
        start_ticks=102,
        master_pid=10,
        t=T0 + 600,
        reason="proj.clean ran 300 s, its p99 is 0.1 s",
        numbers={"running_seconds": 300.0},
        outcome=Outcome.DRY_RUN,
        dry_run=True,
    )
    signals = (
        SignalAudit(T0 + 501, 11, 101, "SIGTERM", "sent", "inc-kill", "hard limit"),
        SignalAudit(T0 + 511, 11, 101, "SIGKILL", "sent", "inc-kill"),
        SignalAudit(T0 + 600, 12, 102, "SIGTERM", "dry-run", "inc-hang"),
    )
    return dataclasses.replace(snapshot, incidents=(killed, hang), signals=signals)


def test_the_guards_incidents_and_signals_are_in_the_json_document() -> None:
    """Schema v4: incidents[] with their numbers and outcome, signals[] in order."""
    out = io.StringIO()
    JsonReporter.from_report(build_report(_guarded(_snapshot()))).render(out)
    document = json.loads(out.getvalue())
    jsonschema.validate(document, json.loads(SCHEMA.read_text()))
    assert document["schema_version"] == SCHEMA_VERSION == 4
    killed, hang = document["incidents"]
    assert (killed["kind"], killed["outcome"]) == ("memory-hard", "killed")
    assert killed["dry_run"] is False
    assert killed["numbers"]["limit_bytes"] == 1 << 30
    assert killed["stack"].endswith("frame_20")
    assert (hang["outcome"], hang["dry_run"], hang["task_name"]) == ("dry-run", True, None)
    assert [(a["signal"], a["result"]) for a in document["signals"]] == [
        ("SIGTERM", "sent"),
        ("SIGKILL", "sent"),
        ("SIGTERM", "dry-run"),
    ]


def test_the_text_report_lists_incidents_with_the_tail_of_their_stack() -> None:
    """One line per incident (kind, PID, task, outcome, dry-run marker, reason) after
    the diagnoses and before the tables, then the innermost frames of its stack."""
    out = io.StringIO()
    TextReporter.from_report(build_report(_guarded(_snapshot()))).render(out, width=140)
    text = out.getvalue()
    assert text.index("Incidents") < text.index("Workers")
    killed = next(line for line in text.splitlines() if "memory-hard" in line)
    for part in ("pid 11", "proj.leaky", "killed", "the hard limit [1 GiB]"):
        assert part in killed
    hang = next(line for line in text.splitlines() if "hang" in line)
    assert "dry-run" in hang
    assert "(dry run)" not in hang  # said once: the outcome is the marker
    assert "line 20," in text
    assert "line 9," in text
    assert "line 8," not in text  # the last 12 frames only


def test_the_text_report_has_no_incidents_section_without_incidents() -> None:
    out = io.StringIO()
    TextReporter.from_report(build_report(_snapshot())).render(out, width=140)
    assert "Incidents" not in out.getvalue()
