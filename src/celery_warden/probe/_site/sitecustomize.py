"""Loaded by Python at start-up in processes that ``celery-warden run`` starts.

It attaches the probe (only in a Celery worker), then hands over to any
``sitecustomize`` the environment had before, so user customisations still run.
A failure prints one line and never stops the worker.

The probe is loaded from the warden's own copy of the package (``$CELERY_WARDEN_PACKAGE``)
without putting the warden's site-packages on the worker's path: the worker may live in
another virtualenv (celery-warden installed with pipx, say), and the probe must speak
exactly the warden's wire format. The probe needs nothing but the standard library and
the worker's own Celery.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _load_package() -> None:
    package_dir = os.environ.get("CELERY_WARDEN_PACKAGE")
    if not package_dir or "celery_warden" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "celery_warden",
        os.path.join(package_dir, "__init__.py"),
        submodule_search_locations=[package_dir],
    )
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["celery_warden"] = module
    spec.loader.exec_module(module)


def _may_be_a_worker() -> bool:
    """A cheap first look, before anything is imported: Python programs that tasks
    spawn inherit this environment and must not pay for (or see) the probe."""
    if not os.environ.get("CELERY_WARDEN_SOCKET"):
        return False
    argv = getattr(sys, "orig_argv", sys.argv)
    return "worker" in argv and any("celery" in arg for arg in argv[:4])


def _attach() -> None:
    if not _may_be_a_worker():
        return
    try:
        _load_package()
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
