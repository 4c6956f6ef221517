"""Heap census and referrer chains: what ``celery_warden.probe._heap`` costs a worker child,
beside the tools people reach for.

Each variant runs in a fresh Python process (``--child``), so that its memory figures
are its own. The process builds the same heap: ``--orders`` orders of a shop (about
1.2 million objects and 90 MB with the default 90,000), as a web app or a Celery
worker would hold them:

- an ``Order`` instance each (a class with a ``__dict__``): an int id, a customer str,
  a ``created`` tuple of three small ints, a 64-byte ``bytes`` payload, a ``meta``
  dict (JSON-like: a constant status str, a float total, a constant tuple of tags, a
  note str) and a list of two ``LineItem`` instances (``__slots__``: a sku str from a
  catalogue of 1,000, a small int quantity, a float price);
- an index dict id -> order (its keys are the orders' ids) and a dict customer ->
  list of ids (its keys are the orders' customer strs): much is held twice, as in
  real heaps.

Then, after ``gc.collect()``, the process resets its peak RSS (writing 5 to
``/proc/self/clear_refs``), reads VmRSS, runs the variant, and reports its wall time
and the growth of VmHWM (the peak RSS) over the VmRSS before: the memory it needs
while it runs. Fast variants run ``--repeat`` times (the median, the range, and the
peak over all runs); slow ones once. The variants:

- census by type: ``gc.get_objects()`` and a ``Counter`` of types (tracked objects,
  no sizes: the floor); ``_heap.census()``; objgraph ``most_common_types()``;
  guppy3 ``hpy().heap()`` and its table by type; pympler ``muppy.get_objects()`` and
  ``summary.summarize()``;
- tracemalloc (1 frame) started before the heap is built: a snapshot, its
  ``statistics("lineno")``, a second snapshot and ``compare_to`` (what "what grew?"
  costs with tracemalloc); and ``_heap.kept_census()`` on the same traced heap (every
  object there was made while tracing: its worst case). The heap is scaled by
  ``--traced-scale``. Then the case the probe's traced calls meet: tracing started
  after the heap was built, 1,000 orders (about 13,000 objects) made and kept, and
  ``kept_census()`` timed alone (it still walks the whole heap);
- referrer chains: a bytearray planted 8 references below a module global
  (``REGISTRY["acme"][0].sessions["s-1"].cart[0][0]``); ``_heap.root_path()``
  against objgraph ``find_backref_chain(obj, is_proper_module)``, which gives the
  objects of the chain but no names. Then the same with the bytearray in a tuple
  (``cart[1][0]``): a tuple of atoms is untracked, so ``gc.get_referrers`` cannot
  see it, and ``root_path`` needs its pass over the untracked containers.

The ratios are the alternative's time over ours. The targets: a census in < 0.5 s
with < 20 MB extra peak RSS, a chain in < 0.5 s, on the 1.2 million object heap.

Run: ``python bench/bench_heap.py`` (about 2 minutes; ``--help`` for the options).
Needs the ``bench`` extra (guppy3, objgraph, pympler).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _util import describe_machine, load_average, print_table, ratio

TARGET_CENSUS_SECONDS = 0.5
TARGET_CENSUS_MB = 20.0
TARGET_CHAIN_SECONDS = 0.5

STATUSES = ("paid", "shipped", "refunded")
TAGS = ("web", "promo")
SKUS = [f"SKU-{i:05d}" for i in range(1000)]


class LineItem:
    __slots__ = ("price", "quantity", "sku")

    def __init__(self, sku: str, quantity: int, price: float) -> None:
        self.sku = sku
        self.quantity = quantity
        self.price = price


class Order:
    def __init__(self, i: int) -> None:
        self.id = 10_000_000 + i
        self.customer = f"customer-{i:07d}@example.com"
        self.created = (2024, 1 + i % 12, 1 + i % 28)
        self.payload = bytes(64)
        self.meta = {
            "status": STATUSES[i % 3],
            "total": i * 1.25,
            "tags": TAGS,
            "note": f"note for order {i}",
        }
        self.lines = [LineItem(SKUS[i % 1000], 1 + i % 5, 9.99), LineItem(SKUS[-1], 1, 0.5)]


class Account:
    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}


class Session:
    def __init__(self) -> None:
        self.cart: list[tuple[object, ...]] = []


HEAP: list[Any] = []
REGISTRY: dict[str, list[Account]] = {}


def build_heap(orders: int) -> None:
    """The shop (module docstring), held by ``HEAP``; the planted chain in REGISTRY."""
    made = [Order(i) for i in range(orders)]
    by_id = {order.id: order for order in made}
    by_customer: dict[str, list[int]] = {}
    for order in made:
        by_customer.setdefault(order.customer, []).append(order.id)
    HEAP[:] = [made, by_id, by_customer]
    account, session = Account(), Session()
    session.cart.append([bytearray(64)])  # a list: the collector tracks it
    session.cart.append((bytearray(32),))  # a tuple of atoms: the collector untracks it
    account.sessions["s-1"] = session
    REGISTRY["acme"] = [account]


def planted(hidden: bool = False) -> object:
    return REGISTRY["acme"][0].sessions["s-1"].cart[1 if hidden else 0][0]


def status() -> dict[str, int]:
    """VmRSS and VmHWM in KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def reset_peak() -> None:
    """Make VmHWM the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


# -- the variants (each runs in its own process) ---------------------------------------


def v_gc_count() -> dict[str, Any]:
    counts = Counter(map(type, gc.get_objects()))
    return {"objects": sum(counts.values()), "types": len(counts)}


def v_census() -> dict[str, Any]:
    from celery_warden.probe import _heap

    rows = _heap.census(limit=30)
    return {"objects": sum(r[1] for r in rows), "bytes": sum(r[2] for r in rows)}


def v_objgraph_types() -> dict[str, Any]:
    import objgraph

    rows = objgraph.most_common_types(limit=30)
    return {"types": len(rows)}


def v_guppy() -> dict[str, Any]:
    from guppy import hpy

    heap = hpy().heap()
    table = str(heap.bytype)  # the table by type, as a person would print it
    return {"objects": heap.count, "bytes": heap.size, "lines": table.count("\n")}


def v_pympler() -> dict[str, Any]:
    from pympler import muppy, summary

    objs = muppy.get_objects()
    rows = summary.summarize(objs)
    return {"objects": sum(r[1] for r in rows), "bytes": sum(r[2] for r in rows)}


def v_tracemalloc() -> dict[str, Any]:
    first = tracemalloc.take_snapshot()
    stats = first.statistics("lineno")
    extra = [bytes(100) for _ in range(1000)]  # something to find
    second = tracemalloc.take_snapshot()
    diff = second.compare_to(first, "lineno")
    del extra
    return {"traces": len(first.traces), "lines": len(stats), "diff": len(diff)}


def v_kept_census() -> dict[str, Any]:
    from celery_warden.probe import _heap

    rows, sample = _heap.kept_census(limit=30)
    return {
        "objects": sum(r[1] for r in rows),
        "bytes": sum(r[2] for r in rows),
        "sample": len(sample),
    }


def v_kept_after() -> dict[str, Any]:
    """Tracing starts after the heap is built (as a traced call does), 1,000 orders
    are made and kept; only ``kept_census`` is timed."""
    from celery_warden.probe import _heap

    if not tracemalloc.is_tracing():
        tracemalloc.start(1)
    HEAP.append([Order(-i) for i in range(1, 1001)])
    started = time.perf_counter()
    rows, sample = _heap.kept_census(limit=30)
    seconds = time.perf_counter() - started
    HEAP.pop()
    counted = {"objects": sum(r[1] for r in rows), "bytes": sum(r[2] for r in rows)}
    return {**counted, "sample": len(sample), "seconds": seconds}


def v_root_path(hidden: bool = False) -> dict[str, Any]:
    from celery_warden.probe import _heap

    return {"path": _heap.root_path(planted(hidden))}


def v_objgraph_chain(hidden: bool = False) -> dict[str, Any]:
    import objgraph

    chain = objgraph.find_backref_chain(planted(hidden), objgraph.is_proper_module)
    names = " -> ".join(type(o).__name__ for o in chain)
    return {"path": f"{len(chain)} objects: {names}", "length": len(chain)}


def v_root_path_hidden() -> dict[str, Any]:
    return v_root_path(hidden=True)


def v_objgraph_chain_hidden() -> dict[str, Any]:
    return v_objgraph_chain(hidden=True)


@dataclass(frozen=True)
class Variant:
    label: str
    func: Callable[[], dict[str, Any]]
    fast: bool = True  # run --repeat times
    traced: bool = False  # tracemalloc on while the heap is built


OURS_PATH = "celery-warden _heap.root_path()"
OBJGRAPH_PATH = "objgraph find_backref_chain(obj, is_proper_module)"
VARIANTS = {
    "gc": Variant("gc.get_objects() + Counter of types (tracked only, no sizes)", v_gc_count),
    "census": Variant("celery-warden _heap.census()", v_census),
    "objgraph": Variant("objgraph most_common_types() (tracked only, no sizes)", v_objgraph_types),
    "guppy": Variant("guppy3 hpy().heap() + table by type", v_guppy, fast=False),
    "pympler": Variant("pympler muppy.get_objects() + summary.summarize()", v_pympler, fast=False),
    "tracemalloc": Variant(
        "tracemalloc: snapshot, statistics, snapshot, compare_to",
        v_tracemalloc,
        fast=False,
        traced=True,
    ),
    "kept": Variant("celery-warden _heap.kept_census()", v_kept_census, traced=True),
    "kept_after": Variant("celery-warden _heap.kept_census(), 1,000 orders kept", v_kept_after),
    "root_path": Variant(OURS_PATH, v_root_path),
    "backref": Variant(OBJGRAPH_PATH, v_objgraph_chain),
    "root_path_hidden": Variant(OURS_PATH, v_root_path_hidden),
    "backref_hidden": Variant(OBJGRAPH_PATH, v_objgraph_chain_hidden),
}


def child(key: str, orders: int, repeat: int) -> None:
    """Build the heap, run one variant, print one JSON line."""
    variant = VARIANTS[key]
    if variant.traced:
        tracemalloc.start(1)
    started = time.perf_counter()
    build_heap(orders)
    built = time.perf_counter() - started
    gc.collect()
    reset_peak()
    before = status()
    seconds, info = [], {}
    for _ in range(repeat if variant.fast else 1):
        started = time.perf_counter()
        info = variant.func()
        seconds.append(info.pop("seconds", time.perf_counter() - started))
    after = status()
    print(
        json.dumps(
            {
                "key": key,
                "seconds": seconds,
                "peak_mb": (after["VmHWM"] - before["VmRSS"]) / 1024,
                "heap_mb": before["VmRSS"] / 1024,
                "build_seconds": built,
                "info": info,
            }
        )
    )


def run(key: str, args: argparse.Namespace) -> dict[str, Any]:
    """One variant in a fresh process."""
    orders = args.orders
    if VARIANTS[key].traced:
        orders = int(orders * args.traced_scale)
    argv = [sys.executable, __file__, "--child", key, "--orders", str(orders)]
    argv += ["--repeat", str(args.repeat)]
    started = time.perf_counter()
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["orders"] = orders
    print(f"  {key}: {time.perf_counter() - started:.0f} s in all", flush=True)
    return result


def median(res: dict[str, Any]) -> float:
    return statistics.median(res["seconds"])


def timing(res: dict[str, Any]) -> tuple[str, str]:
    """The median time and the range over runs."""
    values = res["seconds"]
    spread = f"{min(values):.3f}-{max(values):.3f}" if len(values) > 1 else "1 run"
    return f"{statistics.median(values):.3f} s", spread


def chain_verdict(res: dict[str, Any]) -> tuple[str, bool]:
    """A chain meets the target when it is found, to a root, in time."""
    path = res["info"]["path"] or "?"
    found = not path.startswith("?")
    value = f"{median(res):.3f} s" + ("" if found else ", but no root found")
    return value, found and median(res) < TARGET_CHAIN_SECONDS


def report_census(results: dict[str, dict[str, Any]], orders: int) -> None:
    ours = median(results["census"])
    rows = []
    for key in ("gc", "census", "objgraph", "guppy", "pympler"):
        res, info = results[key], results[key]["info"]
        rows.append(
            (
                VARIANTS[key].label,
                *timing(res),
                f"{res['peak_mb']:.1f} MB",
                f"{info['objects']:,}" if "objects" in info else "-",
                f"{info['bytes'] / 1e6:.1f} MB" if "bytes" in info else "-",
                ratio(median(res), ours),
            )
        )
    print_table(
        f"Census by type of the whole heap ({orders:,} orders)",
        ["variant", "time", "range", "extra peak RSS", "objects", "bytes", "time / ours"],
        rows,
    )


def report_traced(results: dict[str, dict[str, Any]]) -> None:
    ours = median(results["kept"])
    rows = []
    for key in ("tracemalloc", "kept"):
        res = results[key]
        rows.append(
            (
                VARIANTS[key].label,
                *timing(res),
                f"{res['peak_mb']:.1f} MB",
                f"{res['heap_mb']:.0f} MB",
                f"{res['build_seconds']:.1f} s",
                ratio(median(res), ours),
            )
        )
    print_table(
        f"Under tracemalloc (1 frame, {results['kept']['orders']:,} orders, traced as built)",
        ["variant", "time", "range", "extra peak RSS", "RSS before", "built in", "time / ours"],
        rows,
    )
    info = results["kept"]["info"]
    print(
        f"kept_census counted {info['objects']:,} objects, {info['bytes'] / 1e6:.1f} MB, "
        f"and offered {info['sample']} to explain\n"
    )
    after = results["kept_after"]
    print_table(
        f"kept_census when tracing starts after the heap is built ({after['orders']:,} orders)",
        ["variant", "time", "range", "extra peak RSS", "kept objects", "kept bytes", "sample"],
        [
            (
                VARIANTS["kept_after"].label,
                *timing(after),
                f"{after['peak_mb']:.1f} MB",
                f"{after['info']['objects']:,}",
                f"{after['info']['bytes'] / 1e6:.2f} MB",
                after["info"]["sample"],
            )
        ],
    )


def report_chains(results: dict[str, dict[str, Any]]) -> None:
    rows = []
    for key, held in (
        ("root_path", "in a list"),
        ("backref", "in a list"),
        ("root_path_hidden", "in a tuple of atoms"),
        ("backref_hidden", "in a tuple of atoms"),
    ):
        res = results[key]
        ours = median(results["root_path_hidden" if key.endswith("hidden") else "root_path"])
        rows.append(
            (
                VARIANTS[key].label,
                held,
                *timing(res),
                f"`{res['info']['path']}`",
                ratio(median(res), ours),
            )
        )
    print_table(
        "Referrer chain from a bytearray 8 references below a module global",
        ["variant", "bytearray held", "time", "range", "what it gives", "time / ours"],
        rows,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=95_000, help="orders in the heap")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the fast variants")
    parser.add_argument(
        "--traced-scale", type=float, default=1.0, help="heap scale under tracemalloc"
    )
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="some variants")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.orders, args.repeat)
        return 0
    print(f"machine: {describe_machine()}; load average {load_average()}", flush=True)
    keys = args.only or list(VARIANTS)
    results = {key: run(key, args) for key in keys}
    if args.only:
        for key in keys:
            print(key, json.dumps(results[key]))
        return 0
    census = results["census"]
    print(
        f"\nheap: {args.orders:,} orders: {census['info']['objects']:,} objects and "
        f"{census['info']['bytes'] / 1e6:.0f} MB by our census, "
        f"{results['gc']['info']['objects']:,} of them tracked; RSS {census['heap_mb']:.0f} MB"
    )
    report_census(results, args.orders)
    report_traced(results)
    report_chains(results)
    ours, peak = median(census), census["peak_mb"]
    chain, hidden = results["root_path"], results["root_path_hidden"]
    for target, value, met in (
        (f"census < {TARGET_CENSUS_SECONDS} s", f"{ours:.3f} s", ours < TARGET_CENSUS_SECONDS),
        (f"census extra peak RSS < {TARGET_CENSUS_MB:.0f} MB", f"{peak:.1f} MB", peak < 20),
        (f"chain < {TARGET_CHAIN_SECONDS} s, to the root", *chain_verdict(chain)),
        (f"chain through an untracked tuple < {TARGET_CHAIN_SECONDS} s", *chain_verdict(hidden)),
    ):
        print(f"target {target}: {value} (median) -> {'met' if met else 'MISSED'}")
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
