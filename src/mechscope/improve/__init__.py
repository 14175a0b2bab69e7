"""Improve: measure what an intervention did -- its target effect and its side effects."""

from __future__ import annotations

from mechscope.improve.harness import EvaluationConfig, EvaluationResult, evaluate
from mechscope.improve.neutral import NEUTRAL_TEXTS
from mechscope.improve.tasks import TASKS, RefusalTask, SentimentTask, Task, ZooTask, zoo_metrics

__all__ = [
    "NEUTRAL_TEXTS",
    "TASKS",
    "EvaluationConfig",
    "EvaluationResult",
    "RefusalTask",
    "SentimentTask",
    "Task",
    "ZooTask",
    "evaluate",
    "zoo_metrics",
]
