"""What the heap holds, what a task kept, and who holds it: run inside a worker's child.

Standard library only and nothing from celery_warden: it runs in the user's process,
so it never raises into its caller (odd objects are skipped, a failure returns what
"nothing" means) and it holds no reference that would change what it reports.

``census()`` counts the whole heap by type, with ``sys.getsizeof`` bytes (an object's
own size, with its GC header; not what it references). What is counted, exactly:

- every object the cyclic collector tracks (``gc.get_objects()``: instances, lists,
  dicts, sets, functions, classes, frames...), once each, exactly;
- the untracked objects (str, bytes, int, float, and the tuples and dicts CPython
  untracks because they hold only such atoms) that a tracked object references, found
  by ``gc.get_referents`` of every tracked object plus the str keys of every dict
  (the collector does not visit those), then inside the untracked tuples and dicts
  found, and so on down. Keeping a set of every such object's id to count it once
  would cost 20 MB or more on a 1.2 million object heap and most of the time budget,
  so the reference count decides instead: an object held by one reference is reached
  once and counted exactly; one held by more than ``_WIDE`` references (None, small
  ints, interned names, constants) is counted once, by identity; one held by 2 to
  ``_WIDE`` references is counted ``1/refcount`` each time a reference to it is found,
  so it adds up to one object when every reference to it is held by an object the walk
  visits. A reference the walk cannot see (a running frame's locals on 3.11+, a C
  global, a code object's constants) makes such an object count for less.

Not counted: objects referenced only by something the walk does not enter (code
objects' constants, C extension state), static objects nobody references, memory that
is not an object (allocator free lists and slack, C libraries' buffers), and objects
moved to the permanent generation by ``gc.freeze()`` (``gc.get_objects()`` skips them)
with what only they reference. Counts and bytes of untracked objects are therefore
rounded sums: within 0.5% of an exact (and 20 MB dearer) walk of the same objects on
the benchmark's heap, strs 2% under (names also held by code objects); guppy, which
enters code objects, finds about 7% more objects there (docs/benchmarks.md).

``kept_census()`` is the same census restricted to objects tracemalloc saw allocated
(alive now and created since tracing started), plus a few of them to explain.
``root_path()`` walks referrers up from an object to a root and names the path.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
import threading
import time
import tracemalloc
import types
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, compress, count, filterfalse, repeat, zip_longest
from operator import is_, is_not, not_
from typing import Any

__all__ = ["census", "kept_census", "root_path", "type_name"]

Row = tuple[str, int, int]  # (type name, objects, bytes)

OTHER_TYPES = "(other types)"
_CHUNK = 2000  # tracked objects a batch: its lists stay in the CPU's cache (measured)
_WIDE = 32  # untracked objects with more references are counted by identity, once
_CONTAINERS: frozenset[type] = frozenset({tuple, dict})  # all CPython leaves untracked
_SAMPLE = 8  # kept objects kept_census offers to explain
_FRONTIER = 12  # objects one heap scan looks for (each reference is compared to all)

_LRU_TYPE: Any = getattr(functools, "_lru_cache_wrapper", None)
_PEP667 = sys.version_info >= (3, 13)  # frame.f_locals is a proxy: reading it changes nothing
_PY311 = sys.version_info[:2] == (3, 11)  # get_object_traceback misses plain instances
# Read through type's (and module's) own descriptors: a metaclass's code never runs.
_TYPE_MODULE: Any = vars(type)["__module__"]
_TYPE_QUALNAME: Any = vars(type)["__qualname__"]
_TYPE_DICT: Any = vars(type)["__dict__"]
_TYPE_MRO: Any = vars(type)["__mro__"]
_MODULE_DICT: Any = vars(types.ModuleType)["__dict__"]
_DICT_ITER: Callable[[Any], Iterator[Any]] = dict.__iter__
_DESCRIPTORS = (types.GetSetDescriptorType, types.MemberDescriptorType)
_SEQUENCES = (list, tuple)
_MISSING = object()
_ELEMENTS = (set, frozenset, deque)

_traceback: Callable[[object], Any]
try:  # the C function get_object_traceback wraps: no Traceback object per call
    from _tracemalloc import _get_object_traceback as _traceback
except ImportError:  # pragma: no cover - CPython always has it
    _traceback = tracemalloc.get_object_traceback
_MANAGED_DICT = 1 << 4  # Py_TPFLAGS_MANAGED_DICT: a pre-header before the GC header
_traceback_at: Callable[[int, int], Any] | None = None  # 3.11: C's lookup by address


def _traceback_by_address() -> Callable[[int, int], Any] | None:
    """On 3.11, C's lookup of a memory block's traceback by address, to mend
    ``_get_object_traceback``: there it looks for an instance of an ordinary class
    (its dict managed by the object, Py_TPFLAGS_MANAGED_DICT) at the GC header, while
    the block starts two pointers earlier, so it never finds one. The exported
    ``_PyTraceMalloc_GetTraceback`` is asked at the block's start instead (ctypes,
    loaded on first use; 3.12 fixed the bug). None elsewhere, or without ctypes."""
    global _traceback_at  # noqa: PLW0603 - set up once, on first use
    if not _PY311:
        return None
    if _traceback_at is None:
        try:
            import ctypes

            lookup = ctypes.pythonapi._PyTraceMalloc_GetTraceback
            lookup.restype = ctypes.py_object
            lookup.argtypes = (ctypes.c_uint, ctypes.c_size_t)
            _traceback_at = lookup
        except Exception:
            return None
    return _traceback_at


# -- census ---------------------------------------------------------------------------


def census(limit: int = 50) -> list[Row]:
    """The whole heap by type: ``(type name, objects, bytes)``, most bytes first.

    At most ``limit`` rows, then ``("(other types)", objects, bytes)`` for the rest.
    The module docstring says exactly what is counted. About 0.6 s and 11-15 MB of
    peak RSS on a heap of 1.2 million objects (docs/benchmarks.md). The collector is
    paused meanwhile (so no finalizer runs while dicts are read) and enabled again
    after, if it was.
    """
    counts: dict[type, float] = {}
    sizes: dict[type, float] = {}
    enabled = gc.isenabled()
    gc.disable()
    try:
        with contextlib.suppress(Exception):  # what was counted so far is still true
            _census_walk(counts, sizes)
    finally:
        if enabled:
            gc.enable()
    return _rows(counts, sizes, limit)


def _calibrate() -> tuple[int, int]:
    """``sys.getrefcount`` through the walk's own steps, of an object held by one
    reference and listed once: the count of an object only one reference holds; and
    the constant of the double count below."""
    holder = [object()]
    listed = holder[:]
    first = list(map(sys.getrefcount, listed))
    dup = listed[:]
    second = list(map(sys.getrefcount, listed))
    del dup
    return first[0], 2 * first[0] - second[0] - 1


def _census_walk(counts: dict[type, float], sizes: dict[type, float]) -> None:
    """Count every tracked object, then walk down into the untracked ones, a batch of
    tracked objects at a time (the module docstring says how each is counted)."""
    single, double = _calibrate()
    walk = _Untracked(single, single + _WIDE)
    shared: Counter[tuple[type, int, int, int]] = Counter()  # type, size, 2 refcounts
    fixed: dict[type, bool] = {}
    objs = gc.get_objects()  # CPython leaves this list itself out
    for start in range(0, len(objs), _CHUNK):
        level = _account(_group(objs[start : start + _CHUNK]), counts, sizes, fixed)
        while level:
            refs = _referents(level)
            un = list(filterfalse(gc.is_tracked, refs))
            del refs
            # Only `un` holds the untracked objects now: their count says who else does.
            once, some = walk.split(un, list(map(sys.getrefcount, un)))
            del un
            if some:
                _weigh(some, shared)
                walk.shared_containers(some, level)
            del some
            _account(once, counts, sizes, fixed)
            for kind in _CONTAINERS:
                if kind in once:
                    level.setdefault(kind, []).extend(once[kind])
            del once
    del objs
    for (kind, size, first, second), n in shared.items():
        weight = n / max(2 * first - second - double, 1)
        counts[kind] = counts.get(kind, 0) + weight
        sizes[kind] = sizes.get(kind, 0) + size * weight


class _Untracked:
    """How each untracked object found is counted, by its reference count."""

    __slots__ = ("shared_seen", "single", "wide", "wide_seen")

    def __init__(self, single: int, wide: int) -> None:
        self.single = single  # the count of an object held by one reference
        self.wide = wide  # above: widely shared
        self.wide_seen: set[int] = set()  # widely shared objects counted
        self.shared_seen: set[int] = set()  # shared containers walked

    def split(
        self, un: list[object], counted: list[int]
    ) -> tuple[dict[type, list[object]], list[object]]:
        """Objects to count once, by type (held by one reference, or widely shared and
        new), and the ones held by a few references. One Python loop: cheaper than the
        several C passes it replaces."""
        once: dict[type, list[object]] = {}
        some: list[object] = []
        get = once.get
        single, wide, wide_seen = self.single, self.wide, self.wide_seen
        for obj, n in zip(un, counted, strict=True):
            if n > wide:  # the most common: None, small ints, names, constants
                if id(obj) in wide_seen:
                    continue
                wide_seen.add(id(obj))
            elif n != single:
                some.append(obj)
                continue
            kind = type(obj)
            group = get(kind)
            if group is None:
                group = once[kind] = []
            group.append(obj)
        return once, some

    def shared_containers(self, some: list[object], level: dict[type, list[object]]) -> None:
        """Shared untracked tuples and dicts to walk into, each once."""
        seen = self.shared_seen
        for obj in compress(some, map(_CONTAINERS.__contains__, map(type, some))):
            if id(obj) not in seen:
                seen.add(id(obj))
                level.setdefault(type(obj), []).append(obj)


def _weigh(some: list[object], shared: Counter[tuple[type, int, int, int]]) -> None:
    """Count objects held by a few references each as 1/references per occurrence.

    ``some`` may list an object m times; its count is then k + m + c for k references
    outside. Listing everything twice adds m more: k = 2 * first - second - c, worked
    out when the census is summed up (``c`` is ``_calibrate``'s second value).
    """
    first = list(map(sys.getrefcount, some))
    dup = some[:]
    second = list(map(sys.getrefcount, some))
    del dup
    try:
        shared.update(zip(map(type, some), map(sys.getsizeof, some), first, second, strict=True))
    except Exception:  # a broken __sizeof__: the slow way, that object without bytes
        for obj, one, two in zip(some, first, second, strict=True):
            shared[type(obj), _size(obj), one, two] += 1


def _referents(level: dict[type, list[object]]) -> list[object]:
    """What the objects of ``level`` reference, with the dicts' str keys; empties
    ``level`` so that nothing of ours holds those objects any more."""
    objs = list(chain.from_iterable(level.values()))
    refs = gc.get_referents(*objs)
    del objs
    for kind, group in level.items():
        if issubclass(kind, dict):
            # Fails only if another thread changed one meanwhile: its values counted.
            with contextlib.suppress(Exception):
                refs.extend(_str_keys(group))
    level.clear()
    return refs


def _str_keys(dicts: Iterable[object]) -> list[object]:
    """The str keys of ``dicts``: the keys the collector does not visit. A dict whose
    keys are all str hides them; one with other keys shows all of its keys (so a str
    key of such a mixed dict is found twice, a rare case)."""
    keys = list(chain.from_iterable(map(_DICT_ITER, dicts)))
    return list(compress(keys, map(is_, map(type, keys), repeat(str))))


def _group(objs: Iterable[object]) -> dict[type, list[object]]:
    """``objs`` by exact type (the one Python loop of the census: cheap next to
    ``sys.getsizeof``)."""
    groups: dict[type, list[object]] = {}
    get = groups.get
    for obj in objs:
        kind = type(obj)
        group = get(kind)
        if group is None:
            group = groups[kind] = []
        group.append(obj)
    return groups


def _account(
    groups: dict[type, list[object]],
    counts: dict[type, float],
    sizes: dict[type, float],
    fixed: dict[type, bool],
) -> dict[type, list[object]]:
    """Add objects grouped by type to the census; return the groups."""
    for kind, group in groups.items():
        same = fixed.get(kind)
        if same is None:
            same = fixed[kind] = _fixed_size(kind)
        counts[kind] = counts.get(kind, 0) + len(group)
        if same:
            total = len(group) * _size(group[0])
        else:
            try:
                total = sum(map(sys.getsizeof, group))
            except Exception:  # a broken __sizeof__ somewhere in the group
                total = sum(map(_size, group))
        sizes[kind] = sizes.get(kind, 0) + total
    return groups


def _fixed_size(kind: type) -> bool:
    """Whether every instance of ``kind`` has the same ``sys.getsizeof``: no items and
    object's own ``__sizeof__``, so one instance is measured for all."""
    try:
        sizeof: object = kind.__sizeof__
        return kind.__itemsize__ == 0 and sizeof is object.__sizeof__
    except Exception:
        return False


def _size(obj: object) -> int:
    try:
        return sys.getsizeof(obj)
    except Exception:
        return 0


def type_name(kind: type) -> str:
    """``module.qualname``; builtins without their module. Read through type's own
    descriptors: a metaclass's ``__getattribute__`` never runs."""
    try:
        module = _TYPE_MODULE.__get__(kind)
        qualname = _TYPE_QUALNAME.__get__(kind)
    except Exception:
        return "?"
    if not isinstance(qualname, str):
        return "?"
    if not isinstance(module, str) or module == "builtins":
        return qualname
    return f"{module}.{qualname}"


def _rows(counts: dict[type, float], sizes: dict[type, float], limit: int) -> list[Row]:
    """Rows by type name (two classes of one name are one row), most bytes first."""
    by_name: dict[str, list[float]] = {}
    for kind, n in counts.items():
        row = by_name.setdefault(type_name(kind), [0.0, 0.0])
        row[0] += n
        row[1] += sizes.get(kind, 0)
    rows = [(name, round(n), round(b)) for name, (n, b) in by_name.items() if round(n)]
    rows.sort(key=lambda row: (-row[2], -row[1], row[0]))
    limit = max(limit, 0)
    if len(rows) <= limit:
        return rows
    rest = rows[limit:]
    return [*rows[:limit], (OTHER_TYPES, sum(r[1] for r in rest), sum(r[2] for r in rest))]


# -- kept census ----------------------------------------------------------------------


def kept_census(
    limit: int = 50, *, accept: Callable[[tracemalloc.Traceback], bool] | None = None
) -> tuple[list[Row], list[object]]:
    """The census of objects alive now that tracemalloc saw allocated, i.e. created
    since tracing started and kept; and up to 8 of them worth a ``root_path``.

    ``accept``, if given, narrows "kept" to objects whose allocation traceback it says
    yes to (asked once per distinct traceback; an exception counts as no).

    Rows as ``census()``, every object counted once by identity (the kept set is what a
    leak is made of, so exactness is worth a set of ids here). Kept untracked objects
    are found inside any tracked object, old or new: a str added to an old dict counts.
    The sample is the largest kept object of each type among the tops of kept
    structures (kept objects no kept object references: from there the root path is
    the one that matters), largest first. Pass the sample list to ``root_path`` as
    ``ignore``. ``([], [])`` when tracemalloc is not tracing.

    It walks the whole heap as ``census()`` does, asking tracemalloc about each object
    found: about 2 s on a heap of 1.2 million objects while tracing (whatever was
    made meanwhile), 8 s when all of them were made while tracing. On 3.11, whose
    ``get_object_traceback`` misses every instance of an ordinary class, each such
    instance is asked about again through ctypes (``_traceback_by_address``).

    tracemalloc sees an object's allocation only when its memory comes from the
    allocator: CPython reuses freed floats, tuples, lists and dicts from per-type free
    lists (up to 80 lists and dicts, 2,000 tuples of each length), so a kept container
    made from one is counted as old. What it holds is still found (as the top of the
    kept structure, so ``root_path`` from it goes through the container).
    """
    if not tracemalloc.is_tracing():
        return [], []
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _kept(limit, accept)
    except Exception:
        return [], []
    finally:
        if enabled:
            gc.enable()


class _KeptTest:
    """Which objects count as kept: allocated while tracing, and accepted."""

    __slots__ = ("accept", "answers", "at", "managed")

    def __init__(self, accept: Callable[[tracemalloc.Traceback], bool] | None) -> None:
        self.accept = accept
        self.answers: dict[object, bool] = {}  # raw traceback -> accepted
        self.at = _traceback_by_address()
        self.managed: dict[type, bool] = {}  # type -> Py_TPFLAGS_MANAGED_DICT

    def __call__(self, objs: list[object], *, tracked: bool = False) -> list[bool]:
        raw = list(map(_traceback, objs))
        if tracked and self.at is not None:  # only tracked objects have managed dicts
            raw = list(map(self._mended, objs, raw))
        if self.accept is None:
            return list(map(is_not, raw, repeat(None)))
        return list(map(self._accepted, raw))

    def _mended(self, obj: object, frames: Any) -> Any:
        """3.11: ask again, at the block's start, for an instance with a managed dict
        (the GC header and the pre-header are two pointers each)."""
        if frames is not None or self.at is None:
            return frames
        kind = type(obj)
        has = self.managed.get(kind)
        if has is None:
            has = self.managed[kind] = bool(kind.__flags__ & _MANAGED_DICT)
        return self.at(0, id(obj) - 32) if has else None

    def _accepted(self, frames: Any) -> bool:
        if frames is None or self.accept is None:
            return frames is not None
        answer = self.answers.get(frames)
        if answer is None:
            try:
                answer = bool(self.accept(tracemalloc.Traceback(frames)))
            except Exception:
                answer = False
            self.answers[frames] = answer
        return answer


def _kept(
    limit: int, accept: Callable[[tracemalloc.Traceback], bool] | None
) -> tuple[list[Row], list[object]]:
    objs = gc.get_objects()  # first: what this function creates is not in it
    is_kept = _KeptTest(accept)
    counts: dict[type, float] = {}
    sizes: dict[type, float] = {}
    fixed: dict[type, bool] = {}
    best: dict[type, tuple[int, object]] = {}  # the largest top of each type
    flags = is_kept(objs, tracked=True)
    kept = list(compress(objs, flags))
    old = list(compress(objs, map(not_, flags)))
    del objs, flags
    for start in range(0, len(kept), _CHUNK):
        _account(_group(kept[start : start + _CHUNK]), counts, sizes, fixed)
    inner: set[int] = set()  # tracked objects a kept object references
    for start in range(0, len(kept), _CHUNK):
        refs = gc.get_referents(*kept[start : start + _CHUNK])
        inner.update(map(id, filter(gc.is_tracked, refs)))
        del refs
    for obj in kept:
        if id(obj) not in inner:
            _offer(best, obj)
    inner.clear()
    _kept_untracked(kept, old, is_kept, (counts, sizes, fixed), best)
    del old
    if not best:  # kept structures that are all cycles: their largest members
        for obj in kept:
            _offer(best, obj)
    del kept
    sample = [obj for _, obj in sorted(best.values(), key=lambda pair: -pair[0])[:_SAMPLE]]
    best.clear()
    return _rows(counts, sizes, limit), sample


def _offer(best: dict[type, tuple[int, object]], obj: object) -> None:
    size = _size(obj)
    kind = type(obj)
    if kind not in best or best[kind][0] < size:
        best[kind] = (size, obj)


def _kept_untracked(
    kept: list[object],
    old: list[object],
    is_kept: _KeptTest,
    tally: tuple[dict[type, float], dict[type, float], dict[type, bool]],
    best: dict[type, tuple[int, object]],
) -> None:
    """Count the kept untracked objects under every tracked object, each once; the
    ones only an old object holds are tops of kept structures. Kept holders first, so
    an object both hold is not offered as a top."""
    single, _ = _calibrate()
    seen: set[int] = set()  # kept untracked objects held by several, counted
    walked: set[int] = set()  # untracked containers held by several, walked
    is_container = _CONTAINERS.__contains__
    # Nothing here makes an object per reference: tracemalloc would trace each one.
    for holders_kept, holders in ((True, kept), (False, old)):
        for start in range(0, len(holders), _CHUNK):
            levels = [(holders_kept, _group(holders[start : start + _CHUNK]))]
            while levels:
                from_kept, level = levels.pop()
                refs = _referents(level)
                un = list(filterfalse(gc.is_tracked, refs))
                del refs
                new = is_kept(un)
                made = list(compress(un, new))  # few: what was made while tracing
                # Held by one reference, so listed once in `un` and once in `made`:
                # reached only here, no id to remember.
                alone = list(map((single + 1).__eq__, map(sys.getrefcount, made)))
                found: list[object] = []
                for obj, only in zip(made, alone, strict=True):
                    if only or id(obj) not in seen:
                        if not only:
                            seen.add(id(obj))
                        found.append(obj)
                        if not from_kept:
                            _offer(best, obj)
                del made, alone
                _account(_group(found), *tally)
                del found
                inner = list(compress(un, map(is_container, map(type, un))))
                inner_new = list(compress(new, map(is_container, map(type, un))))
                del un, new
                # Held by one reference (count as calibrated): reached only here.
                alone = list(map(single.__eq__, map(sys.getrefcount, inner)))
                below: dict[bool, dict[type, list[object]]] = {True: {}, False: {}}
                for obj, only, is_new in zip(inner, alone, inner_new, strict=True):
                    if only or id(obj) not in walked:
                        if not only:
                            walked.add(id(obj))
                        below[is_new].setdefault(type(obj), []).append(obj)
                del inner, alone, inner_new
                levels.extend((k, v) for k, v in below.items() if v)
                del below


# -- root path ------------------------------------------------------------------------


def root_path(
    obj: object,
    *,
    show_values: bool = False,
    budget_seconds: float = 0.5,
    max_depth: int = 16,
    ignore: Iterable[object] = (),
) -> str | None:
    """Who keeps ``obj`` alive, as a person would write it: the root, then the way down.

    Walks referrers up from ``obj`` (``gc.get_referrers``, up to 12 objects a heap
    scan, the nearest first, so the first root found is on a shortest path) until one
    of these roots:

    - a module's global: ``myapp.tasks.RESULTS``;
    - a class attribute: ``myapp.tasks.Registry.handlers``;
    - a ``functools.lru_cache``: ``functools.lru_cache of myapp.tasks.lookup``;
    - a running frame of another thread: ``frame of myapp.tasks.run (tasks.py:12)``;
    - ``sys.modules`` or a module object: ``sys.modules``, ``myapp.tasks``.

    The collector cannot show a referrer it does not track: an untracked tuple or
    dict (one of atoms only: a pair of strs, a cache of str to bytes), or a dict
    holding a str as a key. When every branch ends at an untracked object, one pass
    down from all tracked objects (about 0.2 s on 1.2 million objects, 0.3 s for a
    str) finds such holders, and the walk goes on up from there.

    Then each step down, appended to the root: ``.name`` an attribute (an instance's,
    a class's, a module's global, a slot, or a named field of a builtin object such
    as ``.__traceback__``, ``.tb_next``, ``.__self__``), a frame's local variable or a
    closure's cell (``.__closure__[payload]``); ``.tb_frame (frame of mod.func,
    file.py:40)`` a frame, as ``.f_back (...)`` and ``.gi_frame (...)``; ``[...]`` an
    element of a list, tuple, set, deque or cache, or a dict's value; ``.keys()[...]``
    a dict's key; `` -> <type>`` a reference nothing above names. With
    ``show_values`` the brackets say which: ``[3]`` a position, ``['user:42']`` the
    dict key's repr (up to 40 characters). Without it no key and no value appears:
    only type, module, function, attribute and variable names and file:line.

    When no root is found within ``budget_seconds`` or ``max_depth`` levels, or above
    the last referrers, the path is partial: it starts with ``? <type>`` (the topmost
    object reached) and ends with `` (no root found: out of time)``, ``(no root
    found: max_depth)`` or ``(no root found: no referrer beyond)``. None when nothing
    but ``ignore`` and this thread's frames refers to ``obj`` (so: a C extension, or
    the caller's own variables), or when the walk itself fails.

    Not followed as referrers: the objects in ``ignore`` (pass the caller's own
    containers, such as ``kept_census``'s sample list), this function's bookkeeping,
    and every frame of the calling thread (the probe's and its callers'). Objects
    frozen by ``gc.freeze()`` are not scanned. On Python 3.10-3.12, reading a running
    frame's locals makes CPython keep a snapshot dict of them on it until it returns
    or is read again; the walk does that only for another thread's frame that holds a
    path object (3.10), or, on 3.11-3.12, where running frames are invisible to the
    collector, once the heap scans found no root. 3.13 reads them without a snapshot.
    """
    try:
        return _RootWalk(obj, ignore, max_depth).run(budget_seconds, show_values)
    except Exception:
        return None


class _RootWalk:
    """One breadth-first walk of referrers. The objects it holds are in ``nodes``,
    ``held`` and the tuple of each scan, which, with this thread's frames, it never
    follows as referrers."""

    __slots__ = (
        "below",
        "depth",
        "held",
        "locals",
        "max_depth",
        "modules",
        "nodes",
        "running",
        "skip",
        "target",
    )

    def __init__(self, obj: object, ignore: Iterable[object], max_depth: int) -> None:
        self.nodes: dict[int, object] = {id(obj): obj}
        self.below: dict[int, int] = {}  # referrer -> the object it holds on the path
        self.depth: dict[int, int] = {id(obj): 0}
        self.target = id(obj)
        self.max_depth = max_depth
        self.held: list[object] = []  # other threads' frames (and values) looked at
        self.skip: set[int] = {id(o) for o in ignore}
        self.skip.update((id(self), id(self.nodes), id(self.held)))
        self._skip_own_frames()
        self.modules: dict[int, str] = {}  # id of a module, or of its dict -> its name
        for name, module in list(sys.modules.items()):
            if isinstance(name, str) and issubclass(type(module), types.ModuleType):
                self.modules[id(module)] = name
                with contextlib.suppress(Exception):
                    self.modules[id(_MODULE_DICT.__get__(module))] = name
        self.running: set[int] = set()  # frames some other thread is running
        self.locals: dict[int, tuple[int, str]] = {}  # id(value) -> (frame in held, name)

    def _skip_own_frames(self) -> None:
        """This thread's frames (the probe's and its callers') are never referrers:
        on 3.10 a running frame shows its locals to the collector."""
        frame: types.FrameType | None = sys._getframe().f_back
        while frame is not None:
            self.skip.add(id(frame))
            frame = frame.f_back

    def run(self, budget_seconds: float, show_values: bool) -> str | None:
        deadline = time.monotonic() + budget_seconds
        others = _other_thread_frames()
        self.held.extend(others)
        self.running.update(map(id, others))
        if _PEP667:  # a side-effect-free read: every frame's locals, from the start
            self._index_locals(others)
        del others
        # Before 3.13, reading a running frame's f_locals stores a snapshot of its
        # locals on the frame until it returns: in a worker that could keep a task's
        # request alive for good. So a root in another thread's running frame is only
        # looked for where reading is free of that (PEP 667).
        root, reason = self._bfs(deadline)
        if root is None and len(self.nodes) == 1:
            return None
        return self._describe(root, reason, show_values)

    def _index_locals(self, frames: list[Any]) -> None:
        for frame in frames:
            names = _local_items(frame)
            if not names:
                continue
            where = len(self.held)
            self.held.append(frame)
            for name, value in names:
                if isinstance(name, str):
                    self.held.append(value)  # keeps the id from being reused meanwhile
                    self.locals.setdefault(id(value), (where, name))

    def _frame_root(self, ids: Iterable[int]) -> int | None:
        """A running frame holding one of ``ids``: it becomes a node above it."""
        for node in ids:
            where = self.locals.get(node)
            if where is not None:
                frame = self.held[where[0]]
                self.nodes[id(frame)] = frame
                self.below[id(frame)] = node
                self.depth[id(frame)] = self.depth[node] + 1
                return id(frame)
        return None

    def _bfs(self, deadline: float) -> tuple[int | None, str]:
        """Scan the heap for referrers of the nearest pending objects, until a root."""
        root = self._root(self.target)
        if root is not None:
            return root, ""
        if self.locals:
            root = self._frame_root([self.target])
            if root is not None:
                return root, ""
        pending: deque[int] = deque([self.target])
        scan = -1.0  # the first scan is always made
        reason = "no referrer beyond"
        searched: set[int] = set()  # dead ends already looked for in hidden holders
        while True:
            if not pending:
                root = self._hidden(pending, searched, deadline)
                if root is not None:
                    return root, ""
                if not pending:
                    break
            if scan >= 0 and time.monotonic() + scan > deadline:
                return None, "out of time"
            batch = [pending.popleft() for _ in range(min(_FRONTIER, len(pending)))]
            self._skip_own_frames()
            # A tuple: ``*`` passes it as it is, and it is skipped (3.13 copies the
            # arguments, so CPython's own skip of them misses the caller's tuple).
            frontier = tuple(map(self.nodes.__getitem__, batch))
            self.skip.add(id(frontier))
            wanted = set(batch)
            started = time.monotonic()
            found = gc.get_referrers(*frontier)
            scan = time.monotonic() - started
            new: dict[type, list[int]] = {}
            root = None
            for referrer in found:
                rid = id(referrer)
                if rid in self.skip or rid in self.nodes:
                    continue
                child = self._child(referrer, wanted)
                if child is None:
                    continue
                self.nodes[rid] = referrer
                self.below[rid] = child
                self.depth[rid] = self.depth[child] + 1
                root = self._root(rid)
                if root is not None:
                    break
                if self.depth[rid] < self.max_depth:
                    new.setdefault(type(referrer), []).append(rid)
                else:
                    reason = "max_depth"
            found.clear()
            del found
            self.skip.discard(id(frontier))
            del frontier
            if root is not None:
                return root, ""
            # Interleaved by type: a thousand instances of one class do not crowd out
            # the one dict that leads to a module.
            fresh = [i for group in zip_longest(*new.values()) for i in group if i is not None]
            new.clear()
            if self.locals:
                root = self._frame_root(fresh)
                if root is not None:
                    return root, ""
            pending.extend(fresh)
        return None, reason

    def _hidden(self, pending: deque[int], searched: set[int], deadline: float) -> int | None:
        """When every branch is a dead end: look for the holders ``gc.get_referrers``
        cannot see, of the untracked dead ends (the 12 nearest not looked for yet).

        The collector never scans untracked objects, so a str in a tuple of strs, or a
        bytes in a dict of atoms (a cache), has no referrer it can find; nor has a dict's
        str key (a dict does not show its str keys to the collector). One pass down from
        every tracked object, as the census walks, finds them; the path it went down is
        added, and the walk goes on up from its tracked top, queued in ``pending``.
        Returns that top when it is a root.
        """
        below = set(self.below.values())
        dead = [
            node
            for node in sorted(self.nodes, key=self.depth.__getitem__)
            if node not in below
            and node not in searched
            and not gc.is_tracked(self.nodes[node])
            and self.depth[node] < self.max_depth
        ][:_FRONTIER]
        if not dead or time.monotonic() > deadline:
            return None
        searched.update(dead)
        self._skip_own_frames()
        wanted = dict(zip(dead, map(self.nodes.__getitem__, dead), strict=True))
        for path in _hidden_paths(wanted, self.skip, deadline):
            child = id(path[-1])
            for holder in reversed(path[:-1]):
                hid = id(holder)
                if hid in self.nodes:
                    break
                self.nodes[hid] = holder
                self.below[hid] = child
                self.depth[hid] = self.depth[child] + 1
                child = hid
            else:
                if self._root(child) is not None:
                    return child
                pending.append(child)
        return None

    def _child(self, referrer: object, wanted: set[int]) -> int | None:
        """Which of the scanned objects ``referrer`` holds (the nearest if several)."""
        try:
            held = wanted.intersection(map(id, gc.get_referents(referrer)))
        except Exception:
            return None
        if not held:
            return None
        return min(held, key=self.depth.__getitem__)

    def _root(self, node: int) -> int | None:
        obj = self.nodes[node]
        kind = type(obj)
        if (
            node in self.modules
            or obj is sys.modules
            or (_LRU_TYPE is not None and kind is _LRU_TYPE)
            or issubclass(kind, type)
            or (kind is types.FrameType and node in self.running)
        ):
            return node
        return None

    # -- naming ----------------------------------------------------------------------

    def _describe(self, root: int | None, reason: str, show_values: bool) -> str:
        if root is None:
            top = max(self.nodes, key=self.depth.__getitem__)
            head = f"? <{type_name(type(self.nodes[top]))}>"
            tail = f" (no root found: {reason})"
        else:
            top = root
            head = self._root_name(self.nodes[root])
            tail = ""
        chain_ = [self.nodes[top]]
        node = top
        while node != self.target:
            node = self.below[node]
            chain_.append(self.nodes[node])
        steps = []
        i = 0
        while i < len(chain_) - 1:
            label, used = _step(chain_, i, show_values, self.modules)
            steps.append(label)
            i += used
        return head + "".join(steps) + tail

    def _root_name(self, obj: object) -> str:
        kind = type(obj)
        if obj is sys.modules:
            return "sys.modules"
        if id(obj) in self.modules:
            return self.modules[id(obj)]
        if issubclass(kind, type):
            return type_name(obj)  # type: ignore[arg-type]
        if kind is types.FrameType:
            where, line = _frame_names(obj)
            return f"frame of {where} ({line})"
        return f"functools.lru_cache of {_callable_name(obj)}"


def _hidden_paths(wanted: dict[int, object], skip: set[int], deadline: float) -> list[list[object]]:
    """Paths from a tracked object down through untracked tuples and dicts (or to a
    dict's str key) to each object of ``wanted`` (by id) found so held, one each.

    A tracked object that holds one directly (not as a str key) is a referrer the
    collector already showed, so at the tracked level only dicts' keys are looked at,
    and the referents only for the untracked containers to go down into."""
    paths: list[list[object]] = []
    ids = set(wanted)
    # Keys are looked at only for a str wanted: _keys gives the str keys, and the
    # collector shows every other key. None: no keys.
    dict_types: dict[type, bool] | None = None
    if str in set(map(type, wanted.values())):
        dict_types = {}
    objs = gc.get_objects()
    for start in range(0, len(objs), _CHUNK):
        if time.monotonic() > deadline:
            break
        levels = [objs[start : start + _CHUNK]]
        keys = _keys(levels[0], dict_types)
        refs = gc.get_referents(*levels[0])
        refs.extend(keys)
        while ids:
            for hit in _hits(ids, wanted, keys):
                path = _path_down(levels, wanted[hit], dict_types, skip)
                if path is not None:  # else held only through what is skipped here
                    paths.append(path)
                    ids.discard(hit)
            inner = compress(refs, map(_CONTAINERS.__contains__, map(type, refs)))
            level = list(filterfalse(gc.is_tracked, inner))
            del refs, inner, keys
            if not level:
                break
            levels.append(level)
            keys = _references(level, dict_types)  # below: anything may be the holder
            refs = keys
        del levels
        if not ids:
            break
    return paths


def _hits(ids: set[int], wanted: dict[int, object], refs: list[object]) -> list[int]:
    """Which of ``ids`` are among ``refs``: by identity, without making an int per
    reference, when few are looked for."""
    if len(ids) <= 3:
        return [i for i in ids if any(map(is_, refs, repeat(wanted[i])))]
    if ids.isdisjoint(map(id, refs)):
        return []
    return list(ids.intersection(map(id, refs)))


def _keys(objs: list[object], dict_types: dict[type, bool] | None) -> list[object]:
    """The str keys of the dicts among ``objs``; none if ``dict_types`` is None (else
    it caches which types are dicts)."""
    if dict_types is None:
        return []
    kinds = list(map(type, objs))
    for kind in set(kinds).difference(dict_types):
        dict_types[kind] = issubclass(kind, dict)
    dicts = compress(objs, map(dict_types.__getitem__, kinds))
    with contextlib.suppress(Exception):  # a dict changed by another thread meanwhile
        return _str_keys(dicts)
    return []


def _references(objs: list[object], dict_types: dict[type, bool] | None) -> list[object]:
    """What ``objs`` reference, dicts' str keys included."""
    refs = gc.get_referents(*objs)
    refs.extend(_keys(objs, dict_types))
    return refs


def _path_down(
    levels: list[list[object]],
    target: object,
    dict_types: dict[type, bool] | None,
    skip: set[int],
) -> list[object] | None:
    """The objects, one per level, through which an object of ``levels[0]`` (not one
    of ``skip``) holds ``target``; None if there is none."""
    path = [target]
    for depth in range(len(levels) - 1, -1, -1):
        for obj in levels[depth]:
            if depth == 0 and id(obj) in skip:
                continue
            if any(map(is_, _references([obj], dict_types), repeat(path[0]))):
                path.insert(0, obj)
                break
        else:
            return None
    return path


def _other_thread_frames() -> list[Any]:
    """Every frame other threads are running, innermost first. This thread's frame is
    dropped unread: held in a local of its own frame it would make a cycle that keeps
    the walk's frames, and the object they walk from, alive until the next collection.
    """
    tops = sys._current_frames()
    tops.pop(threading.get_ident(), None)
    frames = []
    for top in tops.values():
        frame: Any = top
        while frame is not None:
            frames.append(frame)
            frame = frame.f_back
    tops.clear()
    return frames


def _local_items(frame: Any) -> list[tuple[Any, Any]]:
    """A function frame's local variables (none for a module or class body, whose
    locals are a namespace the collector sees anyway)."""
    try:
        if not frame.f_code.co_flags & 1:  # CO_OPTIMIZED
            return []
        return list(frame.f_locals.items())
    except Exception:
        return []


def _frame_names(frame: Any) -> tuple[str, str]:
    """``module.function`` and ``file.py:line`` of a frame."""
    try:
        code = frame.f_code
        name = getattr(code, "co_qualname", code.co_name)
        module = frame.f_globals.get("__name__")
        where = f"{module}.{name}" if isinstance(module, str) else str(name)
        line = frame.f_lineno
        return where, f"{os.path.basename(code.co_filename)}:{line if line else '?'}"
    except Exception:
        return "?", "?"


def _callable_name(obj: object) -> str:
    try:
        module = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
    except Exception:
        return "?"
    if not isinstance(qualname, str):
        return "?"
    return f"{module}.{qualname}" if isinstance(module, str) else qualname


def _step(chain_: list[Any], i: int, show: bool, modules: dict[int, str]) -> tuple[str, int]:
    """The label of the reference from ``chain_[i]`` to ``chain_[i + 1]``, and how many
    references it names (a closure names three: function, tuple, cell)."""
    a, b = chain_[i], chain_[i + 1]
    c = chain_[i + 2] if i + 2 < len(chain_) else None
    kind = type(a)
    try:
        if i == 0 and type(a) is dict and id(a) in modules:  # a module's globals
            key = _key_of(a, b)
            return (f".{key}" if isinstance(key, str) else "[...]"), 1
        lru = _LRU_TYPE is not None and kind is _LRU_TYPE
        if lru and type(b) is dict and c is not None and _instance_dict(a) is not b:
            return _dict_value(b, c, show), 2
        if issubclass(kind, type) and type(b) is dict and c is not None:
            for name, value in _TYPE_DICT.__get__(a).items():
                if value is c:
                    return f".{name}", 2
        if kind is types.FunctionType and b is a.__closure__ and type(c) is types.CellType:
            name = a.__code__.co_freevars[_index(b, c)]
            d = chain_[i + 3] if i + 3 < len(chain_) else None
            if d is not None and d is c.cell_contents:
                return f".__closure__[{name}]", 3
            return f".__closure__[{name}]", 2
        if kind is types.FrameType:
            return _frame_step(a, b, c)
        if kind is types.TracebackType and b is a.tb_frame:
            where, line = _frame_names(b)
            return f".tb_frame (frame of {where}, {line})", 1
        if kind in (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType):
            return _generator_step(a, b, c)
        label = _named_field(a, b)
        if label is not None:
            return label, 1
        inst = _instance_dict(a)
        if inst is not None:
            if b is inst and c is not None:
                key = _key_of(inst, c)
                if isinstance(key, str):
                    return f".{key}", 2
            key = _key_of(inst, b)
            if isinstance(key, str):
                return f".{key}", 1
        if issubclass(kind, dict):
            return _dict_value(a, b, show), 1
        if issubclass(kind, _SEQUENCES):
            if show:
                return f"[{_index(a, b)}]", 1
            return "[...]", 1
        if issubclass(kind, _ELEMENTS) or (_LRU_TYPE is not None and kind is _LRU_TYPE):
            return "[...]", 1
        if kind is types.CellType:
            return ".cell_contents", 1
    except Exception:
        return _unnamed(b), 1
    return _unnamed(b), 1


def _unnamed(b: object) -> str:
    """A reference nothing names: the type it leads to."""
    return f" -> <{type_name(type(b))}>"


def _frame_step(frame: Any, b: object, c: object) -> tuple[str, int]:
    """A frame's local variable (or cell variable), or its caller's frame."""
    if b is frame.f_back:
        where, line = _frame_names(b)
        return f".f_back (frame of {where}, {line})", 1
    target = b.cell_contents if type(b) is types.CellType else b
    for name, value in list(frame.f_locals.items()):
        if value is target:
            if target is not b:
                return (f".{name}", 2) if c is target else (f".{name} (cell)", 1)
            return f".{name}", 1
    return _unnamed(b), 1


def _generator_step(gen: Any, b: object, c: object) -> tuple[str, int]:
    """A suspended generator's frame (3.10) or local variable (3.11+, the generator
    holds its frame's locals itself)."""
    for attr in ("gi_frame", "cr_frame", "ag_frame"):
        frame = getattr(gen, attr, None)
        if frame is not None:
            break
    else:
        return _unnamed(b), 1
    where, line = _frame_names(frame)
    head = f".{attr} (frame of {where}, {line})"
    if b is frame:
        return head, 1
    label, used = _frame_step(frame, b, c)
    return head + label, used


# Named fields of builtin objects, read through the builtin type's own descriptors.
_FIELDS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (BaseException, ("__traceback__", "__context__", "__cause__", "args")),
    (types.TracebackType, ("tb_next",)),
    (types.MethodType, ("__self__", "__func__")),
    (types.FunctionType, ("__defaults__", "__kwdefaults__", "__code__")),
    (type, ("__bases__", "__mro__")),
    (property, ("fget", "fset", "fdel")),
    (staticmethod, ("__func__",)),
    (classmethod, ("__func__",)),
    (functools.partial, ("func", "args", "keywords")),
)


