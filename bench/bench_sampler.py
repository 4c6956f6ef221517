"""Sampler cost: the CPU one 1 Hz sweep of a worker tree costs, against naive psutil.

For each tree size (16, 64 and 256 pool children by default) the script starts a fake
prefork worker (bench/_tree.py: a master running a script named ``celery ... worker``
that forks children, each holding 25 to 35 MiB of private memory) and measures, in one
run on that same tree, the thread CPU time (user + system) of one sweep of:

* the warden's fast part alone: the real ``Sampler.sweep()`` with
  ``smaps_max_age_seconds`` so large that, once every process has had its first
  ``smaps_rollup`` read, no sweep reads it again: stat, fd count and rescans only;
* the warden with its default ``SamplerConfig``: the same plus USS/PSS/swap
  (``smaps_rollup``) and peak RSS for every process at least every 30 s. The
  difference with the previous line is the smaps part. Whole 30 s cycles are
  measured, and the longest gap between two USS reads of one process is checked;
* psutil's equivalent of the fast part: ``memory_info``, ``cpu_times``,
  ``num_threads`` and ``num_fds`` on every process (a reference);
* the naive alternative: psutil ``memory_full_info`` plus ``cpu_times``,
  ``num_threads`` and ``num_fds`` on every process, every sweep. Process objects are
  created once and children are not rediscovered, which flatters it.

The sampler runs on a fake clock that advances 1 s per sweep, so its schedule (the
smaps refresh, the 10 s rescan) is that of a 1 Hz sweep while the benchmark does not
wait a second between sweeps; it pauses ``--pause`` seconds (0.1) instead: back to
back, with warm caches, sweeps cost 10 to 40% less, while pauses from 0.02 s to a
real 1 s cost about the same. CPU per sweep at 1 Hz is the share of one core. The four
are interleaved in rounds (``--rounds``, 4) and each figure is the median of its
rounds. It also times the /proc reads one by one (per call) on the 64-child tree.

Run: ``python bench/bench_sampler.py`` (about 2 minutes; ``--help`` for the options).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from _tree import WorkerTree, worker_tree
from _util import describe_machine, load_average, mean, print_table, ratio
from celery_warden import _procs
from celery_warden._config import SamplerConfig
from celery_warden._records import Sample
from celery_warden.sampler import Sampler
from celery_warden.store import Record

TARGET_FAST = 0.003  # share of one core for the 1 Hz fast sweep of 64 processes
TARGET_SMAPS = 0.005  # and for refreshing USS/PSS of all of them every 30 s
TARGET_SIZE = 64
FAST_ONLY = SamplerConfig(smaps_max_age_seconds=1e12)
MIB = 1024 * 1024


@dataclass(slots=True)
class Measured:
    """CPU seconds per sweep of each measured block, and what the sweeps read."""

    blocks: list[float] = field(default_factory=list)  # mean CPU seconds a sweep, per block
    worst: float = 0.0  # the costliest single sweep
    sweeps: int = 0
    scans: int = 0  # full /proc scans for new processes (every 10 s, or a new PID)
    smaps_reads: int = 0
    max_uss_gap: float = math.inf  # longest time between two USS reads of one process (s)

    @property
    def per_sweep(self) -> float:
        """The median over blocks: robust to a block disturbed by another program."""
        return statistics.median(self.blocks) if self.blocks else math.nan


class FakeClock:
    """The sampler's clock: advanced by hand, one interval per sweep."""

    def __init__(self) -> None:
        self.now = 1_000_000_000.0

    def __call__(self) -> float:
        return self.now


class _ScanCounter:
    """Counts the sampler's full /proc scans (each calls ``_procs.list_pids``)."""

    calls = 0
    _list_pids = staticmethod(_procs.list_pids)

    @classmethod
    def list_pids(cls) -> list[int]:
        cls.calls += 1
        return cls._list_pids()


_procs.list_pids = _ScanCounter.list_pids  # counting only; the reading is unchanged


class SamplerRun:
    """The real Sampler on one tree, with a fake 1 Hz clock."""

    def __init__(self, tree: WorkerTree, config: SamplerConfig) -> None:
        self.config = config
        self.clock = FakeClock()
        self.sampler = Sampler(config, clock=self.clock)
        self.sampler.add_anchor(tree.master)
        self.pids = tree.pids
        self.last_uss: dict[int, float] = {}
        self.result = Measured(max_uss_gap=0.0)

    def _sweep(self, pause: float) -> tuple[float, list[Record]]:
        time.sleep(pause)
        start = time.thread_time()
        records = self.sampler.sweep()
        spent = time.thread_time() - start
        self.clock.now += self.config.interval_seconds
        return spent, records

    def warm_up(self, sweeps: int, pause: float) -> None:
        for _ in range(sweeps):
            self._sweep(pause)

    def measure(self, sweeps: int, pause: float) -> None:
        """Measure ``sweeps`` sweeps as one block."""
        res = self.result
        spent_total = 0.0
        for _ in range(sweeps):
            scans = _ScanCounter.calls
            spent, records = self._sweep(pause)
            res.scans += _ScanCounter.calls - scans
            spent_total += spent
            res.worst = max(res.worst, spent)
            samples = [r for r in records if isinstance(r, Sample)]
            if len(samples) != len(self.pids):
                raise RuntimeError(f"sampled {len(samples)} processes, not {len(self.pids)}")
            for r in samples:
                if r.uss_bytes is not None:
                    if r.pid in self.last_uss:
                        res.max_uss_gap = max(res.max_uss_gap, r.t - self.last_uss[r.pid])
                    self.last_uss[r.pid] = r.t
                    res.smaps_reads += 1
        res.sweeps += sweeps
        res.blocks.append(spent_total / sweeps)

    def finish(self) -> Measured:
        """The result; a process whose USS was not read lately has its gap still open."""
        last = self.clock.now - self.config.interval_seconds
        for pid in self.pids:
            gap = last - self.last_uss.get(pid, -math.inf)
            self.result.max_uss_gap = max(self.result.max_uss_gap, gap)
        return self.result


