"""The verdict of a diagnosis: is the memory a leak of Python objects, a native leak,
fragmentation, or nothing to worry about, with the evidence and what to do.

The inputs are what the probe measured in the process (``probe/_ops.py``): where the
memory is before and after the traced calls (RSS, USS, pymalloc's arenas, glibc's
malloc state), what each traced call kept by tracemalloc's account, and, when asked,
what ``malloc_trim(0)`` gave back. The reasoning:

- **leak**: the traced calls keep Python allocations (tracemalloc counts every Python
  object, small or large), at least ``MIN_KEPT_BYTES`` per call, not in a single call
  only (a cache filled once is warm-up), and what one call kept is mostly still held
  after the next (an object each call replaces, a "last result" slot, is not a leak);
- **native-leak**: malloc's bytes in use (arenas plus mmapped chunks) grew by more than
  the Python allocations kept explain, by at least ``MIN_NATIVE_BYTES`` per call: memory
  a C extension or ``ctypes`` allocated and never freed, invisible to tracemalloc;
- **fragmentation**: nothing grows, but the allocators hold a lot of freed memory (glibc
  arenas' free bytes plus pymalloc's free space) compared with what the process holds:
  the high-water mark of an earlier peak, not a leak;
- **stable**: none of these; **insufficient-data** when no call was traced and the
  allocators hold little.

When both kinds of growth are present, the larger names the verdict and the other is in
the evidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery_warden._records import Verdict
from celery_warden.analysis._format import format_bytes

__all__ = ["DiagnosisFinding", "classify"]

MIN_KEPT_BYTES = 256  # per traced call (the attribution's own floor)
MIN_SURVIVAL = 0.5  # of one call's keep still held after the next call
MIN_NATIVE_BYTES = 1024  # per traced call, and at least MIN_NATIVE_TOTAL in all
MIN_NATIVE_TOTAL = 1 << 20
FRAGMENTED_SHARE = 0.25  # of the process's private memory held free by the allocators
FRAGMENTED_MIN_BYTES = 32 << 20


@dataclass(frozen=True, slots=True)
class DiagnosisFinding:
    verdict: Verdict
    evidence: tuple[str, ...]
    advice: tuple[str, ...]


def _num(table: Mapping[str, Any] | None, key: str) -> int | None:
    if not table:
        return None
    value = table.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _delta(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None, *keys: str) -> int:
    total = 0
    for key in keys:
        a, b = _num(after, key), _num(before, key)
        if a is not None and b is not None:
            total += a - b
    return total


def _free_bytes(table: Mapping[str, Any] | None) -> int:
    return (_num(table, "malloc_free") or 0) + (_num(table, "pymalloc_free") or 0)


def classify(document: Mapping[str, Any]) -> DiagnosisFinding:
    """The verdict on one diagnosis document (the probe's replies, merged)."""
    trace = document.get("trace") or {}
    before = document.get("before")
    after = document.get("after") or document.get("breakdown")
    calls = int(trace.get("calls_traced") or 0)
    kept = float(trace.get("kept_bytes_per_call") or 0.0)
    sites = trace.get("sites") or []
    recurring = any(int(s.get("calls_keeping") or 0) >= 2 for s in sites) or calls == 1
    evidence: list[str] = []
    advice: list[str] = []

    native_per_call = 0.0
    if calls:
        grew = _delta(before, after, "uss") or _delta(before, after, "rss")
        in_use = _delta(before, after, "malloc_in_use", "malloc_mmapped")
        slope = trace.get("malloc_growth_per_call")
        # The per-call slope, when the probe measured one, ignores one-off growth (the
        # tracer's tables, a thread's first cache); else the growth over all the calls.
        per_call = float(slope) if isinstance(slope, (int, float)) else in_use / calls
        native_per_call = max(0.0, per_call - kept)
        native_total = native_per_call * calls
        evidence.append(
            f"{calls} calls of {trace.get('task')} traced: each kept {format_bytes(kept)} "
            f"of Python allocations; the process grew {format_bytes(grew)} in all, malloc's "
            f"bytes in use {format_bytes(in_use)}"
        )
        if sites:
            top = sites[0]
            evidence.append(
                f"largest site {top['file']}:{top['line']}: "
                f"{format_bytes(top['bytes_per_call'])} per call, kept in "
                f"{top['calls_keeping']} of {calls} calls"
            )
        survival = trace.get("kept_after_next_call")
        if survival is not None:
            evidence.append(
                f"{float(survival):.0%} of what one call kept was still held after the next call"
            )
        lasting = survival is None or float(survival) >= MIN_SURVIVAL
        python_leak = kept >= MIN_KEPT_BYTES and recurring and lasting
        native_leak = native_per_call >= MIN_NATIVE_BYTES and native_total >= MIN_NATIVE_TOTAL
        if python_leak and (not native_leak or kept >= native_per_call):
            roots = trace.get("roots") or []
            if roots:
                evidence.append(f"kept objects are reachable from {roots[0]['path']}")
            advice.append(
                "fix the root that keeps them (bound the cache, drop the reference, "
                "do not store exceptions with their tracebacks); until then recycle the "
                "child on its private memory"
            )
            return DiagnosisFinding(Verdict.LEAK, tuple(evidence), tuple(advice))
        if native_leak:
            evidence.append(
                f"{format_bytes(native_per_call)} per call grew in malloc outside anything "
                "tracemalloc saw: memory allocated by C code (an extension, ctypes)"
            )
            advice.append(
                "look for C extensions or ctypes calls in this task that allocate without "
                "freeing (upgrade them first); a recycle policy on private memory contains it"
            )
            return DiagnosisFinding(Verdict.NATIVE_LEAK, tuple(evidence), tuple(advice))

    free = _free_bytes(after)
    private = _num(after, "uss") or _num(after, "rss") or 0
    trim = document.get("trim")
    if trim:
        evidence.append(
            f"malloc_trim(0) gave back {format_bytes(_num(trim, 'released') or 0)} "
            f"in {float(trim.get('seconds') or 0) * 1000:.0f} ms"
        )
    if private and free >= FRAGMENTED_MIN_BYTES and free >= FRAGMENTED_SHARE * private:
        evidence.append(
            f"the allocators hold {format_bytes(free)} freed but not returned "
            f"({free / private:.0%} of the process's {format_bytes(private)} private memory): "
            "the high-water mark of an earlier peak"
        )
        advice.append(
            "not a leak: cap glibc's arenas (MALLOC_ARENA_MAX=2), or preload jemalloc; "
            "process big inputs in chunks; recycle children after the tasks that peak"
        )
        return DiagnosisFinding(Verdict.FRAGMENTATION, tuple(evidence), tuple(advice))
    if calls:
        return DiagnosisFinding(Verdict.STABLE, tuple(evidence), tuple(advice))
    evidence.append("no call traced: pass --task NAME to trace one")
    return DiagnosisFinding(Verdict.INSUFFICIENT_DATA, tuple(evidence), tuple(advice))