def _named_field(a: object, b: object) -> str | None:
    """``.name`` when ``b`` is a named field of ``a``: a builtin type's field, or a
    member (a slot, a C struct member) of any class in its MRO."""
    kind = type(a)
    for base, names in _FIELDS:
        if issubclass(kind, base):
            for name in names:
                descriptor = vars(base).get(name)
                if type(descriptor) in _DESCRIPTORS and _read(descriptor, a, base) is b:
                    return f".{name}"
    for klass in _TYPE_MRO.__get__(kind):
        for name, descriptor in list(_TYPE_DICT.__get__(klass).items()):
            member = type(descriptor) is types.MemberDescriptorType
            if member and _read(descriptor, a, klass) is b:
                return f".{name}"
    return None


def _read(descriptor: Any, obj: object, owner: type) -> object:
    """What a C descriptor gives for ``obj``; ``_MISSING`` for an unset slot."""
    try:
        return descriptor.__get__(obj, owner)
    except Exception:
        return _MISSING


def _instance_dict(a: object) -> dict[Any, Any] | None:
    """``a.__dict__`` through the C descriptor that defines it (never a property)."""
    for klass in _TYPE_MRO.__get__(type(a)):
        descriptor = _TYPE_DICT.__get__(klass).get("__dict__")
        if descriptor is None:
            continue
        if type(descriptor) not in _DESCRIPTORS:
            return None
        try:
            inst = descriptor.__get__(a, klass)
        except Exception:
            return None
        return inst if type(inst) is dict else None
    return None


def _key_of(d: dict[Any, Any], value: object) -> object:
    """The key under which ``d`` holds ``value`` (identity), or a marker."""
    return next(compress(dict.keys(d), map(is_, dict.values(d), repeat(value))), _MISSING)


def _dict_value(d: dict[Any, Any], b: object, show: bool) -> str:
    key = _key_of(d, b)
    if key is _MISSING:
        if any(map(is_, dict.keys(d), repeat(b))):
            return ".keys()[...]"
        return _unnamed(b)
    if not show:
        return "[...]"
    try:
        return f"[{repr(key)[:40]}]"
    except Exception:
        return "[?]"


def _index(seq: Any, item: object) -> int | str:
    """Where ``seq`` (a list or tuple, subclasses read as such) holds ``item``."""
    items = list.__iter__(seq) if isinstance(seq, list) else tuple.__iter__(seq)
    return next(compress(count(), map(is_, items, repeat(item))), "?")
