"""Store cost: ingest through ``Store.write``, retention, and ``report`` over 24 hours.

Ingest: the same 1 Hz samples of 64 processes (USS every 30 s, as the sampler reads
it) are written, each variant into a fresh store in one run, by

* ``Store.write`` with one sweep (64 samples) a transaction: the session's writer at
  1 Hz;
* ``Store.write`` with 64 sweeps (4,096 samples) a transaction: the writer catching up
  (it takes up to 64 queued batches at once);
* ``Store.write`` with one sample a call: a commit per row, in the store's own WAL
  mode, to isolate what batching buys;
* the naive alternative: plain ``sqlite3`` with its defaults (rollback journal,
  ``synchronous=FULL``), the same schema, ``INSERT`` and ``commit()`` per row;
* a floor: one ``executemany`` of the bare rows in one transaction (what SQLite itself
  costs, with none of the store's per-record work).

Retention at steady state: a store holding what 90 days leave behind for 64
processes (15-minute and 1-minute aggregates, one hour raw: 1.4 million rows, inserted
directly, since 90 days cannot be simulated through the writer in minutes) gets three
``apply_retention`` calls 300 s apart; each is timed, and its share of a core when it
runs every 300 s is reported. It has no alternative to compare with: it is context
for the writer's cost.

Report: 24 hours of 1 Hz samples for 64 processes (5.5 million rows) are generated on
a fake clock through ``Store.write`` (60 sweeps a transaction, to keep generation to
about 3 minutes) into two stores at once: one where
``Store.apply_retention(now, Retention())`` runs every 300 s of simulated time, as
the writer does, and one where it never runs. Then, for each store, ``read_snapshot``,
``build_report`` and the text and JSON reporters are timed in a fresh process (with
its peak RSS), and, on the retained store, ``celery-warden report`` end to end as a
subprocess in both formats (``--raw-cli`` runs it on the raw store too, about two
more minutes each). The store files' sizes are compared.

Run: ``python bench/bench_store.py`` (about 4 minutes; ``--hours 2`` for a quick look,
``--only ingest``, ``--only retention`` or ``--only report``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from _util import describe_machine, load_average, print_table, ratio
from celery_warden._config import Retention
from celery_warden._records import ProcessInfo, Role, Sample
from celery_warden.analysis.report import build_report
from celery_warden.reporters import JsonReporter, TextReporter
from celery_warden.store import Store, read_snapshot
from celery_warden.store._schema import MIGRATIONS

PROCESSES = 64
MIB = 1024 * 1024
T0 = 1_700_000_000.0  # the fake clock's start
TARGET_INGEST = 20_000  # samples a second through Store.write
TARGET_REPORT = 5.0  # seconds for `celery-warden report` over 24 h of 64 processes
BATCH_SWEEPS = 60  # sweeps a transaction while generating: 5 batches per retention

T = TypeVar("T")


# -- the fake worker's samples ---------------------------------------------------------


def process_infos() -> list[ProcessInfo]:
    """A master (PID 1000) and its 63 pool children."""
    infos = [ProcessInfo(1000, 500, 1, Role.MASTER, T0, "celery -A proj worker -c 63", 1000)]
    infos += [
        ProcessInfo(1000 + i, 500 + i, 1000, Role.CHILD, T0, "celery -A proj worker -c 63", 1000)
        for i in range(1, PROCESSES)
    ]
    return infos


def _rss(index: int, hours: float, rng: random.Random) -> float:
    """One process's RSS in bytes: a mix of leaking, warming-up, stepped and flat ones."""
    base = (90 if index == 0 else 60) * MIB + rng.random() * 2 * MIB
    kind = index % 4 if index else 2
    if kind == 0:
        return base + 3 * MIB * hours  # a leak: 3 MiB an hour
    if kind == 1:
        return base + 20 * MIB * (1 - math.exp(-hours / 2))  # warming up to a plateau
    if kind == 3 and hours > 6:
        return base + 15 * MIB  # one big task's high-water mark
    return base


