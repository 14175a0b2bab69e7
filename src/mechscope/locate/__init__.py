"""Localisation methods: verbs that return labelled, savable, plottable results."""

from __future__ import annotations

from mechscope.locate import metrics
from mechscope.locate.lens import LensResult, logit_lens
from mechscope.locate.patching import MetricError, PatchResult, PromptMismatchError, activation_patch
from mechscope.locate.results import Result

__all__ = [
    "LensResult",
    "MetricError",
    "PatchResult",
    "PromptMismatchError",
    "Result",
    "activation_patch",
    "logit_lens",
    "metrics",
]
