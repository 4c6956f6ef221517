"""Recognising Celery workers by their command line."""

from __future__ import annotations

import pytest

from celery_warden._argv import is_pool_title, is_worker_argv


@pytest.mark.parametrize(
    "argv",
    [
        ["celery", "-A", "proj", "worker"],
        ["/venv/bin/python3", "/venv/bin/celery", "-A", "proj", "worker", "-c", "4"],
        ["python", "-m", "celery", "-A", "proj", "worker"],
        ["/usr/bin/celery", "worker", "--app", "proj"],
        ["celery", "--app=proj", "-b", "redis://", "--workdir", "/srv", "worker", "-c", "2"],
        ["[celeryd: w1@host:MainProcess] -active- (worker -A proj)"],
    ],
)
def test_worker_command_lines_are_recognised(argv: list[str]) -> None:
    """Every common way of starting a worker is recognised."""
    assert is_worker_argv(argv)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["celery", "-A", "proj", "beat"],
        ["celery", "-A", "worker", "beat"],
        ["celery", "--app", "worker", "flower"],
        ["celery", "-A", "proj", "inspect", "active", "worker"],
        ["python", "worker.py"],
        ["python", "-m", "celery_warden", "run", "--", "celery", "worker"],
        ["vim", "celery", "worker"],
    ],
)
def test_other_command_lines_are_not_workers(argv: list[str]) -> None:
    """Beat, inspect, look-alike scripts and the warden itself are not workers."""
    assert not is_worker_argv(argv)


def test_a_setproctitle_pool_child_is_a_pool_title() -> None:
    """A setproctitle'd pool child is told apart from its master."""
    assert is_pool_title(["[celeryd: w1@host:ForkPoolWorker-3]"])
    assert not is_pool_title(["[celeryd: w1@host:MainProcess]"])


def test_a_worker_reexecuted_by_sighup_is_still_a_worker() -> None:
    """`python -m celery ... worker` re-execs itself as `python .../celery/__main__.py`
    on SIGHUP; it is still the same worker."""
    argv = ["/venv/bin/python", "/venv/lib/python3.11/site-packages/celery/__main__.py"]
    assert is_worker_argv([*argv, "-A", "proj", "worker", "-c", "2"])
    assert not is_worker_argv([*argv, "-A", "proj", "beat"])
