"""Loaded by Python at start-up in processes that ``celery-warden run`` starts.

It attaches the probe (only in a Celery worker), then hands over to any
``sitecustomize`` the environment had before, so user customisations still run.
A failure prints one line and never stops the worker.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _attach() -> None:
    try:
        from celery_warden.probe._boot import activate

        activate()
    except Exception as exc:  # the worker must start whatever happens here
        sys.stderr.write(f"celery-warden: the probe was not attached: {exc}\n")


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_attach()
_chain()
