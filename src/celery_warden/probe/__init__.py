"""The in-worker probe: what runs inside Celery's processes.

It imports nothing heavy and nothing from the warden side but the wire format.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SITE_DIR"]

# The directory `run` prepends to the worker's PYTHONPATH (it holds sitecustomize.py).
SITE_DIR = Path(__file__).parent / "_site"
