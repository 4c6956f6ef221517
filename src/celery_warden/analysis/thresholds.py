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
        attribution_confidence: Two-sided level of the per-task-name retained-bytes
            intervals (default 0.99): a report tests every name at once, so each test
            is held to a stricter level than a single process's slope.
        attribution_min_calls: Fewest calls of a name, after warm-up, for it to get its
            own column in the fit (default 30); rarer names share one "other" column.
        attribution_min_leak_bytes: Least retained bytes per call that make a name a
            leak (default 256 B): 100,000 calls of it keep under 25 MiB, less than a
            child's usual warm-up, and growth that follows time rather than calls
            (a logging buffer, a background thread) leaves a small bias on busy names
            that this floor absorbs.
        attribution_min_share: Least share of the growth after warm-up a name must carry
            to be a leak (default 0.1). Beside a real leak, the allocator places the
            leaked blocks among other calls' transient memory, and the heap then grows
            a little on those calls too (a few hundred bytes a call, seen on real
            workers): a real effect, but the leak's, and fixing the leak removes it.
        attribution_warmup_calls: Calls dropped from the start of every process before
            attribution (default 20): imports, connection pools, caches filling.
        attribution_warmup_fraction: Share of a process's calls dropped as warm-up when
            that is more than ``attribution_warmup_calls`` (default 0.1); never more
            than half of a process's calls, so short-lived children still count.
        attribution_max_names: Most task names fitted one by one (default 64, the most
            called); the rest share the "other" column, which bounds the solve.
        attribution_max_blocks: Most blocks of consecutive calls in the fit, all
            processes together (default 2,000): past it blocks get longer, which keeps
            the work linear in calls.
        cpu_bound_ratio: A name whose median CPU/wall ratio per call reaches this is
            CPU-bound (default 0.7).
        io_bound_ratio: A name whose median ratio is at most this is IO-bound
            (default 0.3); in between, or when its quartiles reach past both, mixed.
        cpu_class_min_calls: Fewest calls with CPU time to classify a name (default 5).
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
    attribution_confidence: float = 0.999
    attribution_min_calls: int = 30
    attribution_min_leak_bytes: float = 256.0
    attribution_min_share: float = 0.1
    attribution_warmup_calls: int = 20
    attribution_warmup_fraction: float = 0.1
    attribution_max_names: int = 64
    attribution_max_blocks: int = 2000
    cpu_bound_ratio: float = 0.7
    io_bound_ratio: float = 0.3
    cpu_class_min_calls: int = 5

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
        self._check_attribution()
        if not 0.0 <= self.io_bound_ratio < self.cpu_bound_ratio <= 1.0:
            raise ValueError(
                "io_bound_ratio and cpu_bound_ratio must be 0 <= io < cpu <= 1, "
                f"got {self.io_bound_ratio} and {self.cpu_bound_ratio}"
            )
        if self.cpu_class_min_calls < 1:
            raise ValueError(
                f"cpu_class_min_calls must be at least 1, got {self.cpu_class_min_calls}"
            )

    def _check_attribution(self) -> None:
        """Reject attribution settings that cannot give a fit or an honest interval."""
        if not 0.0 < self.attribution_confidence < 1.0:
            raise ValueError(
                f"attribution_confidence must be in (0, 1), got {self.attribution_confidence}"
            )
        if not 0.0 <= self.attribution_warmup_fraction <= 0.5:
            raise ValueError(
                "attribution_warmup_fraction must be in [0, 0.5], "
                f"got {self.attribution_warmup_fraction}"
            )
        if self.attribution_min_calls < 1 or self.attribution_warmup_calls < 0:
            raise ValueError(
                "attribution_min_calls must be at least 1 and attribution_warmup_calls "
                f"at least 0, got {self.attribution_min_calls} and "
                f"{self.attribution_warmup_calls}"
            )
        if self.attribution_min_leak_bytes < 0:
            raise ValueError(
                "attribution_min_leak_bytes must be at least 0, "
                f"got {self.attribution_min_leak_bytes}"
            )
        if not 0.0 <= self.attribution_min_share < 1.0:
            raise ValueError(
                f"attribution_min_share must be in [0, 1), got {self.attribution_min_share}"
            )
        # The solve is cubic in names and the pass over blocks quadratic: keep both bounded.
        if not 1 <= self.attribution_max_names <= 256:
            raise ValueError(
                f"attribution_max_names must be in 1..256, got {self.attribution_max_names}"
            )
        if not 20 <= self.attribution_max_blocks <= 20_000:
            raise ValueError(
                f"attribution_max_blocks must be in 20..20000, got {self.attribution_max_blocks}"
            )


DEFAULT_THRESHOLDS = AnalysisThresholds()
