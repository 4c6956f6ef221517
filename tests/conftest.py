"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests._support import reap_tree


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start processes that are reaped, with their whole tree, when the test ends."""
    started: list[subprocess.Popen[bytes]] = []

    def _spawn(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
        started.append(proc)
        return proc

    yield _spawn
    for proc in reversed(started):
        reap_tree(proc)
