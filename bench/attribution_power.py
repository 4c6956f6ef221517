"""How many calls the per-task-name attribution needs to find a leak, and how often it
blames a clean name.

Each trial simulates a prefork pool: 2 processes, 3 task names in a random mix
(``mixed.leak`` at 10% of calls, ``mixed.quick`` and ``mixed.bulky`` at 45% each),
behind an allocator modelled on glibc:

* the heap grows in 132 KiB steps (128 KiB of ``M_TOP_PAD`` plus rounding) whenever
  live data and the call's transient allocations no longer fit, and is trimmed back
  to the live data after half the calls (the other half leave fragments that pin the
  high-water mark until a later trim);
* transient allocations of 128 KiB or more are mmap'd and returned at once;
* ``mixed.bulky``'s transients are ``noise`` bytes at most (uniform), and one call in
  500 allocates 40 MiB of small objects that raises the high-water mark once;
* every RSS reading has 0 to 16 pages of jitter (the stack, other arenas);
* warm-up: the first call of each name in a process imports 2 MiB, and the first
  50 calls fill caches (300 KiB decaying).

A leak is kept by ``mixed.leak``: ``leak`` bytes per call. For each leak size and
noise level the table gives the fewest calls (from a ladder) at which at least 90%
of trials call ``mixed.leak`` a leak; the false-positive rate is the share of clean
names called a leak across all trials without a leak.

Run: ``python bench/attribution_power.py`` (about a minute; ``--trials 20`` for a
quick look). Seeds are fixed: the table is the same on every machine.
"""

from __future__ import annotations

import argparse
import math
import random
import time

from celery_warden._records import TaskFinished, TaskState, Verdict
from celery_warden.analysis.attribution import attribute_growth

KIB = 1024
MIB = 1024 * KIB
PAGE = 4 * KIB
HEAP_STEP = 132 * KIB
MMAP_THRESHOLD = 128 * KIB
BASE_BYTES = 60 * MIB
LEAK = "mixed.leak"
MIX = (("mixed.leak", 0.10), ("mixed.quick", 0.45), ("mixed.bulky", 0.45))


class Heap:
    """A glibc-like heap: live bytes, and a top that steps up and is sometimes trimmed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.live = 0
        self.top = 0

    def run(self, kept: int, transient: int, trim_share: float = 0.5) -> None:
        """Run one call: allocate ``transient`` (freed at the end) and keep ``kept``."""
        peak = self.live + kept + (transient if transient < MMAP_THRESHOLD else 0)
        if peak > self.top:
            self.top += math.ceil((peak - self.top) / HEAP_STEP) * HEAP_STEP
        self.live += kept
        if self.rng.random() < trim_share:
            # free() trims the top once more than M_TRIM_THRESHOLD (128 KiB) is free there.
            fitted = math.ceil(self.live / HEAP_STEP) * HEAP_STEP
            if self.top - fitted > MMAP_THRESHOLD:
                self.top = fitted

    def rss(self) -> int:
        """Return the process's RSS: base, the heap's pages, a little jitter."""
        return BASE_BYTES + self.top + PAGE * self.rng.randint(0, 16)


def simulate(
    seed: int,
    calls: int,
    leak: int,
    noise: int,
    processes: int = 2,
    jump_every: int = 500,
) -> list[list[TaskFinished]]:
    """Return ``processes`` series of ``calls`` calls in all, as the probe records them."""
    rng = random.Random(seed)
    names = [n for n, _ in MIX]
    weights = [w for _, w in MIX]
    series: list[list[TaskFinished]] = []
    for pid in range(processes):
        heap = Heap(rng)
        seen: set[str] = set()
        records: list[TaskFinished] = []
        for i in range(calls // processes):
            name = rng.choices(names, weights)[0]
            kept = 0
            if name not in seen:
                seen.add(name)
                kept += 2 * MIB
            kept += int(300 * KIB * math.exp(-i / 15.0)) if i < 50 else 0
            transient = rng.randint(0, 32 * KIB)
            if name == LEAK:
                kept += leak
            elif name == "mixed.bulky":
                transient = rng.randint(0, noise)
                if rng.random() < 1.0 / jump_every:
                    transient = 40 * MIB
                    heap.run(kept, transient, trim_share=0.0)
                    records.append(_record(pid, i, name, heap.rss()))
                    continue
            heap.run(kept, transient)
            records.append(_record(pid, i, name, heap.rss()))
        series.append(records)
    return series


def _record(pid: int, i: int, name: str, rss: int) -> TaskFinished:
    """Return the probe's record of one call."""
    return TaskFinished(
        pid=1000 + pid,
        start_ticks=1,
        task_id=f"{pid}-{i}",
        name=name,
        t=1_700_000_000.0 + i,
        wall_seconds=0.01,
        state=TaskState.SUCCESS,
        rss_after_bytes=rss,
    )


def detection_rate(leak: int, noise: int, calls: int, trials: int) -> tuple[float, int, int]:
    """Return the share of trials finding the leak, and clean names blamed / judged."""
    found = blamed = judged = 0
    for seed in range(trials):
        results = {a.name: a for a in attribute_growth(simulate(seed, calls, leak, noise))}
        found += results[LEAK].verdict is Verdict.LEAK
        for name in ("mixed.quick", "mixed.bulky"):
            judged += 1
            blamed += results[name].verdict is Verdict.LEAK
    return found / trials, blamed, judged


def main() -> None:
    """Print the power table and the false-positive rate."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args()
    ladder = [500, 1000, 2000, 4000, 8000, 16000, 32000]
    leaks = [1 * KIB, 4 * KIB, 16 * KIB, 64 * KIB]
    noises = [64 * KIB, 1 * MIB, 8 * MIB]
    started = time.perf_counter()
    print(f"calls needed for {90}% detection ({args.trials} trials per cell)\n")
    print("| leak per call | " + " | ".join(f"noise {n // KIB} KiB" for n in noises) + " |")
    print("|---|" + "---|" * len(noises))
    blamed_all = judged_all = 0
    for leak in leaks:
        cells = []
        for noise in noises:
            needed = "> 32,000"
            for calls in ladder:
                rate, _, _ = detection_rate(leak, noise, calls, args.trials)
                if rate >= 0.9:
                    needed = f"{calls:,}"
                    break
            cells.append(needed)
        print(f"| {leak // KIB} KiB | " + " | ".join(cells) + " |")
    for noise in noises:
        for calls in (2000, 8000):
            _, blamed, judged = detection_rate(0, noise, calls, args.trials)
            blamed_all += blamed
            judged_all += judged
    print(
        f"\nfalse positives: {blamed_all} of {judged_all} clean names called a leak "
        f"({100 * blamed_all / judged_all:.1f}%) without any leak"
    )
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
