"""The allocator breakdown (probe/_alloc): where a process's memory is, and trimming it.

Each scenario runs in a fresh interpreter, so the test process's own heap (pytest's,
every module it imported) does not blur the numbers; it prints its readings as JSON.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from celery_warden.probe import _alloc

MIB = 1 << 20
KEYS = {
    "rss",
    "uss",
    "pss",
    "anon",
    "swap",
    "py_allocated_blocks",
    "pymalloc_arenas",
    "pymalloc_used",
    "pymalloc_free",
    "tracemalloc_traced",
    "tracemalloc_peak",
    "malloc_arena",
    "malloc_in_use",
    "malloc_free",
    "malloc_mmapped",
    "malloc_releasable",
}
TRIM_KEYS = {
    "rss_before",
    "rss_after",
    "uss_before",
    "uss_after",
    "malloc_free_before",
    "malloc_free_after",
    "released",
    "seconds",
    "returned",
}

needs_glibc = pytest.mark.skipif(not _alloc.is_glibc(), reason="glibc's malloc only")


def run(script: str, *args: str) -> tuple[Any, bytes]:
    """Run ``script`` in a fresh interpreter; its last stdout line, as JSON, and its stderr."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONMALLOC", "PYTHONTRACEMALLOC"}}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


def delta(after: dict[str, int], before: dict[str, int], key: str) -> int:
    return after[key] - before[key]


