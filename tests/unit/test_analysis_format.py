"""Numbers in reasons: binary sizes, signed growth, intervals, durations, counts."""

from __future__ import annotations

import pytest

from celery_warden.analysis._format import (
    format_bytes,
    format_count,
    format_duration,
    format_interval,
    format_signed_bytes,
)


@pytest.mark.parametrize(
    ("size", "text"),
    [(512, "512 B"), (20_580, "20.1 KiB"), (150 * 2**20, "150.0 MiB"), (3 * 2**30, "3.0 GiB")],
)
def test_sizes_use_the_binary_unit_that_fits(size: float, text: str) -> None:
    """Sizes are shown in B, KiB, MiB or GiB, whichever fits."""
    # GIVEN a size / WHEN formatted / THEN in its unit
    assert format_bytes(size) == text


@pytest.mark.parametrize(
    ("size", "text"), [(200_000, "+0.2 MiB"), (-10_240, "-10.0 KiB"), (0.0, "+0 B")]
)
def test_growth_carries_its_sign(size: float, text: str) -> None:
    """Growth is signed, in MiB unless below a tenth of one."""
    # GIVEN a growth / WHEN formatted / THEN signed
    assert format_signed_bytes(size) == text


def test_interval_has_enough_decimals_to_tell_its_bounds_apart() -> None:
    """An interval gets more decimals when it is narrow."""
    # GIVEN a wide and a narrow interval
    # WHEN formatted / THEN both bounds differ in text
    assert format_interval(20_580, 19_660, 21_500) == ("20.1 KiB", "19.2-21.0 KiB")
    assert format_interval(19_990, 19_970, 20_010) == ("19.52 KiB", "19.50-19.54 KiB")


@pytest.mark.parametrize(("seconds", "text"), [(45, "45 s"), (2400, "40 min"), (9000, "2.5 h")])
def test_durations_use_the_unit_a_person_would(seconds: float, text: str) -> None:
    """Durations are in seconds, minutes or hours."""
    # GIVEN a duration / WHEN formatted / THEN readable
    assert format_duration(seconds) == text


def test_counts_have_thousands_separators() -> None:
    """Counts are rounded and grouped by thousands."""
    # GIVEN a count / WHEN formatted / THEN grouped
    assert format_count(1600.4) == "1,600"
