"""Recognise a Celery worker by its command line (pure: used by the warden and the probe).

Forms seen in the wild: ``celery -A proj worker``, ``/venv/bin/celery worker -A proj``,
``python -m celery -A proj worker``, ``python3.12 /venv/bin/celery ... worker`` (a
shebang run explicitly), and, with setproctitle installed, ``[celeryd: w1@host:MainProcess]``
or ``[celeryd: w1@host:ForkPoolWorker-3]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["is_pool_title", "is_worker_argv"]

_PROCTITLE_PREFIX = "[celeryd:"
_OPTIONS_WITH_VALUE = {"-X", "-W", "-Q"}  # interpreter options that take a value
# celery's global options that take a value (`--app=proj` needs no entry)
_CELERY_OPTIONS_WITH_VALUE = {
    "-A",
    "--app",
    "-b",
    "--broker",
    "--result-backend",
    "--loader",
    "--config",
    "--workdir",
}


def _celery_program_index(argv: Sequence[str]) -> int | None:
    """Index of the argument that names the celery program, if any.

    Either the program itself is ``celery``, or a Python interpreter runs the ``celery``
    script or ``-m celery`` (after interpreter options such as ``-u`` or ``-X dev``).
    """
    if not argv:
        return None
    if os.path.basename(argv[0]) == "celery":
        return 0
    if not os.path.basename(argv[0]).startswith("python"):
        return None
    i = 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-m":
        i += 2 if argv[i] in _OPTIONS_WITH_VALUE else 1
    if i + 1 < len(argv) and argv[i] == "-m" and argv[i + 1] == "celery":
        return i + 1
    if i < len(argv) and os.path.basename(argv[i]) == "celery":
        return i
    # `python -m celery` re-execs itself on SIGHUP as `python .../celery/__main__.py`.
    if i < len(argv) and argv[i].replace(os.sep, "/").endswith("celery/__main__.py"):
        return i
    return None


def is_worker_argv(argv: Sequence[str]) -> bool:
    """True when ``argv`` starts a Celery worker (not beat, flower, a shell...).

    >>> is_worker_argv(["celery", "-A", "proj", "worker", "-c", "2"])
    True
    >>> is_worker_argv(["python", "-m", "celery", "-A", "proj", "beat"])
    False
    """
    if argv and argv[0].startswith(_PROCTITLE_PREFIX):
        return True
    index = _celery_program_index(argv)
    if index is None:
        return False
    # The sub-command is the first bare word after the program's own options; the
    # values of those options are bare words too (`celery -A worker beat`, with an app
    # module named `worker`), so they are skipped.
    rest = iter(argv[index + 1 :])
    for word in rest:
        if word in _CELERY_OPTIONS_WITH_VALUE:
            next(rest, None)
        elif not word.startswith("-"):
            return word == "worker"
    return False


def is_pool_title(argv: Sequence[str]) -> bool:
    """True for a setproctitle'd pool process (``[celeryd: ...:ForkPoolWorker-N]``)."""
    return bool(argv) and argv[0].startswith(_PROCTITLE_PREFIX) and "PoolWorker" in argv[0]
