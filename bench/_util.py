"""What the benchmarks share: the machine's description and Markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path

__all__ = ["cpu_model", "describe_machine", "load_average", "mean", "print_table", "ratio"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def describe_machine() -> str:
    """One line: cores, CPU, memory, kernel, Python."""
    with Path("/proc/meminfo").open() as f:
        mem_kb = int(f.readline().split()[1])
    return (
        f"{os.cpu_count()} cores ({cpu_model()}), {mem_kb / 1024**2:.0f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other programs skew every figure here."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def ratio(slow: float, fast: float) -> str:
    """``slow / fast`` as ``12.3x``."""
    return f"{slow / fast:.1f}x" if fast > 0 else "-"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table (what docs/benchmarks.md records), right-aligned numbers."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print(flush=True)
