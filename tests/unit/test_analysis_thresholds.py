"""Analysis thresholds: documented defaults, immutability and refused settings."""

from __future__ import annotations

import dataclasses

import pytest

from celery_warden.analysis import DEFAULT_THRESHOLDS, AnalysisThresholds


def test_defaults_are_the_documented_ones() -> None:
    """The defaults are the values the docstring documents."""
    # GIVEN the default thresholds
    th = DEFAULT_THRESHOLDS
    # WHEN / THEN
    assert th.min_growth_bytes == 1024 * 1024
    assert (th.warmup_fraction, th.noise_multiple, th.max_points) == (0.25, 3.0, 200)
    assert (th.spread_segments, th.deceleration_ratio, th.confidence_level) == (6, 0.6, 0.95)
    assert (th.min_thread_growth, th.min_fd_growth) == (5.0, 5.0)


def test_thresholds_are_frozen() -> None:
    """Thresholds cannot be changed after creation."""
    # GIVEN the defaults
    # WHEN one is assigned / THEN it is refused
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_THRESHOLDS.min_points = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "changes",
    [
        {"warmup_fraction": 1.0},
        {"confidence_level": 0.0},
        {"spread_segments": 2},
        {"max_points": 5000},
        {"min_points": 2},
    ],
    ids=["warmup", "confidence", "segments", "max-points", "min-points"],
)
def test_unworkable_settings_are_refused(changes: dict[str, float]) -> None:
    """Settings the analysis cannot work with raise ValueError at creation."""
    # GIVEN an out-of-range setting
    # WHEN thresholds are created / THEN they are refused
    with pytest.raises(ValueError, match="must be"):
        AnalysisThresholds(**changes)  # type: ignore[arg-type]


def test_attribution_and_cpu_defaults_are_the_documented_ones() -> None:
    """The attribution and CPU-class defaults are the values the docstring documents."""
    # GIVEN the default thresholds
    th = DEFAULT_THRESHOLDS
    # WHEN / THEN
    assert (th.attribution_confidence, th.attribution_min_calls) == (0.999, 30)
    assert th.attribution_min_leak_bytes == 256.0
    assert (th.attribution_warmup_calls, th.attribution_warmup_fraction) == (20, 0.1)
    assert (th.attribution_max_names, th.attribution_max_blocks) == (64, 2000)
    assert (th.cpu_bound_ratio, th.io_bound_ratio, th.cpu_class_min_calls) == (0.7, 0.3, 5)


@pytest.mark.parametrize(
    "changes",
    [
        {"attribution_confidence": 1.0},
        {"attribution_warmup_fraction": 0.6},
        {"attribution_min_calls": 0},
        {"attribution_min_leak_bytes": -1.0},
        {"attribution_min_share": 1.0},
        {"attribution_min_share": -0.1},
        {"attribution_max_names": 0},
        {"attribution_max_blocks": 10},
        {"io_bound_ratio": 0.8},
        {"cpu_bound_ratio": 1.5},
        {"cpu_class_min_calls": 0},
    ],
    ids=[
        "confidence",
        "warmup",
        "min-calls",
        "floor",
        "share-1",
        "share-neg",
        "names",
        "blocks",
        "io",
        "cpu",
        "cpu-calls",
    ],
)
def test_unworkable_attribution_and_cpu_settings_are_refused(changes: dict[str, float]) -> None:
    """Attribution and CPU-class settings out of range raise ValueError at creation."""
    # GIVEN an out-of-range setting
    # WHEN thresholds are created / THEN they are refused
    with pytest.raises(ValueError, match="must be"):
        AnalysisThresholds(**changes)  # type: ignore[arg-type]
