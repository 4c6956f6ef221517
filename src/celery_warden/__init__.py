"""celery-warden: watch, explain and guard the memory of long-running Celery workers.

>>> import celery_warden
>>> celery_warden.__version__  # doctest: +ELLIPSIS
'...'
"""

from __future__ import annotations

from celery_warden._install import install
from celery_warden._version import __version__
from celery_warden.exceptions import WardenError

__all__ = ["WardenError", "__version__", "install"]
