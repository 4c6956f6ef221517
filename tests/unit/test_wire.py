"""The probe's wire format."""

from __future__ import annotations

import pytest

from celery_warden._records import (
    EndReason,
    Heartbeat,
    ProcessEnd,
    TaskFinished,
    TaskStarted,
    TaskState,
    WorkerInfo,
)
from celery_warden.live import LiveView
from celery_warden.probe import wire


def test_a_finished_task_round_trips() -> None:
    """What the probe encodes after a task decodes to the same facts."""
    data = wire.encode("f", 7, 70, "id", 'odd name ✓ "quoted"', 1.0, 2.5, 1.5, "SUCCESS", 4096)
    message, dropped = wire.decode(data)
    assert message == TaskFinished(
        7, 70, "id", 'odd name ✓ "quoted"', 2.5, 1.5, TaskState.SUCCESS, 4096, 1.0
    )
    assert dropped == 0


def test_an_exit_message_carries_the_reason_and_the_dropped_count() -> None:
    """A child's exit message tells why it left and how many messages it dropped."""
    message, dropped = wire.decode(wire.encode("x", 7, 70, 3.0, 155, "max-tasks", 12))
    assert message.reason is EndReason.MAX_TASKS  # type: ignore[union-attr]
    assert dropped == 12


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"{}",
        b"[]",
        b'["f", 1]',
        b'["?", 1, 2]',
        b'["s", "x", 1, "i", "n", 1]',
        b'["s", 99999999999999999999999, 1, "i", "n", 1.0]',
        b'["s", 1, 1, "i", "n", NaN]',
        b"[" * 15000,
    ],
)
def test_malformed_messages_raise(data: bytes) -> None:
    """Anything malformed (out-of-range numbers, NaN, absurd nesting) raises; the
    listener counts it and goes on."""
    with pytest.raises((ValueError, TypeError, RecursionError)):
        wire.decode(data)


def test_a_finished_call_round_trips_every_field() -> None:
    """Everything the probe measures per call survives the wire."""
    data = wire.encode(
        "f", 7, 70, "id", "n", 1.0, 2.0, 1.0, "FAILURE", 4096, 0.5, 100, 200, 42, "x.Err", 3
    )
    message, _ = wire.decode(data)
    assert isinstance(message, TaskFinished)
    assert (message.cpu_seconds, message.uss_after_bytes, message.pss_after_bytes) == (
        0.5,
        100,
        200,
    )
    assert (message.py_blocks_delta, message.exception, message.retries) == (42, "x.Err", 3)


def test_a_heartbeat_decodes_and_a_bad_one_is_refused() -> None:
    """A heartbeat lists running tasks; a malformed list is an error, not a crash."""
    message, dropped = wire.decode(wire.encode("h", 7, 70, 5.0, 3, [["id", "n", 4.0, None]]))
    assert isinstance(message, Heartbeat)
    assert message.running[0].task_id == "id"
    assert message.running[0].cpu_seconds is None
    assert dropped == 3
    for bad in ("nope", [["id", "n"]], [["id", "n", "nan", 1]]):
        with pytest.raises((ValueError, TypeError)):
            wire.decode(wire.encode("h", 7, 70, 5.0, 0, bad))


def test_text_sqlite_cannot_store_is_escaped_and_absurd_numbers_refused() -> None:
    """A lone surrogate (valid JSON, not UTF-8) is escaped so the store can keep it;
    an infinite or huge number is a ValueError like any malformed field."""
    message, _ = wire.decode(b'["s",1,2,"id-\\ud800","n\\udfff",3.0]')
    assert isinstance(message, TaskStarted)
    message.task_id.encode("utf-8")
    message.name.encode("utf-8")
    for bad in (b'["s",1e999,2,"id","n",3.0]', b'["s",1,2,"id","n",' + b"9" * 400 + b"]"):
        with pytest.raises(ValueError, match=r"range|integer"):
            wire.decode(bad)


_SETTINGS = {
    "task_acks_late": False,
    "broker_transport": "redis",
    "visibility_timeout": 7200,
    "tasks": {"proj.late": {"acks_late": True}},
    "tasks_truncated": False,
}


def test_a_workers_settings_round_trip_and_an_older_probe_sends_none() -> None:
    """The settings ride as the worker message's last field; a probe from before the
    field decodes with settings None."""
    message, _ = wire.decode(wire.encode("w", 7, 70, "w1@h", "prefork", 2, None, None, _SETTINGS))
    assert message == WorkerInfo(7, 70, "w1@h", "prefork", 2, None, None, _SETTINGS)
    old, _ = wire.decode(wire.encode("w", 7, 70, "w1@h", "prefork", 2, 100, 200_000))
    assert isinstance(old, WorkerInfo)
    assert (old.max_tasks_per_child, old.settings) == (100, None)


@pytest.mark.parametrize(
    "settings",
    [["not", "an", "object"], "text", {"tasks": ["proj.late"]}, {"tasks": {"proj.late": True}}],
)
def test_malformed_settings_are_refused(settings: object) -> None:
    with pytest.raises(ValueError, match="settings"):
        wire.decode(wire.encode("w", 7, 70, "w1@h", "prefork", 2, None, None, settings))


def test_the_live_view_keeps_each_masters_latest_word_until_it_ends() -> None:
    """Settings are live only: the latest WorkerInfo per master, replaced when a new
    master takes the pid, dropped when that master ends (not when an older one does)."""
    live = LiveView()
    first = WorkerInfo(7, 70, "w1@h", "prefork", 2, None, None, _SETTINGS)
    other = WorkerInfo(9, 90, "w2@h", "solo", 1, None, None, None)
    live.update(first)
    live.update(other)
    assert live.workers() == [first, other]
    restarted = WorkerInfo(7, 75, "w1@h", "prefork", 2, None, None, {"task_acks_late": True})
    live.update(restarted)
    live.update(ProcessEnd(7, 70, 1.0, EndReason.GONE))  # the earlier master's end
    assert live.workers() == [restarted, other]
    live.update(ProcessEnd(7, 75, 2.0, EndReason.GONE))
    assert live.workers() == [other]
    assert live.activity() == []  # a master's word is not activity
