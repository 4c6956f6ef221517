"""The guard's rules as small pure pieces, each testable with a hand-made clock.

- :class:`Trip`: a threshold with debounce (N consecutive readings over it) and
  hysteresis (it clears only below ``threshold - hysteresis``), RELIABILITY.md D22;
- :func:`projected`: where a series of readings is heading, by least squares;
- :class:`Durations`: how long a task name usually takes, for the hang threshold;
- :class:`PoisonLedger`: the hard kills per task id in a sliding window (B12);
- :class:`WorkerBudget`: how many recycles a worker may have in flight, how often (B13).

Every time here is monotonic seconds: a wall clock stepped by an hour must not make
every task look hung or every window expire (RELIABILITY.md, I39).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

__all__ = ["Durations", "PoisonLedger", "Trip", "WorkerBudget", "projected"]


@dataclass(slots=True)
class Trip:
    """Debounced, hysteretic ``value > threshold``: one spike does not trip it, a level
    held for ``sustain`` readings does, and it clears only below the hysteresis band."""

    threshold: float
    sustain: int
    hysteresis: float
    over: int = 0
    tripped: bool = False

    def reading(self, value: float) -> bool:
        """Feed one new reading; return whether the threshold is tripped now."""
        if self.threshold <= 0:
            return False
        if value > self.threshold:
            self.over += 1
            if self.over >= self.sustain:
                self.tripped = True
        else:
            self.over = 0
            if value < self.threshold - self.hysteresis:
                self.tripped = False
        return self.tripped


def projected(readings: list[tuple[float, float]], horizon: float) -> float | None:
    """The value a least-squares line through ``(t, value)`` readings reaches
    ``horizon`` seconds after the last one; None with fewer than 4 readings or less
    than a minute between the first and the last (a slope from noise)."""
    if len(readings) < 4 or readings[-1][0] - readings[0][0] < 60.0:
        return None
    n = len(readings)
    mean_t = sum(t for t, _ in readings) / n
    mean_v = sum(v for _, v in readings) / n
    var = sum((t - mean_t) ** 2 for t, _ in readings)
    if var <= 0:
        return None
    slope = sum((t - mean_t) * (v - mean_v) for t, v in readings) / var
    last_t = readings[-1][0]
    return mean_v + slope * (last_t + horizon - mean_t)


@dataclass(slots=True)
class Durations:
    """The last ``keep`` durations of each task name, to tell usual from hung."""

    keep: int = 200
    _by_name: dict[str, deque[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        if len(self._by_name) >= 10_000 and name not in self._by_name:
            return  # bounded: a flood of names keeps the first ten thousand
        self._by_name.setdefault(name, deque(maxlen=self.keep)).append(seconds)

    def count(self, name: str) -> int:
        return len(self._by_name.get(name, ()))

    def p99(self, name: str) -> float | None:
        values = sorted(self._by_name.get(name, ()))
        if not values:
            return None
        return values[min(len(values) - 1, int(0.99 * len(values)))]


@dataclass(slots=True)
class PoisonLedger:
    """Hard kills per task id within a sliding window."""

    window: float
    _kills: dict[str, list[float]] = field(default_factory=dict)

    def kills(self, task_id: str, now: float) -> int:
        times = self._kills.get(task_id)
        if not times:
            return 0
        del times[: bisect.bisect_left(times, now - self.window)]
        return len(times)

    def add(self, task_id: str, now: float) -> None:
        if len(self._kills) >= 10_000:
            for key in [k for k, v in self._kills.items() if not v or v[-1] < now - self.window]:
                del self._kills[key]
        self._kills.setdefault(task_id, []).append(now)


@dataclass(slots=True)
class WorkerBudget:
    """One worker's recycles: at most ``max_parallel`` in flight, hard ones at least
    ``min_interval`` apart (billiard stops a pool whose children die faster than it
    restarts them: ``RestartFreqExceeded``), and ``max_per_hour`` in any hour.

    A soft recycle may wait for a long task: it never holds up a hard one (a hang or a
    child over the hard threshold elsewhere in the worker), and counts toward the hourly
    rate only once the child's probe accepted it (:meth:`accepted`).
    """

    max_parallel: int
    min_interval: float
    max_per_hour: int
    in_flight: set[str] = field(default_factory=set)  # hard recycles' incident ids
    soft_in_flight: set[str] = field(default_factory=set)
    started: deque[float] = field(default_factory=deque)
    last_hard: float = float("-inf")

    def refusal(self, now: float, *, hard: bool) -> str | None:
        """Why a recycle may not start now, or None."""
        while self.started and self.started[0] < now - 3600.0:
            self.started.popleft()
        busy = len(self.in_flight) + (0 if hard else len(self.soft_in_flight))
        if busy >= self.max_parallel:
            return f"{busy} recycle(s) of this worker in flight (max_parallel)"
        if len(self.started) >= self.max_per_hour:
            return f"{len(self.started)} recycles of this worker in the last hour (max_per_hour)"
        if hard and now - self.last_hard < self.min_interval:
            return "the last hard recycle was less than min_interval_seconds ago"
        return None

    def begin(self, incident_id: str, now: float, *, hard: bool) -> None:
        if hard:
            self.in_flight.add(incident_id)
            self.started.append(now)
            self.last_hard = now
        else:
            self.soft_in_flight.add(incident_id)

    def accepted(self, now: float) -> None:
        """A soft recycle the child's probe took on: it counts toward the hourly rate."""
        self.started.append(now)

    def end(self, incident_id: str) -> None:
        self.in_flight.discard(incident_id)
        self.soft_in_flight.discard(incident_id)
