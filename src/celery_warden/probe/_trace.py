"""Targeted tracing: what the next calls of one task name keep, in one process.

Tracing every allocation of a worker and snapshotting it is not an option in production
(docs/benchmarks.md: a snapshot and compare over 1.5 million traces takes seconds and
hundreds of MB). So tracemalloc runs only in *windows*, one per traced call:

- the window opens at the suspect's ``task_prerun`` (``tracemalloc.start(frames)``);
- at its ``task_postrun`` a snapshot says what the call's allocations still hold (S1):
  what it keeps, but also its return value and whatever is freed a moment later;
- the window closes when the process next starts a task (or is idle for
  ``IDLE_CLOSE_SECONDS``): a young-generation collection, a second snapshot (S2), and
  ``tracemalloc.stop()``. Per allocation traceback, the call kept ``min(S1, S2)``: the
  return value is gone from S2, and what the pool allocated in between (the next
  message) has tracebacks that were not in S1.

Every other call of the suspect runs untraced, its growth of malloc's bytes in use
measured instead (from its start to the next task's): tracing leaves allocator state
behind (free lists, caches), so the growth tracemalloc cannot see, native memory, is
measured on calls that run without it. ``calls`` traced calls take about twice as many.

One stretch is traced end to end instead: from the window of call ``calls // 2`` to the
end of the next traced call, so what the first kept can be looked at again after the
second (``kept_after_next_call``): a leak's keep is still there, an object that each
call replaces is not.

Other task names run untraced (tracing is off outside windows but for that stretch); the
traced call pays tracemalloc at ``frames`` deep, and the task after a window pays the
second snapshot, which holds only what one call left. The first ``census_calls`` windows
after the first that kept something also count the types of the kept objects (one walk
of the heap each, charged to the start of the next task: seconds on a heap of a million
objects, docs/benchmarks.md) and keep a few of them, so the control thread can walk
their referrers to a root once the trace is over, outside any task.

For prefork and solo pools a window holds one call. In a threads pool, calls of other
names that overlap a window are traced with it (tracemalloc is per process).
"""

from __future__ import annotations

import gc
import os
import statistics
import sysconfig
import threading
import time
import tracemalloc
from typing import Any

from celery_warden.probe import _alloc, _heap

__all__ = ["IDLE_CLOSE_SECONDS", "Trace"]

IDLE_CLOSE_SECONDS = 0.5
MAX_SITES = 50
MAX_TYPES = 30
MAX_SAMPLES = 4
CENSUS_MIN_BYTES = 256  # a window that kept less is not worth a walk of the heap
_SNAPSHOT_TOP = 400  # tracebacks kept per snapshot, largest first

# Frames in these trees are where memory is *allocated*, rarely where it is *kept*: a
# site is named by the innermost frame outside them (the full path is kept too).
_LIBRARY_DIRS = tuple(
    os.path.join(path, "")
    for path in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}
)
# The probe's own allocations (the snapshots, the tables) are not the task's. Only the
# probe's directory: the rest of the package (the demo's app) is code like any other.
_OWN_PREFIXES = (os.path.join(os.path.dirname(__file__), ""), tracemalloc.__file__ or "")
Frames = tuple[tuple[str, int], ...]  # an allocation's traceback, innermost frame first
_LIBRARY_PACKAGES = ("celery", "kombu", "billiard", "vine", "amqp")


def _is_library(filename: str) -> bool:
    """The standard library, Celery's own stack, or no file at all (``<frozen ...>``)."""
    if filename.startswith("<"):
        return True
    if filename.startswith(_LIBRARY_DIRS) and "-packages" not in filename:
        return True
    parts = set(filename.split("/"))
    installed = "site-packages" in parts or "dist-packages" in parts
    return installed and not parts.isdisjoint(_LIBRARY_PACKAGES)


