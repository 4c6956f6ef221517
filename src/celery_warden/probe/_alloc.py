"""Where a worker process's memory is, by who holds it: the kernel, pymalloc, glibc.

Runs inside a live worker child, on demand (the probe), so: standard library only,
nothing from celery_warden, and no reading ever raises into the caller: a reading
that fails is None, the others still come.

The three views do not overlap the way one might guess: pymalloc takes its arenas
straight from ``mmap``, not from malloc, so the ``pymalloc_*`` bytes are *not* inside
the ``malloc_*`` ones; objects over 512 bytes (and the item arrays of big lists and
dicts) go to malloc and are in ``malloc_*`` only. Both are address space: what is
resident is in ``rss``/``uss``, which is why they are shown side by side.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
import time
import tracemalloc
from typing import Any

__all__ = ["breakdown", "is_glibc", "trim"]

_FOUR_GIB = 1 << 32
_PAGE = os.sysconf("SC_PAGE_SIZE")

# mallinfo's fields, in struct order (malloc.h): the same for mallinfo2 (size_t).
_MALLINFO_FIELDS = (
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",
    "keepcost",
)
# Ours -> glibc's.
_MALLOC_KEYS = {
    "malloc_arena": "arena",
    "malloc_in_use": "uordblks",
    "malloc_free": "fordblks",
    "malloc_mmapped": "hblkhd",
    "malloc_releasable": "keepcost",
}
_SMAPS_KEYS = {
    b"Rss": "rss",
    b"Pss": "pss",
    b"Anonymous": "anon",
    b"Swap": "swap",
}


# -- the kernel's view -----------------------------------------------------------------


def _read_proc(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _statm() -> tuple[int, int] | None:
    """Virtual size and RSS from ``statm``, in bytes: the fallback when a kernel older
    than 4.14 has no ``smaps_rollup``, and what tells whether legacy mallinfo wrapped."""
    data = _read_proc("/proc/self/statm")
    try:
        size, resident = (data or b"").split()[:2]
        return int(size) * _PAGE, int(resident) * _PAGE
    except ValueError:
        return None


def _smaps() -> dict[str, int | None]:
    """rss, uss (private clean + dirty), pss, anon and swap from ``smaps_rollup``.

    One read walks the page tables (the kernel's cost grows with the mapped memory);
    rss falls back to ``statm`` when the file is missing.
    """
    found: dict[str, int | None] = dict.fromkeys(("rss", "uss", "pss", "anon", "swap"))
    data = _read_proc("/proc/self/smaps_rollup")
    for line in (data or b"").splitlines():
        key, sep, rest = line.partition(b":")
        if not sep:
            continue
        try:
            if key in _SMAPS_KEYS:
                found[_SMAPS_KEYS[key]] = int(rest.split()[0]) * 1024
            elif key in {b"Private_Clean", b"Private_Dirty"}:
                found["uss"] = (found["uss"] or 0) + int(rest.split()[0]) * 1024
        except (ValueError, IndexError):
            continue
    if found["rss"] is None:
        statm = _statm()
        found["rss"] = statm[1] if statm else None
    return found


# -- glibc -----------------------------------------------------------------------------


def is_glibc() -> bool:
    """True when this process runs on glibc (not musl, not another libc)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False


class _Glibc:
    """glibc's allocator entry points, resolved once per process through ctypes."""

    def __init__(self, *, legacy: bool = False) -> None:
        import ctypes

        libc = ctypes.CDLL(None)
        self.malloc_trim: Any = libc.malloc_trim
        self.malloc_trim.argtypes = [ctypes.c_size_t]
        self.malloc_trim.restype = ctypes.c_int
        # mallinfo2 (glibc >= 2.33) has size_t fields. Legacy mallinfo's are C ints,
        # truncated past 4 GiB: read unsigned, they are exact while no field can
        # reach 4 GiB, which holds while the whole address space is smaller.
        self.exact = not legacy and hasattr(libc, "mallinfo2")
        kind = ctypes.c_size_t if self.exact else ctypes.c_uint

        class Info(ctypes.Structure):
            _fields_ = [(name, kind) for name in _MALLINFO_FIELDS]

        self.mallinfo: Any = libc.mallinfo2 if self.exact else libc.mallinfo
        self.mallinfo.argtypes = []
        self.mallinfo.restype = Info


@functools.cache
def _glibc() -> _Glibc | None:
    if not is_glibc():
        return None
    try:
        return _Glibc()
    except Exception:  # no _ctypes in this build, or a libc without the symbols
        return None


def _mallinfo() -> dict[str, int | None]:
    """glibc's malloc state: mallinfo2, summed over every arena (the main one and each
    thread's), one arena lock at a time. None on another libc, and for legacy mallinfo
    once the address space reaches 4 GiB (its fields could have wrapped)."""
    found: dict[str, int | None] = dict.fromkeys(_MALLOC_KEYS)
    try:
        libc = _glibc()
        if libc is None:
            return found
        if not libc.exact:
            statm = _statm()
            if statm is None or statm[0] >= _FOUR_GIB:
                return found
        info = libc.mallinfo()
        for key, field in _MALLOC_KEYS.items():
            found[key] = int(getattr(info, field))
    except Exception:
        return dict.fromkeys(_MALLOC_KEYS)
    return found


def malloc_state() -> dict[str, int | None]:
    """glibc's malloc state alone (``malloc_*`` keys of :func:`breakdown`): well under a
    millisecond, cheap enough to read after every traced call."""
    return _mallinfo()


# -- pymalloc: its own stats, as text ------------------------------------------------

# Every line _debugmallocstats writes (Objects/obmalloc.c, 3.10 to 3.13, and 3.9):
# printone()'s "<label padded to 35>=<value, with commas, right-aligned in 21>", the
# size-class table, and a few fixed lines. Strict on purpose (known labels, exact
# padding): numbers are read only from lines that are exactly one of these.
_VALUE_LINE = re.compile(rb"(.{35,}?)=([ ,0-9]{20}[0-9])")
_LABEL = re.compile(
    rb"# [a-z ]+|Total|[0-9]+ arenas \* [0-9]+ bytes/arena|[0-9]+ unused pools \* [0-9]+ bytes"
)
# The free lists' lines (sys._debugmallocstats' second part): "%48s " labels.
_FREE_LIST_LABEL = re.compile(rb"[0-9]+ free [\w -]+ \* [0-9]+ bytes each")
# A row of the size-class table: printf("%5u %6u %11zu %15zu %13zu").
_CLASS_ROW = re.compile(
    rb"[ 0-9]{4}[0-9] [ 0-9]{5}[0-9] [ 0-9]{10}[0-9] [ 0-9]{14}[0-9] [ 0-9]{12}[0-9]"
)
_FIXED_LINES = re.compile(  # the first alternative is the empty line
    rb"|Small block threshold = [0-9]+, in [0-9]+ size classes\."
    rb"|class   size   num pools   blocks in use  avail blocks"
    rb"|-----   ----   ---------   -------------  ------------"
    rb"|arena map counts"
)
_ARENAS_LABEL = re.compile(rb"[0-9]+ arenas \* [0-9]+ bytes/arena")
_UNUSED_POOLS_LABEL = re.compile(rb"[0-9]+ unused pools \* [0-9]+ bytes")


def _value_line(line: bytes) -> tuple[bytes, int] | None:
    """A printone() line's label and value, or None if the line is not exactly one."""
    match = _VALUE_LINE.fullmatch(line)
    if match is None:
        return None
    padded, label = match[1], match[1].strip()
    if _LABEL.fullmatch(label):
        exact = padded == label.ljust(35)
    else:
        exact = _FREE_LIST_LABEL.fullmatch(label) is not None and padded == label.rjust(48) + b" "
    return (label, int(match[2].replace(b",", b""))) if exact else None


def _parse_mallocstats(stats: bytes) -> tuple[int, int, int] | None:
    """pymalloc's arena bytes, used-block bytes and free bytes, from the stats' text."""
    values: dict[bytes, int] = {}
    arenas = unused_pools = None
    for line in stats.splitlines():
        found = _value_line(line)
        if found is None:
            continue
        label, value = found
        if _ARENAS_LABEL.fullmatch(label) and arenas is None:
            arenas = value
        elif _UNUSED_POOLS_LABEL.fullmatch(label) and unused_pools is None:
            unused_pools = value
        values.setdefault(label, value)
    used = values.get(b"# bytes in allocated blocks")
    free_blocks = values.get(b"# bytes in available blocks")
    if arenas is None or unused_pools is None or used is None or free_blocks is None:
        return None  # pymalloc is off (PYTHONMALLOC=malloc), or a format we do not know
    free = free_blocks + unused_pools
    if used + free > arenas:
        return None  # a line was lost or garbled: no numbers rather than wrong ones
    return arenas, used, free


class _DirectStats:
    """``_PyObject_DebugMallocStats(FILE *)``, the function ``sys._debugmallocstats()``
    calls with the C stderr, called here with a FILE of our own: fd 2 is left alone.

    Its signature has been ``int (FILE *out)`` since Python 3.3 (1: stats written, 0:
    pymalloc is not the object allocator). Called through ``ctypes.pythonapi``, which
    keeps the GIL, as the function requires.
    """

    def __init__(self) -> None:
        import ctypes

        self.stats: Any = ctypes.pythonapi._PyObject_DebugMallocStats
        self.stats.argtypes = [ctypes.c_void_p]
        self.stats.restype = ctypes.c_int
        libc = ctypes.CDLL(None)
        self.fdopen: Any = libc.fdopen
        self.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
        self.fdopen.restype = ctypes.c_void_p
        self.fclose: Any = libc.fclose
        self.fclose.argtypes = [ctypes.c_void_p]
        self.fclose.restype = ctypes.c_int

    def text(self) -> bytes:
        sink = _scratch_fd()
        try:
            fd = os.dup(sink)
            stream = self.fdopen(fd, b"w")
            if not stream:
                os.close(fd)
                return b""
            try:
                self.stats(stream)
            finally:
                self.fclose(stream)  # flushes, and closes fd
            return _read_all(sink)
        finally:
            os.close(sink)


@functools.cache
def _direct_stats() -> _DirectStats | None:
    try:
        return _DirectStats()
    except Exception:  # not CPython, an interpreter that hides the symbol, no _ctypes
        return None


def _scratch_fd() -> int:
    """An anonymous file to write the stats to, in memory when the kernel allows."""
    if hasattr(os, "memfd_create"):
        with contextlib.suppress(OSError):
            return os.memfd_create("celery-warden-mallocstats", os.MFD_CLOEXEC)
    fd, path = tempfile.mkstemp(prefix="celery-warden-")
    os.unlink(path)
    return fd


def _read_all(fd: int, offset: int = 0) -> bytes:
    chunks = []
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _pymalloc() -> tuple[int, int, int] | None:
    """pymalloc's (arenas, used, free) bytes, from its own stats' text."""
    try:
        direct = _direct_stats()
        text = direct.text() if direct is not None else b""
        return _parse_mallocstats(text) if text else None
    except Exception:
        return None


# -- the API -----------------------------------------------------------------------------


def breakdown() -> dict[str, int | None]:
    """Where this process's memory is, side by side, in bytes (None: not readable here).

    - ``rss``, ``uss``, ``pss``, ``anon``, ``swap``: the kernel's view (``smaps_rollup``);
      what the process costs the machine.
    - ``py_allocated_blocks``: live pymalloc/object blocks (a count, not bytes).
    - ``pymalloc_arenas``: bytes of pymalloc arenas mapped now; ``pymalloc_used``: bytes
      in used blocks (size-class rounded; with ``PYTHONMALLOC=pymalloc_debug`` the debug
      pads too); ``pymalloc_free``: free blocks in used pools plus whole free pools
      (including never-carved arena space). The rest of the arenas is pool headers,
      quantization and alignment. None when pymalloc is off (``PYTHONMALLOC=malloc``)
      and while tracemalloc traces: CPython prints no pymalloc stats once any hook
      (tracemalloc, memray) wraps the object allocator.
    - ``tracemalloc_traced``, ``tracemalloc_peak``: only while tracemalloc traces.
    - ``malloc_arena``: non-mmapped space glibc took from the OS (all arenas);
      ``malloc_in_use``: bytes in allocated chunks (uordblks; chunks parked in the
      per-thread tcache count as in use); ``malloc_free``: free bytes inside the arenas
      (fordblks: address space, resident or not: ``malloc_trim`` leaves it unchanged
      when it only releases pages in the middle of the heap); ``malloc_mmapped``: chunks
      mmapped on their own (hblkhd, >= 128 KiB by default); ``malloc_releasable``: the
      main arena's top chunk (keepcost), what shrinking the heap's end can return, a
      floor of what ``trim()`` gives back. Summed over every arena by glibc. None off
      glibc, and when legacy ``mallinfo`` (glibc < 2.33, C ints) could have wrapped.

    Cost (measured, Python 3.10 to 3.13, 2 cores): about 0.35 ms in a fresh interpreter,
    1.5 ms at 130 MB RSS, 12 ms at 1 GiB: the kernel's walk of the page tables for
    ``smaps_rollup`` dominates (about 10 ms per GiB of RSS). The pymalloc stats take
    0.1 ms (0.15 ms with 5 million objects: they walk every pool, under the GIL); mallinfo
    under 1 ms even with 80,000 free chunks to walk (each arena's lock held in turn).

    pymalloc's stats are CPython's own (``sys._debugmallocstats()``'s first part), written
    to an anonymous file through ``_PyObject_DebugMallocStats(FILE *)``: fd 2 is never
    touched (redirecting it would race with the worker's other threads writing logs).
    Where that symbol cannot be reached (an interpreter that hides it), the
    ``pymalloc_*`` fields are None.
    """
    result: dict[str, int | None] = {}
    try:
        result.update(_smaps())
    except Exception:
        result.update(dict.fromkeys(("rss", "uss", "pss", "anon", "swap")))
    try:
        result["py_allocated_blocks"] = sys.getallocatedblocks()
    except Exception:
        result["py_allocated_blocks"] = None
    arenas, used, free = _pymalloc() or (None, None, None)
    result["pymalloc_arenas"], result["pymalloc_used"], result["pymalloc_free"] = arenas, used, free
    result["tracemalloc_traced"] = result["tracemalloc_peak"] = None
    try:
        if tracemalloc.is_tracing():
            result["tracemalloc_traced"], result["tracemalloc_peak"] = (
                tracemalloc.get_traced_memory()
            )
    except Exception:
        result["tracemalloc_traced"] = result["tracemalloc_peak"] = None
    result.update(_mallinfo())
    return result


def trim(pad: int = 0) -> dict[str, float | int | None]:
    """Ask glibc to give free memory back to the OS (``malloc_trim(pad)``), and measure
    what it gave: a worker whose ``malloc_free`` is large after a big task may hold
    memory it no longer uses, and this tells whether trimming would fix it.

    glibc shrinks the heap's end (keeping ``pad`` bytes) and, since 2.8, releases the
    whole free pages inside every arena (``madvise``): the latter lowers RSS and USS but
    not ``malloc_free``, which counts those pages still as free heap. ``released`` is
    what USS lost (RSS when USS is unreadable), 0 when nothing or when other threads
    allocated meanwhile; ``returned`` is glibc's answer (1: something was released);
    ``seconds`` times the call alone: it holds each arena's lock in turn, so the worker's
    other threads that allocate wait (6 ms to madvise 110 MB of free chunks away).
    Everything but the before/after readings is None off glibc.
    """
    result: dict[str, float | int | None] = {}
    try:
        before, free_before = _smaps(), _mallinfo()["malloc_free"]
    except Exception:
        before, free_before = {}, None
    returned: int | None = None
    seconds: float | None = None
    try:
        libc = _glibc()
        if libc is not None:
            started = time.perf_counter()
            returned = int(libc.malloc_trim(max(0, int(pad))))
            seconds = time.perf_counter() - started
    except Exception:
        returned = seconds = None
    try:
        after, free_after = _smaps(), _mallinfo()["malloc_free"]
    except Exception:
        after, free_after = {}, None
    result["rss_before"], result["rss_after"] = before.get("rss"), after.get("rss")
    result["uss_before"], result["uss_after"] = before.get("uss"), after.get("uss")
    result["malloc_free_before"], result["malloc_free_after"] = free_before, free_after
    released = None
    for key in ("uss", "rss"):
        was, now = before.get(key), after.get(key)
        if was is not None and now is not None:
            released = max(0, was - now)
            break
    result["released"] = released
    result["seconds"] = seconds
    result["returned"] = returned
    return result
