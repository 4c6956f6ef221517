"""The guard: recycle fat children, unhang stuck ones and reap orphans, safely.

``attach_guard(session, config, store_path)`` wires a :class:`Guard` to a session: it
decides after every sweep, from what the session keeps, and acts only through the
pidfds the sampler opened and verified at discovery (``guard.signals``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from celery_warden.guard._config import (
    GuardConfig,
    config_from_env_path,
    dump_config,
    load_config,
)
from celery_warden.guard._guard import Guard, GuardView
from celery_warden.probe._stack import STACK_SIGNAL

if TYPE_CHECKING:
    from celery_warden.session import Session

__all__ = [
    "Guard",
    "GuardConfig",
    "GuardView",
    "attach_guard",
    "dump_config",
    "guard_config",
    "load_config",
]


def guard_config(path: Path | None, overrides: dict[str, object], *, act: bool) -> GuardConfig:
    """The effective configuration: the file (``--config``, else
    ``$CELERY_WARDEN_CONFIG``, else none), then the flags, then ``act``."""
    return load_config(path or config_from_env_path(), {**overrides, "act": act})


def attach_guard(session: Session, config: GuardConfig, store_path: Path | None) -> Guard:
    """A guard fed by ``session``'s sweeps and calls; start it after the session."""

    def view() -> GuardView:
        running = {(a.pid, a.start_ticks): (a.running, a.heartbeat_at) for a in session.activity()}
        return GuardView(
            tracked=session.tracked(),
            latest=session.latest_samples(),
            running=running,
            workers=session.live.workers(),
        )

    guard = Guard(
        config,
        view=view,
        handle=session.handle,
        store_path=store_path,
        session_id=lambda: session.session_id,
        stack_signal=STACK_SIGNAL,
    )
    session.on_sweep(guard.swept.set)
    session.on_task(guard.on_task)
    return guard
