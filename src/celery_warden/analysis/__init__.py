"""Pure analysis: records in, findings out (no I/O, no third-party numerics).

* :func:`assess_memory`: leak, warming up, stable or insufficient data for one
  process's memory series, with the evidence;
* :func:`assess_count_growth`: sustained growth of threads or open files;
* :func:`summarize_tasks`: calls, failures, retries and wall times per task name;
* :class:`AnalysisThresholds`: every threshold, with its unit and default.
"""

from __future__ import annotations

from celery_warden.analysis.growth import COUNT_KINDS, assess_count_growth
from celery_warden.analysis.memory import assess_memory
from celery_warden.analysis.tasks import TaskSummary, summarize_tasks
from celery_warden.analysis.thresholds import DEFAULT_THRESHOLDS, AnalysisThresholds

__all__ = [
    "COUNT_KINDS",
    "DEFAULT_THRESHOLDS",
    "AnalysisThresholds",
    "TaskSummary",
    "assess_count_growth",
    "assess_memory",
    "summarize_tasks",
]
