"""The heap census, the kept census and referrer chains, on real objects."""

from __future__ import annotations

import gc
import sys
import threading
import tracemalloc
import types
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celery_warden.probe import _heap

# A small application, run as a real module (registered in sys.modules) so that its
# globals, classes, functions and frames are named as they would be in a worker.
APP_SOURCE = """
import functools
import threading
import weakref

RESULTS = []
LISTENERS = []
ERRORS = []
RECORDS = []  # weak references to what `fail` made: a weakref holds nothing
HANDOFF = []
STOP = threading.Event()
SECRETS = {}
PAIRS = []  # tuples of atoms: the collector untracks them
SEEN = {}  # str -> bool: a dict of atoms, untracked too
CACHE = {}  # str -> str, untracked


class Registry:
    handlers = {}


class Record:
    def __init__(self):
        self.rows = []


class Holder:
    __slots__ = ("payload",)

    def __init__(self, payload):
        self.payload = payload


@functools.lru_cache(maxsize=None)
def lookup(key):
    return [key]


def subscribe(payload):
    def handler():
        return payload

    LISTENERS.append(handler)


def fail():
    records = Record()
    RECORDS.append(weakref.ref(records))
    raise ValueError("boom")


def store_error():
    try:
        fail()
    except ValueError as exc:
        ERRORS.append(exc)


def run():
    held = Record()
    HANDOFF.append(held)
    STOP.wait(30)
"""


def _line(text: str) -> int:
    """The line of APP_SOURCE that holds ``text``."""
    return next(i for i, line in enumerate(APP_SOURCE.splitlines(), 1) if text in line)


@pytest.fixture
def app() -> Iterator[Any]:
    """A fresh module under a unique name, gone from sys.modules afterwards."""
    name = f"warden_heap_app_{uuid.uuid4().hex[:8]}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        code = compile(APP_SOURCE, "tasks.py", "exec")
        exec(code, module.__dict__)  # noqa: S102 - the test app's own source, above
        yield module
    finally:
        del sys.modules[name]


class Planted:
    """Instances the census must count exactly."""

    def __init__(self, n: int) -> None:
        self.n = n


class Broken:
    """Everything that could run user code fails."""

    def __sizeof__(self) -> int:
        raise RuntimeError("no size")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no eq")

    def __hash__(self) -> int:
        raise RuntimeError("no hash")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def _row(rows: list[tuple[str, int, int]], name: str) -> tuple[str, int, int] | None:
    return next((row for row in rows if row[0] == name), None)


PLANTED = f"{Planted.__module__}.{Planted.__qualname__}"


# -- census ---------------------------------------------------------------------------


def test_census_counts_a_planted_class_and_its_bytes_exactly() -> None:
    """Tracked instances are counted one by one, with sys.getsizeof bytes."""
    # GIVEN 3,000 instances of a class nothing else makes
    planted = [Planted(i) for i in range(3000)]
    # WHEN the heap is counted
    rows = _heap.census(limit=1000)
    # THEN its row has exactly those instances and their sizes
    assert _row(rows, PLANTED) == (PLANTED, 3000, sum(map(sys.getsizeof, planted)))


def test_census_rows_are_sorted_by_bytes_and_cut_at_limit() -> None:
    """At most `limit` rows by bytes, then one row for the rest; builtins unprefixed."""
    rows = _heap.census(limit=5)
    assert len(rows) == 6
    assert rows[-1][0] == "(other types)"
    sizes = [size for _, _, size in rows[:-1]]
    assert sizes == sorted(sizes, reverse=True)
    everything = _heap.census(limit=100_000)
    assert "(other types)" not in {name for name, _, _ in everything}
    assert {"dict", "str", "function"} <= {name for name, _, _ in everything}
    assert not any(name.startswith("builtins.") for name, _, _ in everything)


def test_census_counts_untracked_strings_once_however_many_hold_them() -> None:
    """Strings are not tracked by the collector: the walk below tracked objects finds
    them, and one held by two lists is still one string."""
    before = _row(_heap.census(limit=100_000), "str")
    # GIVEN 20,000 new strings, each held by two lists
    strings = [f"warden-census-{i}" for i in range(20_000)]
    again = list(strings)
    after = _row(_heap.census(limit=100_000), "str")
    assert before is not None
    assert after is not None
    # THEN about 20,000 more strings and their bytes (the test runner allocates too)
    assert 19_500 <= after[1] - before[1] <= 20_500
    expected = sum(map(sys.getsizeof, strings))
    assert 0.97 * expected <= after[2] - before[2] <= 1.03 * expected
    del again