def test_fields_are_the_documented_ones() -> None:
    (reading, trimmed, glibc), _ = run(
        """
        import json
        from celery_warden.probe._alloc import breakdown, is_glibc, trim
        print(json.dumps([breakdown(), trim(), is_glibc()]))
        """
    )
    assert set(reading) == KEYS
    assert set(trimmed) == TRIM_KEYS
    assert glibc == (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    assert all(value is None or type(value) is int for value in reading.values())
    for key in ("rss", "uss", "pss", "anon", "py_allocated_blocks", "pymalloc_used"):
        assert reading[key] > 0, key
    assert reading["pymalloc_used"] + reading["pymalloc_free"] <= reading["pymalloc_arenas"]
    assert reading["tracemalloc_traced"] is None
    if glibc:
        assert reading["malloc_in_use"] > 0
        assert reading["malloc_arena"] >= reading["malloc_in_use"] + reading["malloc_free"] - 1
        assert trimmed["returned"] in {0, 1}
        assert trimmed["released"] >= 0
    else:
        assert reading["malloc_in_use"] is None
        assert trimmed["returned"] is None


@needs_glibc
def test_native_allocations_are_malloc_not_pymalloc() -> None:
    """C code's mallocs: small ones in the heap (malloc_in_use), big ones mmapped on their
    own (malloc_mmapped); pymalloc sees neither."""
    (before, mid, after), _ = run(
        """
        import ctypes, json
        from celery_warden.probe._alloc import breakdown

        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        # A fixed mmap threshold (M_MMAP_THRESHOLD): glibc raises it by itself after
        # big frees, and 1 MiB blocks would then come from the heap.
        libc.mallopt(-3, 128 * 1024)

        def grab(count, size):
            kept = []
            for _ in range(count):
                address = libc.malloc(size)
                ctypes.memset(address, 1, size)  # touched: resident
                kept.append(address)
            return kept

        before = breakdown()
        small = grab(16384, 4096)  # 64 MiB, never freed
        mid = breakdown()
        big = grab(64, 1 << 20)  # 64 MiB more, over the threshold
        after = breakdown()
        print(json.dumps([before, mid, after]))
        """
    )
    heap_grew = delta(mid, before, "malloc_in_use")
    assert 64 * MIB <= heap_grew <= 64 * MIB * 1.05 + MIB  # 16-byte chunk headers
    assert delta(mid, before, "uss") >= 60 * MIB
    assert delta(mid, before, "pymalloc_used") < 2 * MIB  # just the list of addresses

    mapped = delta(after, mid, "malloc_mmapped")
    assert 64 * MIB <= mapped <= 64 * (MIB + 4096) + MIB
    assert abs(delta(after, mid, "malloc_in_use")) < MIB
    assert delta(after, mid, "rss") >= 60 * MIB
    assert abs(delta(after, mid, "pymalloc_used")) < MIB


def test_python_objects_are_pymalloc() -> None:
    (before, after, size), _ = run(
        """
        import json, sys
        from celery_warden.probe._alloc import breakdown

        before = breakdown()
        objects = [float(i) for i in range(200_000)]
        after = breakdown()
        print(json.dumps([before, after, sum(map(sys.getsizeof, objects))]))
        """
    )
    grew = delta(after, before, "pymalloc_used")
    # 24-byte floats in the 32-byte size class: between their size and twice it.
    assert size <= grew <= 2 * size
    assert delta(after, before, "py_allocated_blocks") >= 200_000
    assert after["pymalloc_arenas"] >= after["pymalloc_used"] + after["pymalloc_free"]
    if after["malloc_in_use"] is not None:
        assert delta(after, before, "malloc_in_use") < size / 2  # the list's array at most


FRAGMENTATION = """
    import json
    from celery_warden.probe._alloc import breakdown, trim

    start = breakdown()
    # ~100 MB of 600-byte bytes objects: over pymalloc's 512-byte limit, each is a chunk
    # of glibc's heap, one after the other.
    objects = [(b"%06d" % i) * 100 for i in range(166_667)]
    barrier = b"barrier!" * 75  # malloc'd after them: the heap's top cannot shrink
    built = breakdown()
    del objects
    freed = breakdown()
    trimmed = trim()
    after = breakdown()
    print(json.dumps(dict(start=start, built=built, freed=freed, trimmed=trimmed, after=after)))
"""


@needs_glibc
def test_fragmented_heap_holds_free_memory_until_trimmed() -> None:
    readings, _ = run(FRAGMENTATION)
    built, freed, trimmed, after = (readings[k] for k in ("built", "freed", "trimmed", "after"))
    assert delta(built, readings["start"], "malloc_in_use") > 95e6

    # Freed, but kept: the chunks sit below the barrier, free and still resident.
    assert freed["malloc_free"] > 90e6
    assert delta(built, freed, "malloc_in_use") > 90e6
    assert freed["uss"] > built["uss"] - 20 * MIB

    # malloc_trim gives the pages back (madvise) ...
    assert trimmed["returned"] == 1
    assert trimmed["released"] > 80e6
    assert trimmed["uss_after"] < trimmed["uss_before"] - 80e6
    assert 0 <= trimmed["seconds"] < 1
    assert after["rss"] < built["rss"] - 80e6
    # ... but they stay free chunks of the heap: fordblks counts them still.
    assert trimmed["malloc_free_before"] > 90e6
    assert abs(trimmed["malloc_free_after"] - trimmed["malloc_free_before"]) < 10 * MIB


WRITER = """
    import json, os, sys, threading
    sys.setswitchinterval(1e-5)  # hand the GIL over often: the writer runs meanwhile
    from celery_warden.probe import _alloc

    CALLS = 500
    stop = threading.Event()
    written = []

    def writer():
        i = 0
        while not stop.is_set():
            os.write(2, b"writer line %d\\n" % i)
            i += 1
        written.append(i)

    thread = threading.Thread(target=writer)
    thread.start()
    parsed = 0
    for _ in range(CALLS):
        parsed += _alloc.breakdown()["pymalloc_used"] is not None
    stop.set()
    thread.join()
    print(json.dumps([written[0], parsed]))
"""


def test_other_threads_stderr_is_never_touched() -> None:
    """The stats are written to a FILE of ours, never through fd 2: every line another
    thread writes to stderr meanwhile arrives once, and none of the stats does."""
    (written, parsed), stderr = run(WRITER)
    assert parsed == 500
    lines = stderr.split(b"\n")
    assert lines.pop() == b""
    expected = collections.Counter(b"writer line %d" % i for i in range(written))
    assert collections.Counter(lines) == expected


def test_the_stats_parse_as_cpython_prints_them() -> None:
    """The numbers read from our FILE are those sys._debugmallocstats() prints."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; sys._debugmallocstats()"],
        capture_output=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"},
    )
    parsed = _alloc._parse_mallocstats(proc.stderr)
    assert parsed is not None
    arenas, used, free = parsed
    assert 0 < used < arenas
    assert used + free <= arenas


def test_tracemalloc_numbers_only_while_tracing() -> None:
    (off, on), _ = run(
        """
        import json, tracemalloc
        from celery_warden.probe._alloc import breakdown

        off = breakdown()
        tracemalloc.start()
        kept = [str(i) * 10 for i in range(50_000)]
        on = breakdown()
        print(json.dumps([off, on]))
        """
    )
    assert off["tracemalloc_traced"] is None
    assert off["tracemalloc_peak"] is None
    assert off["pymalloc_used"] is not None
    assert on["tracemalloc_traced"] > 2 * MIB
    assert on["tracemalloc_peak"] >= on["tracemalloc_traced"]
    # CPython prints no pymalloc stats while a hook wraps the object allocator.
    assert on["pymalloc_used"] is None


def test_no_pymalloc_numbers_without_pymalloc() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json; from celery_warden.probe import _alloc;"
            "print(json.dumps([_alloc.breakdown(), _alloc._pymalloc()]))",
        ],
        capture_output=True,
        check=True,
        env={**os.environ, "PYTHONMALLOC": "malloc"},
    )
    reading, direct = json.loads(proc.stdout)
    assert reading["pymalloc_arenas"] is None
    assert reading["pymalloc_used"] is None
    assert direct is None
    assert reading["rss"] > 0
    # The free lists' lines sys._debugmallocstats still prints are not leaked.
    assert proc.stderr == b""


@needs_glibc
def test_legacy_mallinfo_agrees_and_gives_up_past_4_gib() -> None:
    """glibc < 2.33 has only mallinfo (C ints): read unsigned, it matches mallinfo2 while
    the address space is under 4 GiB, and is not trusted past it."""
    (small, big, exact), _ = run(
        """
        import json, mmap
        from celery_warden.probe import _alloc

        legacy = _alloc._Glibc(legacy=True)
        _alloc._glibc = lambda: legacy  # every reading now takes the legacy path
        small, exact = _alloc._mallinfo(), _alloc._Glibc().mallinfo()
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        reserved = mmap.mmap(-1, 5 << 30, flags=flags, prot=0)  # PROT_NONE: address space only
        big = _alloc._mallinfo()
        print(json.dumps([small, big, {f: getattr(exact, f) for f in ("arena", "hblkhd")}]))
        """
    )
    assert small["malloc_arena"] == exact["arena"]
    assert small["malloc_mmapped"] == exact["hblkhd"]
    assert small["malloc_in_use"] > 0
    assert set(big.values()) == {None}
