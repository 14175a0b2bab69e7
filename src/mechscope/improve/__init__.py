"""Improve: measure what an intervention did -- its target effect and its side effects."""

from __future__ import annotations

from mechscope.improve.completion import CompletionTask
from mechscope.improve.edit_task import EditTask
from mechscope.improve.harness import EvaluationConfig, EvaluationResult, evaluate
from mechscope.improve.neutral import NEUTRAL_TEXTS
from mechscope.improve.refusal import ChatRefusalTask, PrefixScore, RefusalResult, is_refusal, refusal_rate
from mechscope.improve.task_specs import load_task
from mechscope.improve.tasks import TASKS, RefusalTask, SentimentTask, Task, ZooTask, zoo_metrics

__all__ = [
    "NEUTRAL_TEXTS",
    "TASKS",
    "ChatRefusalTask",
    "CompletionTask",
    "EditTask",
    "EvaluationConfig",
    "EvaluationResult",
    "PrefixScore",
    "RefusalResult",
    "RefusalTask",
    "SentimentTask",
    "Task",
    "ZooTask",
    "evaluate",
    "is_refusal",
    "load_task",
    "refusal_rate",
    "zoo_metrics",
]
