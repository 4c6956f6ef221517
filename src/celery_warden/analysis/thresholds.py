"""Every threshold the analysis uses, with its unit and default, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from celery_warden.analysis._robust import MAX_PAIRWISE_POINTS

__all__ = ["DEFAULT_THRESHOLDS", "AnalysisThresholds"]

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class AnalysisThresholds:
    """What the leak analysis needs to see before it calls something.

    The axis is ``tasks_done`` when the probe recorded tasks, else time. "Window" is
    the part of a series after the warm-up prefix.

    Attributes:
        min_points: Fewest readings to judge at all (default 30).
        min_span_seconds: Shortest series to judge on the time axis (default 120 s);
            on the task axis ``min_tasks`` plays that part.
        min_tasks: Fewest tasks finished across the series, when tasks are recorded
            (default 50); with fewer, per-task growth cannot be told from noise.
        min_distinct_x: Fewest distinct axis values in the window (default 8): a fit
            needs readings spread along the axis, not piled on a few task counts.
        warmup_fraction: Share of the axis range dropped from the start as warm-up
            (default 0.25): imports, caches and copy-on-write breaking after fork.
        warmup_min_seconds: On the time axis, a series shorter than this is "young"
            (default 600 s): its growth is reported as warming up, never as a leak.
        warmup_min_tasks: On the task axis, a series with fewer tasks than this is
            "young" (default 200).
        min_growth_bytes: Least fitted growth over the window that matters
            (default 1 MiB).
        noise_multiple: Fitted growth must also reach this many times the robust
            noise of the residuals (default 3.0).
        max_points: Bins a window is reduced to before pairwise fits (default 200,
            about 20k slopes).
        confidence_level: Two-sided level of the slope intervals (default 0.95).
        spread_segments: Segments of the window whose medians must each rise
            (default 6).
        spread_min_fraction: Share of the fitted rise each step between segment
            medians must reach (default 0.25); a single jump fails this.
        deceleration_ratio: The later half's slope must be at least this share of
            the earlier half's (default 0.6); growth slowing to a stop fails this.
        min_thread_growth: Least fitted growth of the thread count over the window
            to call a thread leak (default 5 threads).
        min_fd_growth: Least fitted growth of the open-file count over the window to
            call an fd leak (default 5 fds).
    """

    min_points: int = 30
    min_span_seconds: float = 120.0
    min_tasks: int = 50
    min_distinct_x: int = 8
    warmup_fraction: float = 0.25
    warmup_min_seconds: float = 600.0
    warmup_min_tasks: int = 200
    min_growth_bytes: float = 1.0 * MIB
    noise_multiple: float = 3.0
    max_points: int = 200
    confidence_level: float = 0.95
    spread_segments: int = 6
    spread_min_fraction: float = 0.25
    deceleration_ratio: float = 0.6
    min_thread_growth: float = 5.0
    min_fd_growth: float = 5.0

    def __post_init__(self) -> None:
        """Reject settings the analysis cannot work with.

        Raises:
            ValueError: If a fraction, level or count is out of its range.
        """
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 < self.confidence_level < 1.0:
            raise ValueError(f"confidence_level must be in (0, 1), got {self.confidence_level}")
        if self.spread_segments < 3:
            raise ValueError(f"spread_segments must be at least 3, got {self.spread_segments}")
        # A fit needs three distinct points; pairwise work must stay bounded.
        if not 3 <= self.max_points <= MAX_PAIRWISE_POINTS:
            raise ValueError(
                f"max_points must be in 3..{MAX_PAIRWISE_POINTS}, got {self.max_points}"
            )
        if self.min_points < 3 or self.min_distinct_x < 3:
            raise ValueError("min_points and min_distinct_x must be at least 3")


DEFAULT_THRESHOLDS = AnalysisThresholds()
