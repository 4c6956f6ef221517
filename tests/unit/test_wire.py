"""The probe's wire format."""

from __future__ import annotations

import pytest

from celery_warden._records import EndReason, TaskFinished, TaskState
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
