"""Options and helpers the sub-commands share."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from celery_warden._config import default_store_path

__all__ = ["Context", "seconds_option", "store_option"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Context:
    """What the top-level options set for every sub-command."""

    verbose: int


def store_option(func: F) -> F:
    """``--store PATH``, defaulting to the user's state directory."""
    return click.option(
        "--store",
        "store_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=f"The SQLite store [default: {default_store_path()}; env CELERY_WARDEN_STORE].",
    )(func)


def resolve_store(path: Path | None) -> Path:
    return path if path is not None else default_store_path()


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """click's FloatRange lets NaN and infinity through; a duration must be finite."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds", ctx, param)
    return value


def seconds_option(
    *names: str,
    default: float | None,
    minimum: float,
    help: str,
) -> Callable[[F], F]:
    """An option in seconds: finite, at least ``minimum``, at most a day."""
    return click.option(
        *names,
        type=click.FloatRange(min=minimum, max=86400.0),
        default=default,
        show_default=default is not None,
        callback=_finite,
        help=help,
    )


# The guard's most used keys as flags (every key is in the config file, docs/configuration.md).
_GUARD_FLAGS = (
    ("--child-soft-mib", "memory.child_soft_mib", "A child over this USS leaves after its task."),
    ("--child-hard-mib", "memory.child_hard_mib", "A child over this USS gets TERM, then KILL."),
    ("--master-budget-mib", "memory.master_budget_mib", "Report a master over this USS."),
    ("--recycle-grace-seconds", "recycle.grace_seconds", "Seconds between TERM and KILL."),
    ("--hang-min-seconds", "hang.min_seconds", "A task running this long at least is hung."),
    ("--orphan-grace-seconds", "orphans.grace_seconds", "Seconds before orphans are reaped."),
)


def guard_options(func: F) -> F:
    """``--config``, ``--print-config`` and the guard's common keys as flags."""
    for flag, key, text in reversed(_GUARD_FLAGS):
        # Read as text: the config's own check says what is wrong ("1GB": the unit is
        # in the flag's name) in the same words as for the file.
        func = click.option(flag, key.replace(".", "__"), default=None, help=text)(func)
    func = click.option(
        "--print-config",
        is_flag=True,
        help="Print the effective guard configuration as TOML and exit.",
    )(func)
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="The guard's TOML config [env CELERY_WARDEN_CONFIG] (docs/configuration.md).",
    )(func)


def guard_overrides(params: dict[str, Any]) -> dict[str, object]:
    """The dotted config keys the flags in ``params`` set (None: not given)."""
    overrides: dict[str, object] = {}
    for _flag, key, _text in _GUARD_FLAGS:
        value = params.pop(key.replace(".", "__"), None)
        if value is not None:
            overrides[key] = _number(value)
    return overrides


def _number(text: str) -> object:
    """A flag's number, or its text as given when it is none (the config refuses it)."""
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value