class Trace:
    """One diagnosis's trace of the next ``calls`` calls of ``task`` in this process."""

    def __init__(self, task: str, calls: int, frames: int, *, census_calls: int = 2) -> None:
        self.task = task
        self.calls = calls
        self.frames = frames
        self.census_calls = min(census_calls, calls)
        self.done = threading.Event()
        self.error: str | None = None
        self.windows = 0  # calls traced and closed
        self._lock = threading.Lock()
        self._open = False
        self._in_call = False
        self._ended = 0.0
        self._s1: dict[Frames, tuple[int, int]] = {}
        # traceback -> [bytes, count, windows it kept something in]
        self._sites: dict[Frames, list[int]] = {}
        self._types: dict[str, list[int]] = {}
        self._census_windows = 0
        self.samples: list[object] = []
        self.traced_seconds = 0.0
        self._opened_at = 0.0
        self._stat_windows = 0  # windows whose keep is counted (all but the check)
        # The survival check: the keep of window _check_at is looked at again after
        # the next traced call (tracing held on in between); None when not done.
        self._check_at = calls // 2 if calls >= 4 else 0
        self._check_kept: dict[Frames, tuple[int, int]] = {}
        self._holding = False
        self.survival: float | None = None
        # Every other call of the suspect runs untraced, to measure malloc's growth.
        self._measure_next = False
        self._measuring = False
        self._measure_from: int | None = None
        self._malloc_steps: list[int] = []

    # -- called from the probe's receivers (the task's thread) ------------------------

    def before_task(self, name: str) -> None:
        """task_prerun: close the window left open; open one for the suspect."""
        if name != self.task and not (self._open or self._measuring):
            return  # the common case, without the lock (a stale read only delays a close)
        with self._lock:
            if self._open:
                self._close()
            if self._measuring:
                self._end_measure()
            if self.done.is_set() or name != self.task:
                return
            if self._measure_next and not self._holding:
                self._measure_next = False
                self._start_measure()
                return
            self._measure_next = True
            if not self._holding:
                if tracemalloc.is_tracing():
                    self._finish(
                        "tracemalloc is already tracing in this process "
                        "(PYTHONTRACEMALLOC?): its traces cannot be windowed"
                    )
                    return
                tracemalloc.start(self.frames)
                self._opened_at = time.perf_counter()
            self._open = self._in_call = True

    def after_task(self, name: str) -> None:
        """task_postrun: what the call's allocations hold at its end (S1)."""
        if name != self.task:
            return
        with self._lock:
            if not (self._open and self._in_call and name == self.task):
                return
            self._in_call = False
            self._s1 = _by_traceback()
            self._ended = time.monotonic()

    # -- called from the control thread -------------------------------------------------

    def close_if_idle(self) -> None:
        """Close a window whose call has ended and after which no task has started."""
        with self._lock:
            idle = time.monotonic() - self._ended >= IDLE_CLOSE_SECONDS
            if self._open and not self._in_call and idle:
                self._close()

    def cancel(self, reason: str) -> None:
        """End the trace early (a timeout, the client gone); what was traced is kept."""
        with self._lock:
            if self._open:
                self._close()
            self._measuring = False
            if self._holding:
                self._holding = False
                tracemalloc.stop()
            if not self.done.is_set():
                self._finish(reason)

    def _finish(self, error: str | None = None) -> None:
        if error and self.error is None:
            self.error = error
        self.done.set()

    # -- the window's end -------------------------------------------------------------

    def _close(self) -> None:
        self._open = False
        stop = True
        try:
            if self._in_call:  # the call never reached postrun (it raised past it)
                self._s1 = {}
            gc.collect(1)
            s2 = _by_traceback()
            self.windows += 1
            if self._holding:  # the check window: did the first call's keep survive?
                self._holding = False
                self._check_survival(s2)
                return
            kept: dict[Frames, tuple[int, int]] = {}
            for traceback, (size1, count1) in self._s1.items():
                size2, count2 = s2.get(traceback, (0, 0))
                size, count = min(size1, size2), min(count1, count2)
                if size > 0:
                    kept[traceback] = (size, count)
                    site = self._sites.setdefault(traceback, [0, 0, 0])
                    site[0] += size
                    site[1] += count
                    site[2] += 1
            self._stat_windows += 1
            kept_bytes = sum(size for size, _ in kept.values())
            if (
                kept_bytes >= CENSUS_MIN_BYTES
                and self.windows > 1  # the first call warms caches up
                and self._census_windows < self.census_calls
            ):
                self._count_types(set(kept))
            if self.windows == self._check_at and self.windows < self.calls:
                # Trace on, through to the end of the next traced call.
                self._check_kept, self._holding, stop = kept, True, False
        finally:
            self._s1 = {}
            self._in_call = False
            if stop:
                tracemalloc.stop()
                self.traced_seconds += time.perf_counter() - self._opened_at
            if self.windows >= self.calls:
                self._finish()

    def _malloc_in_use(self) -> int | None:
        state = _alloc.malloc_state()
        in_use, mmapped = state.get("malloc_in_use"), state.get("malloc_mmapped")
        return None if in_use is None or mmapped is None else in_use + mmapped

    def _start_measure(self) -> None:
        """An untraced call of the suspect: malloc's bytes in use now and at the next
        task's start. Tracing leaves allocator state behind (free lists, caches), so
        native growth is measured on calls that run without it."""
        self._measure_from = self._malloc_in_use()
        self._measuring = self._measure_from is not None

    def _end_measure(self) -> None:
        self._measuring = False
        now = self._malloc_in_use()
        if now is not None and self._measure_from is not None:
            self._malloc_steps.append(now - self._measure_from)

    def _malloc_growth_per_call(self) -> float | None:
        """The median growth of malloc's bytes in use over one untraced call of the
        suspect: one-off growth (a cache's first fill) is not a per-call figure."""
        steps = self._malloc_steps
        return float(statistics.median(steps)) if len(steps) >= 3 else None

    def _check_survival(self, s2: dict[Frames, tuple[int, int]]) -> None:
        """Of what one call kept, how much is still there after the next call.

        The same lines allocate again in the second call, so per traceback the second
        snapshot holds the survivors plus the second call's keep, which is taken to be
        like the first: a leak shows about twice the first keep, an object that the
        next call replaces (a "last result" slot) about once."""
        first = sum(size for size, _ in self._check_kept.values())
        if first <= 0:
            return
        survived = 0
        for traceback, (size, _count) in self._check_kept.items():
            now = s2.get(traceback, (0, 0))[0]
            survived += min(max(now - size, 0), size)
        self.survival = survived / first
        self._check_kept = {}

    def _count_types(self, kept: set[Frames]) -> None:
        def accept(traceback: tracemalloc.Traceback) -> bool:
            return _frames(traceback) in kept

        rows, samples = _heap.kept_census(limit=MAX_TYPES, accept=accept)
        self._census_windows += 1
        for name, count, size in rows:
            entry = self._types.setdefault(name, [0, 0])
            entry[0] += count
            entry[1] += size
        for obj in samples:
            if len(self.samples) < MAX_SAMPLES and type(obj) not in {type(s) for s in self.samples}:
                self.samples.append(obj)

    # -- the result -------------------------------------------------------------------

    def result(self, *, show_values: bool) -> dict[str, Any]:
        """Sites, types and roots, per traced call; redacted unless ``show_values``."""
        windows = max(self._stat_windows, 1)
        sites: dict[tuple[str, int], dict[str, Any]] = {}
        for traceback, (size, count, seen) in self._sites.items():
            frames = list(traceback)  # innermost first
            where = next((f for f in frames if not _is_library(f[0])), frames[0])
            site = sites.get(where)
            if site is None:
                site = sites[where] = {
                    "file": where[0],
                    "line": where[1],
                    "bytes": 0,
                    "count": 0,
                    "calls": 0,
                    "stack": [],
                    "_largest": -1,
                }
            site["bytes"] += size
            site["count"] += count
            site["calls"] = max(site["calls"], seen)
            if size > site["_largest"]:
                site["_largest"] = size
                site["stack"] = [f"{f}:{n}" for f, n in frames]
        rows = sorted(sites.values(), key=lambda s: -s["bytes"])[:MAX_SITES]
        out_sites = [
            {
                "file": s["file"],
                "line": s["line"],
                "bytes_per_call": s["bytes"] / windows,
                "count_per_call": s["count"] / windows,
                "calls_keeping": s["calls"],
                "stack": s["stack"],
            }
            for s in rows
        ]
        census = max(self._census_windows, 1)
        types = [
            {"type": name, "count_per_call": count / census, "bytes_per_call": size / census}
            for name, (count, size) in sorted(self._types.items(), key=lambda kv: -kv[1][1])
        ][:MAX_TYPES]
        roots = []
        samples, self.samples = self.samples, []
        for obj in samples:
            path = _heap.root_path(obj, show_values=show_values, ignore=(samples,))
            if path is not None:
                roots.append({"type": _heap.type_name(type(obj)), "path": path})
        del samples
        return {
            "task": self.task,
            "calls_requested": self.calls,
            "calls_traced": self.windows,
            "frames": self.frames,
            "kept_bytes_per_call": sum(s["bytes"] for s in sites.values()) / windows,
            "kept_after_next_call": self.survival,
            "malloc_growth_per_call": self._malloc_growth_per_call(),
            "calls_measured": len(self._malloc_steps),
            "census_calls": self._census_windows,
            "traced_seconds": self.traced_seconds,
            "sites": out_sites,
            "types": types,
            "roots": roots,
            "error": self.error,
        }


