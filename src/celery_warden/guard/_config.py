"""The guard's policies: every tunable with its unit in its name and its default.

Loaded from a TOML file (``--config``) and overridden by command-line flags; validated
as a whole before anything starts (a bad value raises :class:`ConfigError` naming the key,
the value and the expected form); ``--print-config`` writes the effective configuration
as TOML that loads back to the same value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "GuardConfig",
    "HangPolicy",
    "MemoryPolicy",
    "OrphanPolicy",
    "PoisonPolicy",
    "RecyclePolicy",
]


@dataclass(frozen=True, slots=True)
class MemoryPolicy:
    """Thresholds on a pool child's *current* private memory, never its peak.

    0 turns a threshold off. ``metric`` is ``"uss"`` (what the kernel frees when the child
    exits) or ``"pss"`` (USS plus its share of pages shared with the master).
    """

    metric: str = "uss"
    child_soft_mib: float = 0.0  # over it: the child leaves after its current task
    child_hard_mib: float = 0.0  # over it: TERM, then KILL after the recycle grace
    # Recycle softly when the measured growth rate would cross the hard threshold within
    # this horizon (0: off). Needs child_hard_mib.
    projected_horizon_seconds: float = 0.0
    master_budget_mib: float = 0.0  # reported: recycling children never fixes a master
    # "report", or "warm-restart": TERM to the master only, KILL its tree after the grace.
    master_action: str = "report"
    sustain_samples: int = 2  # consecutive readings over a threshold before acting
    hysteresis_mib: float = 16.0  # a tripped threshold clears only this far below it


@dataclass(frozen=True, slots=True)
class RecyclePolicy:
    """How children are recycled, and how often at most."""

    grace_seconds: float = 10.0  # between TERM and KILL
    max_parallel: int = 1  # children of one worker being recycled at once
    min_serving: int = 1  # children of one worker never recycled below this many
    min_interval_seconds: float = 2.0  # between two hard recycles in one worker
    max_per_hour: int = 60  # recycles of one worker per hour; beyond, report only


@dataclass(frozen=True, slots=True)
class HangPolicy:
    """When a running task counts as hung, and what is captured before the kill."""

    enabled: bool = True
    # Hung past max(min_seconds, factor x the name's p99 duration); names seen fewer than
    # min_history times use min_seconds alone.
    min_seconds: float = 600.0
    factor: float = 10.0
    min_history: int = 20
    # A task with a Celery time limit is left to Celery until limit x this factor.
    time_limit_factor: float = 1.5
    # A child running a task whose heartbeats stopped this long (the GIL held in C code,
    # or the process stopped) is hung whatever the task's usual time.
    stalled_seconds: float = 120.0
    stack: str = "auto"  # "auto" (py-spy, else faulthandler), "py-spy", "faulthandler", "none"
    stack_timeout_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class OrphanPolicy:
    """Processes of a worker's recorded lineage that outlived its master."""

    action: str = "kill"  # "kill" or "report"
    grace_seconds: float = 30.0  # after the master's death, before acting


@dataclass(frozen=True, slots=True)
class PoisonPolicy:
    """A task id that keeps getting its child killed is reported, not killed again."""

    max_kills: int = 3
    window_seconds: float = 3600.0


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Everything the guard decides by. ``act`` False: decide and record, send nothing."""

    act: bool = True
    memory: MemoryPolicy = field(default_factory=MemoryPolicy)
    recycle: RecyclePolicy = field(default_factory=RecyclePolicy)
    hang: HangPolicy = field(default_factory=HangPolicy)
    orphans: OrphanPolicy = field(default_factory=OrphanPolicy)
    poison: PoisonPolicy = field(default_factory=PoisonPolicy)
