"""Patching metrics: re-exported from :mod:`mechscope.metrics`, where they live (imports keep working).

Every metric scores each row's last real token by default (from the attention mask), or a position
named per row; see :mod:`mechscope.metrics`.
"""

from __future__ import annotations

from mechscope.metrics import (
    Metric,
    MetricError,
    Position,
    kl_div,
    kl_to_reference,
    last_positions,
    logit_diff,
    logit_diff_metric,
    logit_metric,
    logits_at,
    normalised,
    resolve_positions,
    score,
    score_rows,
    scoring,
    token_logit,
    token_prob,
    token_prob_metric,
)

__all__ = [
    "Metric",
    "MetricError",
    "Position",
    "kl_div",
    "kl_to_reference",
    "last_positions",
    "logit_diff",
    "logit_diff_metric",
    "logit_metric",
    "logits_at",
    "normalised",
    "resolve_positions",
    "score",
    "score_rows",
    "scoring",
    "token_logit",
    "token_prob",
    "token_prob_metric",
]