def _traces() -> list[tuple[Any, ...]]:
    """Every live trace as ``(domain, size, frames, total_nframe)``, ``frames`` the
    ``(filename, lineno)`` pairs innermost first: what ``take_snapshot()`` copies before
    wrapping it in objects. Grouped here by hand, a window's snapshot costs a tenth of
    ``Snapshot.statistics()`` (which builds a Traceback object per trace and sorts)."""
    raw = getattr(tracemalloc, "_get_traces", None)
    if raw is not None:
        traces: list[tuple[Any, ...]] = raw()
        return traces
    return [  # an interpreter without the private call: the public objects, converted
        (trace.domain, trace.size, _frames(trace.traceback), len(trace.traceback))
        for trace in tracemalloc.take_snapshot().traces
    ]


def _frames(traceback: tracemalloc.Traceback) -> Frames:
    """A Traceback as the raw frames, innermost first."""
    return tuple((frame.filename, frame.lineno) for frame in reversed(traceback))


def _ours(frames: Frames) -> bool:
    """An allocation made by the probe itself: any frame of its stack is the probe's
    (the control thread answering while a call is traced, the receivers), or it is
    tracemalloc's own."""
    return any(filename.startswith(_OWN_PREFIXES) for filename, _line in frames)


def _by_traceback() -> dict[Frames, tuple[int, int]]:
    """Bytes and blocks per allocation traceback, the largest ``_SNAPSHOT_TOP``; the
    probe's own allocations left out."""
    grouped: dict[Frames, list[int]] = {}
    for _domain, size, frames, _total in _traces():
        if not frames or _ours(frames):
            continue
        entry = grouped.get(frames)
        if entry is None:
            grouped[frames] = [size, 1]
        else:
            entry[0] += size
            entry[1] += 1
    largest = sorted(grouped.items(), key=lambda item: -item[1][0])[:_SNAPSHOT_TOP]
    return {frames: (size, count) for frames, (size, count) in largest}
