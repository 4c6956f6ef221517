"""The guard's rules on a hand-made clock: debounce, hysteresis, projection, usual
durations, the poison ledger and a worker's recycle budget."""

from __future__ import annotations

import pytest

from celery_warden.guard._policy import Durations, PoisonLedger, Trip, WorkerBudget, projected


def test_one_spike_does_not_trip_a_held_level_does() -> None:
    trip = Trip(threshold=100, sustain=3, hysteresis=10)
    assert [trip.reading(v) for v in (50, 200, 50, 101, 102)] == [False] * 5
    assert trip.reading(103) is True  # the third reading in a row over it


def test_tripped_clears_only_below_the_hysteresis_band() -> None:
    trip = Trip(threshold=100, sustain=1, hysteresis=10)
    assert trip.reading(120)
    assert trip.reading(95)  # under the threshold, inside the band: still tripped
    assert not trip.reading(89)


def test_a_zero_threshold_is_off() -> None:
    assert not Trip(threshold=0, sustain=1, hysteresis=0).reading(1e12)


def test_projection_follows_a_line_and_refuses_noise() -> None:
    line = [(float(t), 1000.0 + 2.0 * t) for t in range(0, 120, 10)]
    assert projected(line, 100.0) == pytest.approx(1000.0 + 2.0 * 210)
    assert projected(line[:3], 100.0) is None  # too few readings
    assert projected([(float(t), 5.0) for t in range(5)], 100.0) is None  # under a minute


def test_durations_p99_and_bounded_names() -> None:
    durations = Durations(keep=100)
    for i in range(100):
        durations.add("a", float(i))
    assert durations.p99("a") == 99.0
    assert durations.count("a") == 100
    assert durations.p99("never") is None


def test_poison_ledger_counts_inside_its_window_only() -> None:
    ledger = PoisonLedger(window=60.0)
    for t in (0.0, 10.0, 20.0):
        ledger.add("id-1", t)
    assert ledger.kills("id-1", 30.0) == 3
    assert ledger.kills("id-1", 75.0) == 1  # 0 and 10 fell out of the window
    assert ledger.kills("id-2", 30.0) == 0


def test_worker_budget_parallel_spacing_and_hourly_rate() -> None:
    budget = WorkerBudget(max_parallel=1, min_interval=2.0, max_per_hour=2)
    assert budget.refusal(0.0, hard=True) is None
    budget.begin("a", 0.0, hard=True)
    assert "max_parallel" in (budget.refusal(0.5, hard=False) or "")
    budget.end("a")
    assert "min_interval" in (budget.refusal(1.0, hard=True) or "")
    assert budget.refusal(1.0, hard=False) is None  # spacing applies to hard recycles
    budget.begin("b", 3.0, hard=True)
    budget.end("b")
    assert "max_per_hour" in (budget.refusal(10.0, hard=False) or "")
    assert budget.refusal(3601.0, hard=True) is None  # an hour later the first fell out