def _psutil_fast(p: psutil.Process) -> None:
    p.memory_info()
    p.cpu_times()
    p.num_threads()
    p.num_fds()


def _psutil_full(p: psutil.Process) -> None:
    p.memory_full_info()
    p.cpu_times()
    p.num_threads()
    p.num_fds()


class PsutilRun:
    """Read every process of the tree with psutil, once a sweep."""

    def __init__(self, tree: WorkerTree, read: Callable[[psutil.Process], None]) -> None:
        self.procs = [psutil.Process(pid) for pid in tree.pids]
        self.read = read
        full = read is _psutil_full
        self.result = Measured(max_uss_gap=1.0 if full else math.inf)
        self.reads_smaps = full

    def measure(self, sweeps: int, pause: float) -> None:
        spent_total = 0.0
        for _ in range(sweeps):
            time.sleep(pause)
            start = time.thread_time()
            for p in self.procs:
                self.read(p)
            spent = time.thread_time() - start
            spent_total += spent
            self.result.worst = max(self.result.worst, spent)
        self.result.sweeps += sweeps
        self.result.smaps_reads += len(self.procs) * sweeps if self.reads_smaps else 0
        self.result.blocks.append(spent_total / sweeps)


def _open_read(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def _os_read(pid: int, name: str) -> bytes:
    fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _stat_fd_dir(pid: int) -> int:
    return os.stat(f"/proc/{pid}/fd").st_size  # the fd count on Linux 6.2+


def per_call(tree: WorkerTree, repeat: int = 20) -> list[tuple[str, float]]:
    """Microseconds per call of each reader, averaged over every process of the tree."""
    pids = tree.pids
    procs = [psutil.Process(pid) for pid in pids]
    readers: list[tuple[str, Callable[[], object]]] = [
        ("_procs.read_stat (/proc/PID/stat)", lambda: [_procs.read_stat(p) for p in pids]),
        ("/proc/PID/stat, open().read() only", lambda: [_open_read(p, "stat") for p in pids]),
        ("/proc/PID/stat, os.open+os.read only", lambda: [_os_read(p, "stat") for p in pids]),
        ("/proc/PID/statm, os.open+os.read only", lambda: [_os_read(p, "statm") for p in pids]),
        ("_procs.count_open_fds (stat of fd/)", lambda: [_procs.count_open_fds(p) for p in pids]),
        ("os.stat(/proc/PID/fd).st_size", lambda: [_stat_fd_dir(p) for p in pids]),
        ("_procs.read_smaps (smaps_rollup)", lambda: [_procs.read_smaps(p) for p in pids]),
        ("_procs.read_peak_rss (status)", lambda: [_procs.read_peak_rss(p) for p in pids]),
        ("psutil memory_info", lambda: [p.memory_info() for p in procs]),
        ("psutil cpu_times", lambda: [p.cpu_times() for p in procs]),
        ("psutil num_threads", lambda: [p.num_threads() for p in procs]),
        ("psutil num_fds", lambda: [p.num_fds() for p in procs]),
        ("psutil memory_full_info", lambda: [p.memory_full_info() for p in procs]),
    ]
    results = []
    for name, read in readers:
        read()
        start = time.thread_time()
        for _ in range(repeat):
            read()
        results.append((name, (time.thread_time() - start) / repeat / len(procs) * 1e6))
    return results


def resident_mib(tree: WorkerTree) -> float:
    """Mean RSS of the tree's processes, MiB."""
    return mean([_procs.read_stat(pid).rss_bytes / MIB for pid in tree.pids])


@dataclass(frozen=True, slots=True)
class SizeResult:
    children: int
    rss_mib: float
    fast: Measured
    full: Measured
    psutil_fast: Measured
    naive: Measured
    calls: list[tuple[str, float]]


def measure(children: int, args: argparse.Namespace) -> SizeResult:
    """Every measurement on one tree of ``children`` pool children, interleaved in rounds."""
    with worker_tree(children, args.mb_min, args.mb_max) as tree:
        n = len(tree.pids)
        fast = SamplerRun(tree, FAST_ONLY)
        fast.warm_up(math.ceil(n / FAST_ONLY.smaps_min_per_sweep) + 3, 0.0)
        full = SamplerRun(tree, SamplerConfig())
        cycle = int(full.config.smaps_max_age_seconds / full.config.interval_seconds)
        full.warm_up(cycle + math.ceil(n / full.config.smaps_min_per_sweep), 0.0)
        ps_fast, naive = PsutilRun(tree, _psutil_fast), PsutilRun(tree, _psutil_full)
        naive.measure(1, args.pause)  # warm up psutil too
        naive.result = Measured(max_uss_gap=1.0)
        for _ in range(args.rounds):
            # A block of the default sampler is one whole smaps cycle (30 sweeps).
            fast.measure(cycle, args.pause)
            full.measure(cycle, args.pause)
            ps_fast.measure(args.naive_sweeps, args.pause)
            naive.measure(args.naive_sweeps, args.pause)
        calls = per_call(tree) if children == TARGET_SIZE else []
        return SizeResult(
            children,
            resident_mib(tree),
            fast.finish(),
            full.finish(),
            ps_fast.result,
            naive.result,
            calls,
        )


def _pct(seconds_per_sweep: float) -> str:
    return f"{seconds_per_sweep * 100:.3f}%"


def report(results: list[SizeResult]) -> None:
    print_table(
        "Sampler: CPU of one core at a 1 Hz sweep (thread CPU time, user + system)",
        [
            "processes",
            "mean RSS",
            "warden fast",
            "warden smaps part",
            "warden total",
            "longest USS gap",
            "psutil fast fields",
            "naive psutil full",
            "naive / warden",
        ],
        [
            (
                f"{len_tree(r)} (1 + {r.children})",
                f"{r.rss_mib:.0f} MiB",
                _pct(r.fast.per_sweep),
                _pct(r.full.per_sweep - r.fast.per_sweep),
                _pct(r.full.per_sweep),
                f"{r.full.max_uss_gap:.0f} s",
                _pct(r.psutil_fast.per_sweep),
                _pct(r.naive.per_sweep),
                ratio(r.naive.per_sweep, r.full.per_sweep),
            )
            for r in results
        ],
    )
    print_table(
        "Sampler: per process and per sweep",
        [
            "processes",
            "warden fast / process",
            "psutil fast / process",
            "psutil / warden (fast)",
            "warden worst sweep",
            "smaps reads / sweep",
            "/proc scans / sweep",
        ],
        [
            (
                len_tree(r),
                f"{r.fast.per_sweep / len_tree(r) * 1e6:.1f} us",
                f"{r.psutil_fast.per_sweep / len_tree(r) * 1e6:.1f} us",
                ratio(r.psutil_fast.per_sweep, r.fast.per_sweep),
                f"{r.full.worst * 1e3:.1f} ms",
                f"{r.full.smaps_reads / r.full.sweeps:.1f}",
                f"{(r.fast.scans + r.full.scans) / (r.fast.sweeps + r.full.sweeps):.2f}",
            )
            for r in results
        ],
    )
    for r in results:
        if r.calls:
            rss = r.rss_mib
            rows = [(name, f"{us:.1f} us") for name, us in r.calls]
            smaps_us = dict(r.calls)["_procs.read_smaps (smaps_rollup)"]
            rows.append(("smaps_rollup per MiB resident", f"{smaps_us / rss:.1f} us"))
            print_table(
                f"Per call, mean over the {len_tree(r)} processes (mean RSS {rss:.0f} MiB)",
                ["reader", "cost"],
                rows,
            )
    verdicts(results)


def len_tree(r: SizeResult) -> int:
    return r.children + 1


def verdicts(results: list[SizeResult]) -> None:
    for r in results:
        if r.children != TARGET_SIZE:
            continue
        fast, smaps = r.fast.per_sweep, r.full.per_sweep - r.fast.per_sweep
        ok_fast = fast < TARGET_FAST
        ok_smaps = smaps < TARGET_SMAPS and r.full.max_uss_gap <= 30.0
        print(
            f"target fast sweep < 0.3% of a core: {_pct(fast)} -> {'met' if ok_fast else 'MISSED'}"
        )
        print(
            f"target USS/PSS every <= 30 s within 0.5%: {_pct(smaps)}, longest gap "
            f"{r.full.max_uss_gap:.0f} s -> {'met' if ok_smaps else 'MISSED'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256", help="pool children per tree")
    parser.add_argument("--mb-min", type=int, default=25, help="least private MiB a child")
    parser.add_argument("--mb-max", type=int, default=35, help="most private MiB a child")
    parser.add_argument("--rounds", type=int, default=4, help="measured blocks of each")
    parser.add_argument("--naive-sweeps", type=int, default=5, help="psutil sweeps a block")
    parser.add_argument("--pause", type=float, default=0.1, help="seconds between sweeps")
    args = parser.parse_args()
    print(f"machine: {describe_machine()}; load average {load_average()}")
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"measuring a tree of 1 + {size} processes...", flush=True)
        results.append(measure(size, args))
    report(results)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