def test_census_survives_objects_that_fail_everything() -> None:
    """A broken __sizeof__ costs that object its bytes, not the census."""
    broken = [Broken() for _ in range(10)]
    row = _row(_heap.census(limit=100_000), f"{Broken.__module__}.Broken")
    assert row is not None
    assert row[1] == 10
    del broken


# -- kept census ----------------------------------------------------------------------


class OldThing:
    pass


class NewThing:
    def __init__(self) -> None:
        self.label = f"thing-{id(self)}"


class Bag:
    def __init__(self, things: list[NewThing]) -> None:
        self.things = things


def test_kept_census_is_empty_when_tracemalloc_is_not_tracing() -> None:
    assert not tracemalloc.is_tracing()
    assert _heap.kept_census() == ([], [])


def test_kept_census_counts_what_was_made_since_tracing_started() -> None:
    """Objects made before tracing are not kept; those made since and alive are, with
    the strings inside them; the sample offers the top of the kept structure."""
    old = [OldThing() for _ in range(200)]
    tracemalloc.start(1)
    try:
        # GIVEN a bag of new things made while tracing, each with a new string
        bag = Bag([NewThing() for _ in range(500)])
        # WHEN the kept objects are counted
        rows, sample = _heap.kept_census(limit=1000)
    finally:
        tracemalloc.stop()
    names = {name: (count, size) for name, count, size in rows}
    # THEN the new things are counted exactly, the old ones not at all
    new_name = f"{NewThing.__module__}.NewThing"
    assert names[new_name] == (500, sum(map(sys.getsizeof, bag.things)))
    assert f"{OldThing.__module__}.OldThing" not in names
    # AND their strings, which the collector does not track, are found under them
    assert names["str"][0] >= 500
    # AND the bag (no kept object holds it) is offered for a root path
    assert 1 <= len(sample) <= 8
    assert any(obj is bag for obj in sample)
    assert not any(type(obj) is OldThing for obj in sample)
    del old


def test_kept_census_counts_only_what_accept_takes() -> None:
    """`accept` narrows kept objects by their allocation traceback."""
    tracemalloc.start(1)
    try:
        bag = Bag([NewThing() for _ in range(50)])
        here = __file__

        def from_this_file(traceback: tracemalloc.Traceback) -> bool:
            return any(frame.filename == here for frame in traceback)

        taken, _ = _heap.kept_census(limit=1000, accept=from_this_file)
        nothing = _heap.kept_census(limit=1000, accept=lambda traceback: False)
    finally:
        tracemalloc.stop()
    assert _row(taken, f"{NewThing.__module__}.NewThing") is not None
    assert nothing == ([], [])
    del bag


# -- root path ------------------------------------------------------------------------


def test_root_path_names_a_module_global(app: Any) -> None:
    target = object()
    app.RESULTS.append(target)
    assert _heap.root_path(target) == f"{app.__name__}.RESULTS[...]"
    assert _heap.root_path(target, show_values=True) == f"{app.__name__}.RESULTS[0]"


def test_root_path_names_an_lru_cache(app: Any) -> None:
    value = app.lookup(42)
    assert _heap.root_path(value) == f"functools.lru_cache of {app.__name__}.lookup[...]"


def test_root_path_names_a_class_attribute(app: Any) -> None:
    handler = [1]
    app.Registry.handlers["orders"] = handler
    assert _heap.root_path(handler) == f"{app.__name__}.Registry.handlers[...]"


def test_root_path_names_a_closure_cell(app: Any) -> None:
    payload = {"kind": "event"}
    app.subscribe(payload)
    path = _heap.root_path(payload)
    assert path == f"{app.__name__}.LISTENERS[...].__closure__[payload]"


def test_root_path_names_the_local_a_stored_traceback_keeps(app: Any) -> None:
    """A stored exception keeps its traceback's frames, and their locals."""
    app.store_error()
    records = app.RECORDS[-1]()
    assert records is not None
    line = _line('raise ValueError("boom")')
    assert _heap.root_path(records) == (
        f"{app.__name__}.ERRORS[...].__traceback__.tb_next"
        f".tb_frame (frame of {app.__name__}.fail, tasks.py:{line}).records"
    )


