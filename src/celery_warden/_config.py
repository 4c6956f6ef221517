"""Every tunable of the warden side with its unit and default, in one place.

Analysis thresholds live in :mod:`celery_warden.analysis.thresholds` (pure, so the
analysis package does not import this one); this module re-exports them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from celery_warden.analysis.thresholds import DEFAULT_THRESHOLDS, AnalysisThresholds

__all__ = [
    "DEFAULT_THRESHOLDS",
    "AnalysisThresholds",
    "Retention",
    "SamplerConfig",
    "default_store_path",
]

STORE_ENV = "CELERY_WARDEN_STORE"


@dataclass(frozen=True, slots=True)
class SamplerConfig:
    """How often the sampler reads what.

    The fast sweep (``/proc/PID/stat`` and the fd count) costs tens of microseconds a
    process; ``smaps_rollup`` (USS, PSS, swap, shared) costs about 9 us per MB resident,
    so it is refreshed for a bounded share of processes each sweep: every process at
    least every ``smaps_max_age_seconds``, sooner when its RSS moved by
    ``smaps_rss_change_fraction`` since its last read.
    """

    interval_seconds: float = 1.0
    smaps_max_age_seconds: float = 30.0
    smaps_rss_change_fraction: float = 0.05
    smaps_min_per_sweep: int = 8
    # A full /proc scan finds new descendants; it is skipped while the kernel's last
    # allocated PID (/proc/loadavg) has not moved, and forced this often regardless.
    rescan_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class Retention:
    """How long the store keeps what, at what resolution (docs/store.md).

    Samples are kept raw (one a sweep) for ``raw_seconds``, then as 1-minute
    aggregates until ``minute_seconds``, then as 15-minute aggregates until
    ``quarter_seconds``, then dropped. Task rows are kept ``task_seconds`` and at most
    ``max_task_rows``, oldest first.
    """

    raw_seconds: float = 3600.0
    minute_seconds: float = 7 * 86400.0
    quarter_seconds: float = 90 * 86400.0
    task_seconds: float = 7 * 86400.0
    max_task_rows: int = 2_000_000
    every_seconds: float = 300.0  # how often the writer applies it


def default_store_path() -> Path:
    """Where the store lives unless ``--store`` or ``$CELERY_WARDEN_STORE`` says otherwise.

    >>> default_store_path().name
    'warden.db'
    """
    explicit = os.environ.get(STORE_ENV)
    if explicit:
        return Path(explicit)
    return Path(platformdirs.user_state_dir("celery-warden")) / "warden.db"
