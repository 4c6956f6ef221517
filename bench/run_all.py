"""Run every benchmark, one after the other, each in its own Python process.

Each script measures celery-warden against its alternative in one run and prints
Markdown tables (the ones docs/benchmarks.md records) and whether each target is met.
``make bench`` runs this; run a script alone for its options (``--help``).
The whole takes about 20 minutes on 2 cores (bench_probe.py and bench_guard.py need
Redis).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from _util import describe_machine, load_average

HERE = Path(__file__).resolve().parent
SCRIPTS = (
    "bench_sampler.py",
    "bench_store.py",
    "bench_probe.py",
    "bench_heap.py",
    "bench_diagnose.py",
    "bench_guard.py",
)


def run(script: str) -> int:
    """Run one benchmark script; return its exit code."""
    print(f"\n## {script}\n", flush=True)
    start = time.perf_counter()
    code = subprocess.call([sys.executable, str(HERE / script)])
    print(f"({script}: {time.perf_counter() - start:.0f} s, exit {code})", flush=True)
    return code


def main() -> int:
    print(f"machine: {describe_machine()}")
    print(f"load average before: {load_average()}")
    codes = [run(script) for script in SCRIPTS]
    print(f"\nload average after: {load_average()}")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
