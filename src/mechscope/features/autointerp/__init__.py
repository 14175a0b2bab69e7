"""Automated descriptions of SAE features with detection and causal scores.

:func:`describe_features` runs, per feature: examples (held-out splits) -> an explainer's description ->
detection score by a judge -> causal score against a random-feature control, and returns one record per
feature (also written into feature cards for the dashboard). Explainers and judges are pluggable
(:mod:`~mechscope.features.autointerp.explainers`, :mod:`~mechscope.features.autointerp.scoring`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechscope.features.autointerp.examples import Context, FeatureExamples, feature_examples
from mechscope.features.autointerp.explainers import (
    ChatExplainer,
    Explainer,
    ExplainerError,
    Explanation,
    OpenAIChat,
    TokenStatsExplainer,
    TransformersChat,
)
from mechscope.features.autointerp.scoring import (
    ChatJudge,
    Judge,
    KeywordJudge,
    auroc,
    causal_score,
    detection_score,
)
from mechscope.features.cards import FeatureCards
from mechscope.features.sae import SparseAutoencoder

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


def describe_features(
    model: HookedModel,
    sae: SparseAutoencoder,
    rows: Tensor,
    features: Sequence[int],
    *,
    explainer: Explainer | None = None,
    judge: Judge | None = None,
    causal_rows: int = 16,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Description, detection AUROC, causal score and its random-feature control for each feature.

    The clamp value is twice the feature's largest activation in the examples (silent features get no
    causal score). `rows` ``[rows, seq_len]`` supply the examples; the first `causal_rows` also serve as
    the contexts of the causal measurement."""
    explainer = explainer or TokenStatsExplainer()
    judge = judge or KeywordJudge()
    examples = feature_examples(model, sae, rows, list(features), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for ex in examples:
        explanation = explainer.explain(ex)
        detection = detection_score(explanation, ex.held_out, ex.negatives, judge)
        peak = max((c.activation for c in ex.explain), default=0.0)
        causal = control = float("nan")
        if peak > 0 and explanation.predicted:
            value = 2 * peak
            causal = causal_score(model, sae, ex.feature, explanation.predicted, rows[:causal_rows], value=value)
            other = int(torch.randint(0, sae.config.d_sae - 1, (1,), generator=gen))
            other += int(other >= ex.feature)
            control = causal_score(model, sae, other, explanation.predicted, rows[:causal_rows], value=value)
        out.append(
            {
                "feature": ex.feature,
                "description": explanation.text,
                "predicted": explanation.predicted,
                "detection": detection,
                "causal": causal,
                "causal_control": control,
            }
        )
    return out


def annotate_cards(cards: FeatureCards, records: Sequence[dict[str, Any]]) -> FeatureCards:
    """`cards` with the descriptions and scores of `records` (from :func:`describe_features`)."""
    by_feature = {r["feature"]: r for r in records}
    annotated = []
    for card in cards:
        r = by_feature.get(card.feature)
        if r is None:
            annotated.append(card)
            continue
        scores = {k: float(r[k]) for k in ("detection", "causal", "causal_control") if r[k] == r[k]}  # no NaN
        annotated.append(replace(card, description=r["description"], scores=scores))
    return FeatureCards(annotated, cards.site, cards.model)


__all__ = [
    "ChatExplainer",
    "ChatJudge",
    "Context",
    "Explainer",
    "ExplainerError",
    "Explanation",
    "FeatureExamples",
    "Judge",
    "KeywordJudge",
    "OpenAIChat",
    "TokenStatsExplainer",
    "TransformersChat",
    "annotate_cards",
    "auroc",
    "causal_score",
    "describe_features",
    "detection_score",
    "feature_examples",
]
