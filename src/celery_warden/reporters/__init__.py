"""Reporters render a :class:`~celery_warden.analysis.report.Report`: built from records,
they write with ``render(outfile)`` and read nothing else."""

from __future__ import annotations

from celery_warden.reporters.json import JsonReporter
from celery_warden.reporters.text import TextReporter

__all__ = ["JsonReporter", "TextReporter"]
