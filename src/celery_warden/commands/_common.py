"""Options and helpers the sub-commands share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from celery_warden._config import default_store_path

__all__ = ["Context", "store_option"]

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
