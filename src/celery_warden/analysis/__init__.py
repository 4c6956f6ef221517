"""Pure analysis: records in, findings out (no I/O, no third-party numerics).

* :func:`assess_memory`: leak, warming up, stable or insufficient data for one
  process's memory series, with the evidence;
* :func:`assess_count_growth`: sustained growth of threads or open files;
* :func:`summarize_tasks`: calls, failures, retries, wall and CPU time, and the CPU/IO
  class per task name;
* :func:`attribute_growth`: which task names carry the growth, in bytes kept per call;
* :class:`AnalysisThresholds`: every threshold, with its unit and default.
"""

from __future__ import annotations

from celery_warden.analysis.attribution import TaskAttribution, attribute_growth
from celery_warden.analysis.growth import COUNT_KINDS, assess_count_growth
from celery_warden.analysis.memory import assess_memory
from celery_warden.analysis.tasks import TaskSummary, summarize_tasks
from celery_warden.analysis.thresholds import DEFAULT_THRESHOLDS, AnalysisThresholds

__all__ = [
    "COUNT_KINDS",
    "DEFAULT_THRESHOLDS",
    "AnalysisThresholds",
    "TaskAttribution",
    "TaskSummary",
    "assess_count_growth",
    "assess_memory",
    "attribute_growth",
    "summarize_tasks",
]
