"""Targeted tracing: what a diagnosis costs the worker process it traces.

One process plays a worker child with a heap of about 1.2 million objects (~90 MB: class
instances with their dicts, strs, ints, lists, tuples), and runs calls of two task
names through the probe's own receivers (``Probe.on_task_prerun`` / ``on_task_postrun``
with a task object that has ``.name`` and ``.request``), in a 1:9 mix:

- ``suspect``: builds a dict of 50 small objects and keeps 4 KiB in a module list;
- ``other``: builds the same dict and keeps nothing.

Phases, in one run: (A) no trace; (B) a diagnosis of ``suspect`` (``Trace`` with K = 50
calls at ``--frames``, exactly what ``diagnose --task`` arms) until it is done, then
its result with the roots walked; (C) tracemalloc at the same depth the whole time,
which is what tracing "everything" would cost. Per call, the thread's CPU time of the
call plus the probe's two receivers. Reported: the median ``other`` call in B over A
(the target: other names keep their speed), the traced ``suspect`` call over the
``suspect`` in C (the target: at most tracemalloc's own slowdown), the ``other`` call
right after a traced one (it pays the window's second snapshot, and for the last three
a census of the kept objects), the time to build the result (roots), and the growth of
the process's peak RSS over B (the target: under 50 MB).

Run: ``python bench/bench_diagnose.py`` (about a minute; ``--help`` for the options).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _util import describe_machine, load_average, print_table
from celery_warden.probe._channel import Channel
from celery_warden.probe._hooks import Probe
from celery_warden.probe._trace import Trace

TARGET_OTHER_RATIO = 1.10  # other names: at most 10% slower while a suspect is traced
TARGET_RSS_MB = 50.0

KEPT: list[bytes] = []


class _Request:
    retries = 0


@dataclass
class _Task:
    name: str
    request: _Request = field(default_factory=_Request)


class Item:
    def __init__(self, i: int) -> None:
        self.number = i
        self.label = f"item-{i}"
        self.tags = [i, i + 1]


def build_heap(objects: int) -> list[Any]:
    """About ``objects`` objects: instances with a dict, a str, a list and ints."""
    return [Item(i) for i in range(objects // 5)]


def work(keep: bool) -> None:
    data = {f"k{i}": (i, str(i)) for i in range(50)}
    if keep:
        KEPT.append(bytes(4096))
    del data


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_calls(
    probe: Probe, calls: int, done: Any = None
) -> tuple[list[float], list[float], list[float]]:
    """Calls in a 1:9 mix; CPU per call for suspect, other, and other-after-suspect."""
    suspect, other, after = [], [], []
    tasks = {True: _Task("suspect"), False: _Task("other")}
    previous_suspect = False
    i = 0
    while i < calls or (done is not None and not done()):
        is_suspect = i % 10 == 0
        task = tasks[is_suspect]
        started = time.thread_time()
        probe.on_task_prerun(task_id=f"id-{i}", task=task)
        work(is_suspect)
        probe.on_task_postrun(task_id=f"id-{i}", task=task, state="SUCCESS")
        spent = time.thread_time() - started
        if is_suspect:
            suspect.append(spent)
        elif previous_suspect:
            after.append(spent)
        else:
            other.append(spent)
        previous_suspect = is_suspect
        i += 1
    return suspect, other, after


def median_us(values: list[float]) -> float:
    return statistics.median(values) * 1e6 if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1_200_000, help="heap size in objects")
    parser.add_argument("--calls", type=int, default=50, help="K: calls of the suspect traced")
    parser.add_argument("--frames", type=int, default=10, help="tracemalloc frames")
    parser.add_argument("--mix-calls", type=int, default=3000, help="calls per phase A and C")
    args = parser.parse_args()
    print(f"Machine: {describe_machine()}; load {load_average()}")
    heap = build_heap(args.objects)
    gc.collect()
    print(f"Heap: {len(gc.get_objects()):,} gc-tracked objects, peak RSS {peak_rss_mb():.0f} MB")
    probe = Probe(Channel("/nonexistent/celery-warden-bench.sock"), heartbeat_seconds=0)

    # A: no trace
    a_suspect, a_other, _ = run_calls(probe, args.mix_calls)
    # B: a diagnosis of the suspect, K calls
    peak_before = peak_rss_mb()
    trace = Trace("suspect", args.calls, args.frames)
    probe.trace = trace
    b_suspect, b_other, b_after = run_calls(probe, 0, done=trace.done.is_set)
    probe.trace = None
    started = time.perf_counter()
    result = trace.result(show_values=False)
    result_seconds = time.perf_counter() - started
    peak_growth = peak_rss_mb() - peak_before
    # C: tracemalloc on the whole time at the same depth
    tracemalloc.start(args.frames)
    c_suspect, c_other, _ = run_calls(probe, args.mix_calls)
    tracemalloc.stop()

    other_ratio = median_us(b_other) / median_us(a_other)
    rows = [
        ["other (no trace)", f"{median_us(a_other):.1f}", "1.00"],
        ["other, while the suspect is traced", f"{median_us(b_other):.1f}", f"{other_ratio:.2f}"],
        ["other, right after a traced call", f"{median_us(b_after):.1f}",
         f"{median_us(b_after) / median_us(a_other):.2f}"],
        ["other, tracemalloc always on", f"{median_us(c_other):.1f}",
         f"{median_us(c_other) / median_us(a_other):.2f}"],
        ["suspect (no trace)", f"{median_us(a_suspect):.1f}", "1.00"],
        ["suspect, traced (window)", f"{median_us(b_suspect):.1f}",
         f"{median_us(b_suspect) / median_us(a_suspect):.2f}"],
        ["suspect, tracemalloc always on", f"{median_us(c_suspect):.1f}",
         f"{median_us(c_suspect) / median_us(a_suspect):.2f}"],
    ]  # fmt: skip
    print_table(
        f"CPU per call (median, us; heap {args.objects:,} objects, K = {args.calls}, "
        f"{args.frames} frames)",
        ["calls", "CPU per call", "x no trace"],
        rows,
    )
    print(
        f"Diagnosis: {result['calls_traced']} calls traced, kept "
        f"{result['kept_bytes_per_call']:.0f} B/call (planted 4096), top site "
        f"{result['sites'][0]['file'].rsplit('/', 1)[-1]}:{result['sites'][0]['line']}, "
        f"roots {[r['path'] for r in result['roots']]}; result with roots built in "
        f"{result_seconds * 1000:.0f} ms; peak RSS grew {peak_growth:.1f} MB "
        f"(target < {TARGET_RSS_MB:.0f} MB)"
    )
    traced_ratio = median_us(b_suspect) / median_us(c_suspect)
    print(
        f"Targets: other names keep their speed: {other_ratio:.2f}x "
        f"({'met' if other_ratio <= TARGET_OTHER_RATIO else 'NOT met'}); a traced suspect "
        f"call costs {traced_ratio:.2f}x the call under tracemalloc always on "
        f"({'met' if traced_ratio <= 1.0 + 0.25 else 'NOT met'}, the window adds a "
        f"snapshot of one call); peak RSS +{peak_growth:.1f} MB "
        f"({'met' if peak_growth < TARGET_RSS_MB else 'NOT met'})"
    )
    del heap
    return 0


if __name__ == "__main__":
    sys.exit(main())
