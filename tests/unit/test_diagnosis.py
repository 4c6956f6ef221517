"""The diagnosis verdict from what the probe measured."""

from __future__ import annotations

from typing import Any

from celery_warden._records import Verdict
from celery_warden.analysis.diagnosis import classify

MiB = 1 << 20


def _memory(uss: int, in_use: int, free: int = 0, mmapped: int = 0) -> dict[str, int]:
    return {
        "rss": uss + 10 * MiB,
        "uss": uss,
        "malloc_in_use": in_use,
        "malloc_free": free,
        "malloc_mmapped": mmapped,
        "pymalloc_free": 0,
    }


def _document(
    kept: float,
    *,
    calls: int = 20,
    keeping: int = 20,
    survival: float | None = 1.0,
    before: dict[str, int] | None = None,
    after: dict[str, int] | None = None,
) -> dict[str, Any]:
    sites = [
        {
            "file": "/app/tasks.py",
            "line": 12,
            "bytes_per_call": kept,
            "count_per_call": 1.0,
            "calls_keeping": keeping,
            "stack": ["/app/tasks.py:12"],
        }
    ]
    return {
        "trace": {
            "task": "app.work",
            "calls_traced": calls,
            "kept_bytes_per_call": kept,
            "kept_after_next_call": survival,
            "sites": sites if kept else [],
            "roots": [{"type": "dict", "path": "app.tasks.RESULTS[...]"}],
        },
        "before": before or _memory(100 * MiB, 50 * MiB),
        "after": after or _memory(100 * MiB, 50 * MiB),
    }


def test_python_objects_kept_every_call_are_a_leak() -> None:
    finding = classify(_document(4096))
    assert finding.verdict is Verdict.LEAK
    assert any("app.tasks.RESULTS" in line for line in finding.evidence)


def test_a_keep_the_next_call_replaces_is_not_a_leak() -> None:
    assert classify(_document(4096, survival=0.0)).verdict is Verdict.STABLE


def test_a_keep_in_one_call_only_is_warm_up() -> None:
    assert classify(_document(4096, keeping=1, survival=None)).verdict is Verdict.STABLE


def test_malloc_growth_nothing_traced_explains_is_a_native_leak() -> None:
    before = _memory(100 * MiB, 50 * MiB)
    after = _memory(102 * MiB, 50 * MiB + 20 * 65536)
    finding = classify(_document(0, before=before, after=after))
    assert finding.verdict is Verdict.NATIVE_LEAK
    # the same growth, all of it Python objects that tracemalloc saw: a leak
    assert classify(_document(65536, before=before, after=after)).verdict is Verdict.LEAK


def test_freed_memory_the_allocator_keeps_is_fragmentation() -> None:
    after = _memory(200 * MiB, 20 * MiB, free=150 * MiB)
    document = _document(0, before=after, after=after)
    assert classify(document).verdict is Verdict.FRAGMENTATION
    # without a trace the same state still reads as fragmentation
    assert classify({"breakdown": after}).verdict is Verdict.FRAGMENTATION


def test_little_free_memory_and_no_trace_says_so() -> None:
    finding = classify({"breakdown": _memory(100 * MiB, 50 * MiB, free=MiB)})
    assert finding.verdict is Verdict.INSUFFICIENT_DATA
    assert "--task" in finding.evidence[-1]
