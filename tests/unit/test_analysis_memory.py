"""The memory verdict on synthetic series shaped like real Celery workers' memory.

Series are one reading a second with two tasks finished a second on a ~60 MB base;
noise comes from ``random.Random(seed)`` so every run sees the same numbers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import pytest

from celery_warden._records import MemoryFinding, MemoryPoint, Verdict
from celery_warden.analysis import DEFAULT_THRESHOLDS, AnalysisThresholds, assess_memory

T0 = 1_700_000_000.0
BASE_BYTES = 60_000_000.0
MB = 1_000_000.0
TASKS_PER_POINT = 2
N_POINTS = 2000

Shape = Callable[[random.Random, int], list[float]]


def make_points(
    values: Sequence[float], tasks_per_point: int = TASKS_PER_POINT
) -> list[MemoryPoint]:
    """Return one reading a second, ``tasks_per_point`` more tasks done at each."""
    return [
        MemoryPoint(t=T0 + i, value=v, tasks_done=i * tasks_per_point) for i, v in enumerate(values)
    ]


def leak(bytes_per_task: float, noise_bytes: float) -> Shape:
    """Return a shape growing ``bytes_per_task`` with Gaussian noise."""
    return lambda rng, n: [
        BASE_BYTES + bytes_per_task * TASKS_PER_POINT * i + rng.gauss(0, noise_bytes)
        for i in range(n)
    ]


def flat(noise_bytes: float) -> Shape:
    """Return a flat shape with Gaussian noise."""
    return lambda rng, n: [BASE_BYTES + rng.gauss(0, noise_bytes) for _ in range(n)]


def plateau(at_fraction: float, step_bytes: float = 150 * MB) -> Shape:
    """Return flat noisy usage that jumps once (one big task) and stays at the high-water mark."""
    return lambda rng, n: [
        BASE_BYTES + rng.gauss(0, 2 * MB) + (step_bytes if i >= at_fraction * n else 0.0)
        for i in range(n)
    ]


def warm_up(tau_points: float, amount_bytes: float = 80 * MB) -> Shape:
    """Return an exponential approach to a plateau (copy-on-write breaking, caches filling)."""
    return lambda rng, n: [
        BASE_BYTES + amount_bytes * (1 - math.exp(-i / tau_points)) + rng.gauss(0, 1 * MB)
        for i in range(n)
    ]


def spike(rng: random.Random, n: int) -> list[float]:
    """Return flat usage with a single 300 MB reading at 60%."""
    return [
        BASE_BYTES + rng.gauss(0, 1 * MB) + (300 * MB if i == n * 6 // 10 else 0.0)
        for i in range(n)
    ]


def sawtooth_of(period_points: int, amplitude_bytes: float) -> Shape:
    """Return a GC sawtooth: ``amplitude_bytes`` built up over ``period_points``, then freed."""
    return lambda rng, n: [
        BASE_BYTES + amplitude_bytes * (i % period_points) / period_points + rng.gauss(0, 0.3 * MB)
        for i in range(n)
    ]


sawtooth = sawtooth_of(60, 8 * MB)


def shrinking(rng: random.Random, n: int) -> list[float]:
    """Return memory given back at 10 KB a task."""
    return [
        BASE_BYTES + 100 * MB - 10_000 * TASKS_PER_POINT * i + rng.gauss(0, 2 * MB)
        for i in range(n)
    ]


def assess(shape: Shape, seed: int = 1, n: int = N_POINTS) -> MemoryFinding:
    """Return the verdict on ``n`` readings of ``shape`` drawn with ``seed``."""
    return assess_memory(make_points(shape(random.Random(seed), n)), "uss")


def test_leak_of_20_kb_per_task_under_2_mb_noise_is_a_leak() -> None:
    """A steady 20 KB per task leak is a leak, with its slope, interval and evidence."""
    # GIVEN 2,000 readings growing 20 KB a task under 2 MB of noise
    values = leak(20_000, 2 * MB)(random.Random(1), N_POINTS)
    # WHEN it is assessed
    finding = assess_memory(make_points(values), "uss")
    # THEN it is a leak measured per task, and the evidence adds up
    assert finding.verdict is Verdict.LEAK
    assert finding.slope_bytes_per_task == pytest.approx(20_000, rel=0.2)
    assert finding.slope_bytes_per_hour == pytest.approx(20_000 * 2 * 3600, rel=0.2)
    assert finding.growth_bytes is not None
    assert finding.growth_bytes == pytest.approx(20_000 * 2 * 0.75 * N_POINTS, rel=0.2)
    assert finding.noise_bytes == pytest.approx(2 * MB, rel=0.3)
    assert finding.confidence > 0.9
    assert finding.current_bytes == values[-1]
    assert finding.peak_bytes == max(values)
    assert finding.points == N_POINTS
    assert finding.metric == "uss"
    assert finding.window_tasks == pytest.approx(0.75 * N_POINTS * TASKS_PER_POINT, rel=0.01)
    assert finding.window_start is not None
    assert T0 < finding.window_start < T0 + N_POINTS / 2
    assert finding.window_end == T0 + N_POINTS - 1
    assert "per task (95% CI" in finding.reason
    assert finding.reason.endswith("a real leak")


def test_small_leak_under_large_transient_noise_is_a_leak() -> None:
    """A 4 KB per task leak under transient allocations of up to 40 MB is found over many tasks."""
    # GIVEN 20,000 tasks growing 4 KB each; a third of readings catch up to 40 MB of a task
    rng = random.Random(2)
    values = [
        BASE_BYTES
        + 4_000 * TASKS_PER_POINT * i
        + rng.gauss(0, 0.5 * MB)
        + (rng.uniform(0, 40 * MB) if rng.random() < 0.3 else 0.0)
        for i in range(10_000)
    ]
    # WHEN it is assessed
    finding = assess_memory(make_points(values), "rss")
    # THEN it is a leak with the true slope
    assert finding.verdict is Verdict.LEAK
    assert finding.slope_bytes_per_task == pytest.approx(4_000, rel=0.2)


def test_leak_measured_against_time_only_is_a_leak() -> None:
    """Without task counts the slope is measured per hour, and a steady leak is still a leak."""
    # GIVEN readings growing 10 KB a second with no task count recorded
    rng = random.Random(3)
    values = [BASE_BYTES + 10_000 * i + rng.gauss(0, 2 * MB) for i in range(N_POINTS)]
    # WHEN it is assessed
    finding = assess_memory(make_points(values, tasks_per_point=0), "rss")
    # THEN it is a leak per hour, with no per-task figures
    assert finding.verdict is Verdict.LEAK
    assert finding.slope_bytes_per_hour == pytest.approx(10_000 * 3600, rel=0.2)
    assert finding.slope_bytes_per_task is None
    assert finding.window_tasks is None
    assert "per hour (95% CI" in finding.reason


@pytest.mark.parametrize("step_bytes", [4096, 132 * 1024], ids=["page", "malloc-top-pad"])
def test_page_granular_leak_is_still_a_leak(step_bytes: int) -> None:
    """A leak seen through page- or arena-sized steps of RSS is still a leak with its slope."""
    # GIVEN a 20 KB per task leak quantized the way the kernel and malloc grow RSS
    rng = random.Random(4)
    values = [
        math.floor(
            (BASE_BYTES + 20_000 * TASKS_PER_POINT * i + rng.gauss(0, 0.3 * MB)) / step_bytes
        )
        * step_bytes
        for i in range(N_POINTS)
    ]
    # WHEN it is assessed
    finding = assess_memory(make_points(values), "rss")
    # THEN the steps do not hide it
    assert finding.verdict is Verdict.LEAK
    assert finding.slope_bytes_per_task == pytest.approx(20_000, rel=0.2)


def test_leak_after_a_warm_up_is_a_leak() -> None:
    """A leak following a large warm-up is found, with the slope of the leak alone."""
    # GIVEN an 80 MB warm-up over the first few minutes, then 5 KB per task
    rng = random.Random(13)
    values = [
        BASE_BYTES
        + 80 * MB * (1 - math.exp(-i / 100))
        + 5_000 * TASKS_PER_POINT * i
        + rng.gauss(0, MB)
        for i in range(N_POINTS)
    ]
    # WHEN it is assessed
    finding = assess_memory(make_points(values), "uss")
    # THEN the warm-up is dropped and the leak remains
    assert finding.verdict is Verdict.LEAK
    assert finding.slope_bytes_per_task == pytest.approx(5_000, rel=0.2)


def test_leak_under_a_gc_sawtooth_is_a_leak() -> None:
    """A leak under an 8 MB garbage-collection sawtooth is still a leak."""
    # GIVEN a 20 KB per task leak with an 8 MB sawtooth of period 60 on top
    rng = random.Random(12)
    values = [
        BASE_BYTES + 20_000 * TASKS_PER_POINT * i + 8 * MB * (i % 60) / 60 + rng.gauss(0, 0.3 * MB)
        for i in range(N_POINTS)
    ]
    # WHEN it is assessed
    finding = assess_memory(make_points(values), "rss")
    # THEN it is a leak
    assert finding.verdict is Verdict.LEAK
    assert finding.slope_bytes_per_task == pytest.approx(20_000, rel=0.2)


NOT_LEAK = {Verdict.STABLE, Verdict.WARMING_UP}


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        pytest.param(warm_up(200), NOT_LEAK, id="warm-up-flattens"),
        pytest.param(spike, {Verdict.STABLE}, id="single-spike"),
        pytest.param(sawtooth, {Verdict.STABLE}, id="gc-sawtooth"),
        pytest.param(plateau(0.3), {Verdict.STABLE}, id="high-water-at-30%"),
        pytest.param(plateau(0.5), {Verdict.STABLE}, id="high-water-at-50%"),
        pytest.param(plateau(0.7), {Verdict.STABLE}, id="high-water-at-70%"),
        pytest.param(flat(5 * MB), {Verdict.STABLE}, id="noisy-flat"),
        pytest.param(shrinking, {Verdict.STABLE}, id="shrinking"),
    ],
)
def test_false_positive_shapes_are_not_a_leak(shape: Shape, expected: set[Verdict]) -> None:
    """Shapes that look like growth to a naive fit are not called a leak."""
    # GIVEN a series shaped like a known false positive
    # WHEN it is assessed
    finding = assess(shape)
    # THEN it is not a leak
    assert finding.verdict in expected, finding.reason


@pytest.mark.parametrize(
    "make_shape",
    [
        pytest.param(lambda rng: flat(rng.choice([0.1, 1.0, 5.0]) * MB), id="noisy-flat"),
        pytest.param(lambda rng: plateau(rng.uniform(0.05, 0.95)), id="high-water-plateau"),
        pytest.param(
            lambda rng: sawtooth_of(rng.randint(20, 300), rng.choice([2.0, 8.0, 30.0]) * MB),
            id="gc-sawtooth",
        ),
    ],
)
def test_false_positive_rate_is_zero_over_30_seeds(
    make_shape: Callable[[random.Random], Shape],
) -> None:
    """Over 30 seeds of noisy flat usage, a plateau or a sawtooth, none is a leak."""
    # GIVEN 30 seeds, each drawing its own noise level, plateau position or sawtooth
    verdicts = []
    for seed in range(30):
        rng = random.Random(seed)
        # WHEN each series is assessed
        verdicts.append(assess_memory(make_points(make_shape(rng)(rng, N_POINTS)), "rss").verdict)
    # THEN none is a leak
    assert Verdict.LEAK not in verdicts


def test_leak_is_found_for_each_of_10_seeds() -> None:
    """The leak verdict does not hinge on one lucky draw of noise."""
    # GIVEN 10 seeds of a 20 KB per task leak under 2 MB noise
    findings = [assess(leak(20_000, 2 * MB), seed=seed) for seed in range(10)]
    # WHEN / THEN every one is a leak with the true slope
    assert all(f.verdict is Verdict.LEAK for f in findings)
    assert all(f.slope_bytes_per_task == pytest.approx(20_000, rel=0.2) for f in findings)


def test_slow_warm_up_that_still_grows_is_warming_up() -> None:
    """Growth that is clearly slowing but not yet flat is warming up, not a leak."""
    # GIVEN an exponential approach whose time constant is 40% of the series
    # WHEN it is assessed
    finding = assess(warm_up(800))
    # THEN it is warming up, and the reason says it slows down
    assert finding.verdict is Verdict.WARMING_UP
    assert "slowing down" in finding.reason


def test_young_growing_process_is_warming_up() -> None:
    """A process watched for less than the warm-up minimum is never called a leak."""
    # GIVEN 180 tasks of steady 100 KB per task growth
    # WHEN it is assessed
    finding = assess(leak(100_000, 2 * MB), n=90)
    # THEN it is warming up, and the reason says why
    assert finding.verdict is Verdict.WARMING_UP
    assert "only 178 tasks watched, need 200" in finding.reason


def test_young_flat_process_is_stable() -> None:
    """A young process whose memory does not move is stable."""
    # GIVEN five minutes of flat usage
    # WHEN it is assessed
    finding = assess(flat(MB), n=300)
    # THEN it is stable
    assert finding.verdict is Verdict.STABLE


def test_flat_usage_reason_says_within_noise() -> None:
    """The reason for flat usage gives the growth, the window and the noise."""
    # GIVEN noisy flat usage
    # WHEN it is assessed
    finding = assess(flat(2 * MB))
    # THEN the reason says it is flat within noise, and confidence is high
    assert finding.reason.startswith("flat after warm-up: ")
    assert "tasks (25 min), within noise (±" in finding.reason
    assert finding.confidence > 0.8


def test_a_short_burst_of_many_tasks_is_judged_on_the_task_axis() -> None:
    """A leak over 1,000 tasks run within a minute is a leak: on the task axis the span
    that matters is the number of tasks, not seconds."""
    # GIVEN 1,000 tasks in 50 s, each keeping 40 KB, with 1 MB of noise
    rng = random.Random(7)
    points = [
        MemoryPoint(T0 + i / 20, BASE_BYTES + 40_000 * i + rng.gauss(0, MB), i) for i in range(1000)
    ]
    # WHEN it is assessed
    finding = assess_memory(points, "rss")
    # THEN it is a leak at about 40 KB per task
    assert finding.verdict is Verdict.LEAK
    assert finding.slope_bytes_per_task == pytest.approx(40_000, rel=0.2)


def test_shrinking_memory_reason_says_it_shrinks() -> None:
    """Memory going down is stable and the reason says it shrinks."""
    # GIVEN memory given back at 10 KB a task
    # WHEN it is assessed
    finding = assess(shrinking)
    # THEN the reason says so
    assert finding.verdict is Verdict.STABLE
    assert finding.reason.startswith("shrinks -")


@pytest.mark.parametrize(
    ("points", "phrase"),
    [
        pytest.param(make_points([BASE_BYTES] * 10), "only 10 readings (need 30)", id="few-points"),
        pytest.param(
            [MemoryPoint(T0 + i / 2, BASE_BYTES, 0) for i in range(200)],
            "readings cover only 100 s (need 2 min)",
            id="short-span-in-time",
        ),
        pytest.param(
            [MemoryPoint(T0 + i, BASE_BYTES, 1 + i // 100) for i in range(2000)],
            "only 19 tasks finished (need 50)",
            id="few-tasks",
        ),
    ],
)
def test_too_little_data_is_insufficient_and_says_which(
    points: list[MemoryPoint], phrase: str
) -> None:
    """Too few readings, too short a span or too few tasks give insufficient-data, naming which."""
    # GIVEN a series missing one of the minimums
    # WHEN it is assessed
    finding = assess_memory(points, "rss")
    # THEN it is insufficient data, with no slope and zero confidence
    assert finding.verdict is Verdict.INSUFFICIENT_DATA
    assert phrase in finding.reason
    assert finding.slope_bytes_per_task is None
    assert finding.slope_bytes_per_hour is None
    assert finding.confidence == 0.0
    assert finding.current_bytes == BASE_BYTES


def test_no_points_is_insufficient_without_figures() -> None:
    """An empty series is insufficient data with no figures at all."""
    # GIVEN no readings
    # WHEN they are assessed
    finding = assess_memory([], "uss")
    # THEN nothing is made up
    assert finding.verdict is Verdict.INSUFFICIENT_DATA
    assert finding.current_bytes is None
    assert finding.peak_bytes is None
    assert finding.points == 0


def test_readings_piled_on_few_task_counts_are_insufficient() -> None:
    """Readings that cover few distinct task counts after warm-up cannot be fitted per task."""
    # GIVEN 100 tasks that all finished at one moment, then a long idle stretch
    points = [MemoryPoint(T0 + i, BASE_BYTES, 0 if i < 1000 else 100) for i in range(2000)]
    # WHEN it is assessed
    finding = assess_memory(points, "rss")
    # THEN it is insufficient data, saying why
    assert finding.verdict is Verdict.INSUFFICIENT_DATA
    assert "distinct task counts" in finding.reason


def test_thresholds_can_be_tightened() -> None:
    """Thresholds passed in replace the defaults."""
    # GIVEN a leak that the defaults call a leak, and a growth floor far above it
    points = make_points(leak(20_000, 2 * MB)(random.Random(1), N_POINTS))
    strict = AnalysisThresholds(min_growth_bytes=10_000 * MB)
    # WHEN it is assessed with each
    default, tightened = assess_memory(points, "uss"), assess_memory(points, "uss", strict)
    # THEN only the defaults call it a leak
    assert default.verdict is Verdict.LEAK
    assert tightened.verdict is Verdict.STABLE
    assert DEFAULT_THRESHOLDS.min_growth_bytes < strict.min_growth_bytes
