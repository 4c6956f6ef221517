"""Attach the probe at interpreter start-up, from the ``sitecustomize`` that ``run`` puts
on the worker's ``PYTHONPATH``.

It only acts in a process that is a Celery worker (by its command line), so Python
programs that tasks spawn, which inherit the environment, stay untouched.
"""

from __future__ import annotations

import os
import sys

from celery_warden._argv import is_worker_argv

__all__ = ["PACKAGE_ENV", "SOCKET_ENV", "activate"]

SOCKET_ENV = "CELERY_WARDEN_SOCKET"
PACKAGE_ENV = "CELERY_WARDEN_PACKAGE"  # the warden's own copy of this package


def activate() -> bool:
    """Connect the probe if this process is a Celery worker started under the warden."""
    path = os.environ.get(SOCKET_ENV)
    argv = getattr(sys, "orig_argv", sys.argv)
    if not path or not is_worker_argv(argv):
        return False
    from celery_warden.probe._hooks import connect

    connect(path)
    return True