@dataclass(slots=True)
class SampleSource:
    """Samples of the fake worker, one sweep at a time, as the sampler would emit them."""

    rng: random.Random = field(default_factory=lambda: random.Random(42))
    peaks: list[int] = field(default_factory=lambda: [0] * PROCESSES)

    def sweep(self, k: int) -> list[Sample]:
        """The samples of sweep ``k`` (at ``T0 + k`` seconds)."""
        t, hours = T0 + k, k / 3600.0
        out = []
        for i in range(PROCESSES):
            rss = int(_rss(i, hours, self.rng))
            self.peaks[i] = max(self.peaks[i], rss)
            smaps = (k + i) % 30 == 0  # every process every 30 s, staggered
            out.append(
                Sample(
                    pid=1000 + i,
                    start_ticks=500 + i,
                    t=t,
                    state="sleeping",
                    rss_bytes=rss,
                    cpu_user_seconds=k * 0.01 * (1 + i % 3),
                    cpu_system_seconds=k * 0.002,
                    threads=5 if i == 0 else 3,
                    open_fds=(40 if i == 0 else 15) + (k // 1800 if i == 5 else 0),
                    uss_bytes=rss - 9 * MIB if smaps else None,
                    pss_bytes=rss - 7 * MIB if smaps else None,
                    swap_bytes=0 if smaps else None,
                    shared_bytes=9 * MIB if smaps else None,
                    rss_peak_bytes=self.peaks[i] if smaps else None,
                )
            )
        return out


def open_store(path: Path) -> tuple[Store, int]:
    """A new store holding one session with the fake worker's processes announced."""
    store = Store.open(path)
    session = store.begin_session("run", "celery -A proj worker -c 63", 1.0)
    store.write(session, process_infos())
    return store, session


# -- ingest ----------------------------------------------------------------------------


_INSERT = (
    "INSERT INTO samples (process_id, t, state, rss_bytes, rss_peak_bytes, cpu_user_seconds,"
    " cpu_system_seconds, threads, open_fds, uss_bytes, pss_bytes, swap_bytes, shared_bytes,"
    " missing) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _row(s: Sample) -> tuple[object, ...]:
    # process ids 1..64 follow the announcement order, as in the store.
    return (
        s.pid - 999,
        s.t,
        s.state,
        s.rss_bytes,
        s.rss_peak_bytes,
        s.cpu_user_seconds,
        s.cpu_system_seconds,
        s.threads,
        s.open_fds,
        s.uss_bytes,
        s.pss_bytes,
        s.swap_bytes,
        s.shared_bytes,
        None,
    )


def _plain_db(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 database with the store's schema and SQLite's default settings."""
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO sessions VALUES (1, 'run', 'x', 'h', 'b', 1, 1.0, 0, NULL, NULL, 0)")
    conn.executemany(
        "INSERT INTO processes (id, session_id, pid, start_ticks, ppid, master_pid, role,"
        " cmdline, started_at) VALUES (?, 1, ?, ?, 1, 1000, 'child', 'celery', 0)",
        [(i + 1, 1000 + i, 500 + i) for i in range(PROCESSES)],
    )
    conn.commit()
    return conn


def ingest_store_write(path: Path, sweeps: list[list[Sample]], per_batch: int) -> float:
    """Seconds to write every sample with ``Store.write``, ``per_batch`` sweeps a call."""
    store, session = open_store(path)
    with closing(store):
        start = time.perf_counter()
        for i in range(0, len(sweeps), per_batch):
            store.write(session, [s for sweep in sweeps[i : i + per_batch] for s in sweep])
        return time.perf_counter() - start


def ingest_store_write_rows(path: Path, samples: list[Sample]) -> float:
    """Seconds to write every sample with one ``Store.write`` call (a commit) each."""
    store, session = open_store(path)
    with closing(store):
        start = time.perf_counter()
        for sample in samples:
            store.write(session, [sample])
        return time.perf_counter() - start


def ingest_naive(path: Path, samples: list[Sample]) -> float:
    """Seconds for plain sqlite3, defaults, INSERT and commit per row."""
    with closing(_plain_db(path)) as conn:
        start = time.perf_counter()
        for sample in samples:
            conn.execute(_INSERT, _row(sample))
            conn.commit()
        return time.perf_counter() - start


def ingest_floor(path: Path, samples: list[Sample]) -> float:
    """Seconds for one executemany of prepared rows in one transaction, WAL mode."""
    with closing(_plain_db(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        rows = [_row(s) for s in samples]
        start = time.perf_counter()
        conn.executemany(_INSERT, rows)
        conn.commit()
        return time.perf_counter() - start


def _writer(data: list[list[Sample]], per_batch: int) -> Callable[[Path], float]:
    return lambda path: ingest_store_write(path, data, per_batch)


def _row_writer(samples: list[Sample]) -> Callable[[Path], float]:
    return lambda path: ingest_store_write_rows(path, samples)


def _naive(samples: list[Sample]) -> Callable[[Path], float]:
    return lambda path: ingest_naive(path, samples)


def _floor(samples: list[Sample]) -> Callable[[Path], float]:
    return lambda path: ingest_floor(path, samples)


def bench_ingest(tmp: Path, sweeps: int, naive_rows: int, row_commits: int) -> None:
    source = SampleSource()
    data = [source.sweep(k) for k in range(sweeps)]
    flat = [s for sweep in data for s in sweep]
    head, rows_only = flat[:row_commits], flat[:naive_rows]
    runs: list[tuple[str, int, Callable[[Path], float]]] = [
        ("Store.write, 1 sweep (64) a transaction", len(flat), _writer(data, 1)),
        ("Store.write, 64 sweeps (4,096) a transaction", len(flat), _writer(data, 64)),
        ("Store.write, 1 sample a transaction", len(head), _row_writer(head)),
        ("naive sqlite3: INSERT + commit a row", len(rows_only), _naive(rows_only)),
        ("floor: one executemany, no Store", len(flat), _floor(flat)),
    ]
    results = []
    for i, (name, rows, run) in enumerate(runs):
        seconds = run(tmp / f"ingest-{i}.db")
        results.append((name, rows, rows / seconds))
    naive_rate = results[3][2]
    print_table(
        f"Ingest: 1 Hz samples of {PROCESSES} processes, each variant into a fresh store",
        ["how", "samples", "samples/s", "vs naive", "per 64-sample sweep"],
        [
            (
                name,
                f"{rows:,}",
                f"{rate:,.0f}",
                ratio(rate, naive_rate),
                f"{64 / rate * 1e3:.2f} ms",
            )
            for name, rows, rate in results
        ],
    )
    rate = results[0][2]
    met = "met" if rate >= TARGET_INGEST else "MISSED"
    print(f"target >= {TARGET_INGEST:,} samples/s through Store.write: {rate:,.0f} -> {met}")


# -- report over 24 hours --------------------------------------------------------------


@dataclass(slots=True)
class Generated:
    seconds: float = 0.0
    retention_calls: int = 0
    retention_seconds: float = 0.0
    retention_worst: float = 0.0


def _batches(hours: float) -> Iterator[tuple[int, list[Sample]]]:
    """Batches of ``BATCH_SWEEPS`` sweeps, with the sweep index that ends each."""
    source = SampleSource()
    total = int(hours * 3600)
    for first in range(0, total, BATCH_SWEEPS):
        last = min(first + BATCH_SWEEPS, total)
        yield last - 1, [s for k in range(first, last) for s in source.sweep(k)]


def generate(retained_path: Path, raw_path: Path, hours: float) -> Generated:
    """Write ``hours`` of samples into both stores; retention runs in the first only."""
    retention = Retention()
    gen = Generated()
    retained, session = open_store(retained_path)
    raw, raw_session = open_store(raw_path)
    start = time.perf_counter()
    last_retention = T0
    try:
        for k, batch in _batches(hours):
            retained.write(session, batch)
            raw.write(raw_session, batch)
            now = T0 + k
            if now - last_retention >= retention.every_seconds:
                last_retention = now
                t = time.perf_counter()
                retained.apply_retention(now, retention)
                spent = time.perf_counter() - t
                gen.retention_calls += 1
                gen.retention_seconds += spent
                gen.retention_worst = max(gen.retention_worst, spent)
    finally:
        retained.close()
        raw.close()
    gen.seconds = time.perf_counter() - start
    return gen


@dataclass(frozen=True, slots=True)
class StoreFacts:
    raw_rows: int
    aggregate_rows: int
    file_bytes: int
    free_pages: int
    page_size: int


def store_facts(path: Path) -> StoreFacts:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        raw = conn.execute("SELECT count(*) FROM samples WHERE resolution_seconds = 0")
        raw_rows = raw.fetchone()[0]
        total = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        page = conn.execute("PRAGMA page_size").fetchone()[0]
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return StoreFacts(raw_rows, total - raw_rows, size, free, page)


@dataclass(frozen=True, slots=True)
class ReportTiming:
    """Seconds of each phase (in a fresh process), and of the CLI where it was run."""

    read: float
    build: float
    text: float
    json: float
    peak_rss: int  # bytes: the largest of the processes that read this store
    cli_text: float | None = None
    cli_json: float | None = None

    @property
    def phases(self) -> float:
        return self.read + self.build + self.text + self.json


def _timed(func: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    value = func()
    return time.perf_counter() - start, value


def _run_child(argv: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and output of a child process that must succeed."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}")
    return seconds, usage.ru_maxrss * 1024, out


def phases(path: Path) -> list[float]:
    """Seconds to read the newest session, build the report and render it both ways."""
    store = Store.open(path, readonly=True)
    with closing(store):
        read, snapshot = _timed(lambda: read_snapshot(store.connection))
    build, report = _timed(lambda: build_report(snapshot))
    text_out, json_out = io.StringIO(), io.StringIO()
    text, _ = _timed(lambda: TextReporter.from_report(report).render(text_out, width=120))
    as_json, _ = _timed(lambda: JsonReporter.from_report(report).render(json_out))
    return [read, build, text, as_json]


def time_report(path: Path, *, cli: bool) -> ReportTiming:
    """Time the phases in a fresh process, then ``celery-warden report`` if ``cli``."""
    _, rss, out = _run_child([sys.executable, __file__, "--phases", str(path)])
    read, build, text, as_json = json.loads(out)
    if not cli:
        return ReportTiming(read, build, text, as_json, rss)
    report = [sys.executable, "-m", "celery_warden", "report", "--store", str(path)]
    cli_text, rss_text, _ = _run_child([*report, "--format", "text"])
    cli_json, rss_json, _ = _run_child([*report, "--format", "json"])
    peak = max(rss, rss_text, rss_json)
    return ReportTiming(read, build, text, as_json, peak, cli_text, cli_json)


def bench_report(tmp: Path, hours: float, raw_cli: bool) -> None:
    retained_path, raw_path = tmp / "retained.db", tmp / "raw.db"
    rows = int(hours * 3600) * PROCESSES
    print(f"generating {hours:g} h of 1 Hz samples for {PROCESSES} processes ({rows:,} rows)...")
    gen = generate(retained_path, raw_path, hours)
    print(f"  {gen.seconds:.0f} s, {rows / gen.seconds:,.0f} samples/s into two stores")
    facts = {name: store_facts(p) for name, p in (("retained", retained_path), ("raw", raw_path))}
    timings = {}
    for name, path, cli in (("retained", retained_path, True), ("raw", raw_path, raw_cli)):
        print(f"timing the report on the {name} store...", flush=True)
        timings[name] = time_report(path, cli=cli)
    _print_report(hours, gen, facts, timings)


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def _print_report(
    hours: float,
    gen: Generated,
    facts: dict[str, StoreFacts],
    timings: dict[str, ReportTiming],
) -> None:
    labels = {"retained": "retention every 300 s", "raw": "no retention (all raw)"}
    print_table(
        f"Report over {hours:g} h of 1 Hz samples, {PROCESSES} processes",
        [
            "store",
            "raw rows",
            "aggregates",
            "file",
            "read_snapshot",
            "build_report",
            "text",
            "JSON",
            "CLI text",
            "CLI JSON",
            "peak RSS",
        ],
        [
            (
                labels[name],
                f"{facts[name].raw_rows:,}",
                f"{facts[name].aggregate_rows:,}",
                _mib(facts[name].file_bytes),
                _s(t.read),
                _s(t.build),
                _s(t.text),
                _s(t.json),
                _s(t.cli_text),
                _s(t.cli_json),
                _mib(t.peak_rss),
            )
            for name, t in timings.items()
        ],
    )
    kept, raw = timings["retained"], timings["raw"]
    size_kept, size_raw = facts["retained"].file_bytes, facts["raw"].file_bytes
    free = facts["retained"].free_pages * facts["retained"].page_size
    print(
        f"retention: report phases {ratio(raw.phases, kept.phases)} faster, store file "
        f"{ratio(size_raw, size_kept)} smaller ({_mib(size_kept)} vs {_mib(size_raw)}, "
        f"{_mib(free)} of it free pages)"
    )
    print(
        f"apply_retention while generating: {gen.retention_calls} calls, mean "
        f"{gen.retention_seconds / max(gen.retention_calls, 1) * 1e3:.0f} ms, "
        f"worst {gen.retention_worst * 1e3:.0f} ms"
    )
    worst = max(kept.cli_text or math.inf, kept.cli_json or math.inf)
    met = "met" if worst < TARGET_REPORT else "MISSED"
    print(
        f"target `celery-warden report` < {TARGET_REPORT:g} s with retention: {_s(worst)} -> {met}"
    )
    worst_raw = max(raw.cli_text or raw.phases, raw.cli_json or raw.phases)
    print(f"without retention: {_s(worst_raw)} ({worst_raw / TARGET_REPORT:.1f}x the target)")


# -- retention at steady state ---------------------------------------------------------


_AGGREGATE = (
    "INSERT INTO samples (process_id, t, resolution_seconds, rss_bytes, rss_peak_bytes,"
    " cpu_user_seconds, cpu_system_seconds, threads, open_fds, uss_bytes, pss_bytes,"
    " swap_bytes, shared_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _steady_rows(now: float, retention: Retention) -> Iterator[tuple[object, ...]]:
    """What a store holds after 90 days: 15-min, then 1-min aggregates, then 1 h raw."""
    spans = (
        (now - retention.quarter_seconds, now - retention.minute_seconds, 900),
        (now - retention.minute_seconds, now - retention.raw_seconds, 60),
        (now - retention.raw_seconds, now + retention.every_seconds, 0),
    )
    for start, end, width in spans:
        smaps = (50 * MIB, 52 * MIB, 0, 9 * MIB) if width else (None, None, None, None)
        for t in range(int(start), int(end), max(int(width), 1)):
            for process_id in range(1, PROCESSES + 1):
                yield (process_id, float(t), width, 60 * MIB, 61 * MIB, 1.0, 1.0, 3, 15, *smaps)


def bench_retention(tmp: Path, calls: int) -> None:
    """Time ``apply_retention`` on a store already at its steady-state size."""
    retention = Retention()
    now = T0 + retention.quarter_seconds
    path = tmp / "steady.db"
    store, _ = open_store(path)
    with closing(store):
        conn = store.connection
        conn.execute("BEGIN")
        conn.executemany(_AGGREGATE, _steady_rows(now, retention))
        conn.execute("COMMIT")
        rows = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
        spent = []
        for k in range(calls):
            start = time.perf_counter()
            store.apply_retention(now + k * retention.every_seconds, retention)
            spent.append(time.perf_counter() - start)
    mean_s = sum(spent) / len(spent)
    print_table(
        f"apply_retention on a steady-state store ({PROCESSES} processes, 90 days)",
        ["rows", "calls (300 s apart)", "mean", "worst", "share of a core (every 300 s)"],
        [
            (
                f"{rows:,}",
                calls,
                f"{mean_s * 1e3:.0f} ms",
                f"{max(spent) * 1e3:.0f} ms",
                f"{mean_s / retention.every_seconds * 100:.2f}%",
            )
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["ingest", "report", "retention"], help="one part")
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours to report on")
    parser.add_argument("--ingest-sweeps", type=int, default=2000, help="sweeps to ingest")
    parser.add_argument("--naive-rows", type=int, default=2000, help="rows for the naive writer")
    parser.add_argument("--row-commits", type=int, default=20000, help="rows, 1 a transaction")
    parser.add_argument("--raw-cli", action="store_true", help="also run the CLI on raw rows")
    parser.add_argument("--retention-calls", type=int, default=3, help="steady-state calls")
    parser.add_argument("--dir", type=Path, help="where to put the stores (default: a temp dir)")
    parser.add_argument("--phases", type=Path, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.phases is not None:
        print(json.dumps(phases(args.phases)))
        return
    print(f"machine: {describe_machine()}; load average {load_average()}")
    with tempfile.TemporaryDirectory(prefix="warden-bench-", dir=args.dir) as tmp:
        if args.only in (None, "ingest"):
            bench_ingest(Path(tmp), args.ingest_sweeps, args.naive_rows, args.row_commits)
        if args.only in (None, "retention"):
            bench_retention(Path(tmp), args.retention_calls)
        if args.only in (None, "report"):
            bench_report(Path(tmp), args.hours, args.raw_cli)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
