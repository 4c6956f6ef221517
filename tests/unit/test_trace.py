"""Targeted tracing in one process, through the probe's own receivers: what the traced
calls keep, and that nothing else is traced."""

from __future__ import annotations

import sys
import tracemalloc
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from celery_warden.probe._channel import Channel
from celery_warden.probe._hooks import Probe
from celery_warden.probe._trace import Trace

MODULE = "warden_trace_fixture"
SOURCE = """
KEPT = []
SLOT = []


def leaky():
    KEPT.append(bytearray(3000))  # line 7


def replacing():
    SLOT[:] = [bytearray(3000)]  # line 11


def clean():
    return [bytearray(3000) for _ in range(3)]  # line 15
"""


@dataclass
class _Request:
    retries: int = 0


@dataclass
class _Task:
    name: str
    request: _Request = field(default_factory=_Request)


@pytest.fixture
def app() -> Iterator[types.ModuleType]:
    module = types.ModuleType(MODULE)
    module.__file__ = f"/srv/app/{MODULE}.py"
    exec(compile(SOURCE, module.__file__, "exec"), module.__dict__)  # noqa: S102 - test source
    sys.modules[MODULE] = module
    yield module
    del sys.modules[MODULE]


@pytest.fixture
def probe() -> Iterator[Probe]:
    made = Probe(Channel("/nonexistent/celery-warden-test.sock"), heartbeat_seconds=0)
    yield made
    made.close()


def _run(probe: Probe, name: str, body: Callable[[], Any], i: int) -> Any:
    task = _Task(name)
    probe.on_task_prerun(task_id=f"id-{i}", task=task)
    result = body()
    probe.on_task_postrun(task_id=f"id-{i}", task=task, state="SUCCESS")
    return result


def _trace(probe: Probe, name: str, body: Callable[[], Any], calls: int) -> dict[str, Any]:
    """Arm a trace of ``name`` and run its calls between calls of another name."""
    trace = Trace(name, calls, frames=5)
    probe.trace = trace
    seen_tracing_in_other = []
    i = 0
    while not trace.done.is_set() and i < 10 * calls:
        _run(probe, name, body, i)
        seen_tracing_in_other.append(_run(probe, "other", tracemalloc.is_tracing, i + 1))
        i += 2
    probe.trace = None
    result = trace.result(show_values=False)
    result["_other_traced"] = sum(seen_tracing_in_other)
    assert not tracemalloc.is_tracing()
    return result


def test_a_leaking_name_is_traced_to_its_line_type_and_root(
    probe: Probe, app: types.ModuleType
) -> None:
    result = _trace(probe, "leaky", app.leaky, calls=8)
    assert result["calls_traced"] == 8
    top = result["sites"][0]
    assert (top["file"], top["line"]) == (app.__file__, 7)
    assert 3000 <= top["bytes_per_call"] <= 3300
    assert top["calls_keeping"] >= 6
    assert result["kept_after_next_call"] == pytest.approx(1.0, abs=0.1)
    assert result["types"][0]["type"] == "bytearray"
    assert any(r["path"].startswith(f"{MODULE}.KEPT[") for r in result["roots"])
    # the other name ran untraced, but for the one stretch held for the survival check
    assert result["_other_traced"] <= 1


def test_an_object_each_call_replaces_does_not_survive(probe: Probe, app: types.ModuleType) -> None:
    result = _trace(probe, "replacing", app.replacing, calls=8)
    assert result["sites"][0]["line"] == 11  # kept until the next call: seen
    assert result["kept_after_next_call"] == pytest.approx(0.0, abs=0.1)  # then gone


def test_the_return_value_is_not_kept(probe: Probe, app: types.ModuleType) -> None:
    """What a call returns is alive at its postrun and freed after: not kept."""
    result = _trace(probe, "clean", app.clean, calls=6)
    assert all(site["line"] != 15 for site in result["sites"]), result["sites"]
    assert result["kept_bytes_per_call"] < 256


def test_a_process_already_tracing_says_so(probe: Probe, app: types.ModuleType) -> None:
    tracemalloc.start()
    try:
        trace = Trace("leaky", 3, frames=5)
        probe.trace = trace
        _run(probe, "leaky", app.leaky, 0)
        assert trace.done.is_set()
        assert "already tracing" in (trace.error or "")
        assert tracemalloc.is_tracing()  # theirs, left alone
    finally:
        probe.trace = None
        tracemalloc.stop()