def test_root_path_names_a_running_thread_frame(app: Any) -> None:
    """An object only a thread's local variable holds has that frame for root."""
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if app.HANDOFF:
                break
            threading.Event().wait(0.01)
        held = app.HANDOFF.pop()
        line = _line("STOP.wait(30)")
        expected = f"frame of {app.__name__}.run (tasks.py:{line}).held"
        path = _heap.root_path(held)
        if sys.version_info >= (3, 13):
            assert path == expected
        else:  # reading a running frame's locals would pin them there: not done
            assert path is None or "frame of" not in path
    finally:
        app.STOP.set()
        thread.join(10)


def test_root_path_redacts_keys_and_never_shows_values(app: Any) -> None:
    """Attribute names are shown; dict keys only with show_values; values never."""
    secret = ["password=hunter2"]
    app.SECRETS["user:alice@example.com"] = [app.Holder({"token": secret})]
    redacted = _heap.root_path(secret)
    assert redacted == f"{app.__name__}.SECRETS[...][...].payload[...]"
    shown = _heap.root_path(secret, show_values=True)
    assert shown == f"{app.__name__}.SECRETS['user:alice@example.com'][0].payload['token']"
    for path in (redacted, shown):
        assert "hunter2" not in path


def test_root_path_finds_holders_the_collector_cannot_see(app: Any) -> None:
    """Untracked tuples and dicts (of atoms only) and dicts' str keys are invisible
    to gc.get_referrers: a pass over them finds the holder, and the walk goes on."""
    in_tuple = "warden-in-a-tuple-" + uuid.uuid4().hex
    app.PAIRS.append((in_tuple, 1))
    as_key = "warden-a-key-" + uuid.uuid4().hex
    app.SEEN[as_key] = True
    cached = "warden-cached-" + uuid.uuid4().hex
    app.CACHE["k"] = cached
    for container in (app.PAIRS[-1], app.SEEN, app.CACHE):
        gc.collect()  # the collector untracks tuples and dicts of atoms as it runs
        assert not gc.is_tracked(container)
    assert _heap.root_path(in_tuple) == f"{app.__name__}.PAIRS[...][...]"
    assert _heap.root_path(as_key) == f"{app.__name__}.SEEN.keys()[...]"
    assert _heap.root_path(cached) == f"{app.__name__}.CACHE[...]"


def test_root_path_leaves_nothing_behind(app: Any) -> None:
    """The walk's own lists and frames are gone when it returns."""
    target = object()
    app.RESULTS.append(target)
    before = len(gc.get_referrers(target))
    assert _heap.root_path(target) is not None
    assert len(gc.get_referrers(target)) == before


def test_root_path_ignores_the_callers_containers(app: Any) -> None:
    target = object()
    mine = [target]
    app.RESULTS.append(target)
    assert _heap.root_path(target, ignore=[mine]) == f"{app.__name__}.RESULTS[...]"
    assert _heap.root_path(mine[0], ignore=[app.RESULTS, mine]) is None


def test_root_path_is_none_when_nothing_holds_the_object() -> None:
    assert _heap.root_path(object()) is None


def test_root_path_marks_a_partial_path(app: Any) -> None:
    """Past max_depth (or the time budget) the path says it found no root."""
    deep: Any = ["leaf"]
    leaf = deep
    for _ in range(6):
        deep = [deep]
    app.RESULTS.append(deep)
    assert _heap.root_path(leaf) == f"{app.__name__}.RESULTS[...]" + "[...]" * 6
    partial = _heap.root_path(leaf, max_depth=3)
    assert partial == "? <list>[...][...][...] (no root found: max_depth)"
    hurried = _heap.root_path(leaf, budget_seconds=0)
    assert hurried is not None
    assert hurried.startswith("? <list>[...]")
    assert hurried.endswith(" (no root found: out of time)")


def test_root_path_survives_objects_that_fail_everything(app: Any) -> None:
    broken = Broken()
    app.RESULTS.append(app.Holder(broken))
    assert _heap.root_path(broken) == f"{app.__name__}.RESULTS[...].payload"
    assert _heap.root_path(broken, show_values=True) == f"{app.__name__}.RESULTS[0].payload"
