"""Feature cards in the JSON shape Neuronpedia-style tools read (feature dashboards, upload batches).

One JSON file per batch of features (``batch-0.json``, ...) holding a list of features, each with the
fields those tools use, written from what is in a :class:`~mechscope.features.cards.FeatureCard`:

==================================  ==================================================================
field                               meaning
==================================  ==================================================================
``feature_index``                   the feature's index in the SAE
``modelId``, ``layer``              the model id and the SAE's id (``"15-res"`` style, given by the user)
``frac_nonzero``                    fraction of tokens where the feature fires (``frequency``)
``pos_str`` / ``pos_values``        tokens the decoder direction promotes through the unembedding, scores
``neg_str`` / ``neg_values``        tokens it suppresses, scores
``freq_hist_data_bar_values``       histogram bin centres of the non-zero activations
``freq_hist_data_bar_heights``      histogram counts
``activations``                     top contexts: ``tokens``, ``values`` (the feature at each token),
                                    ``maxValue``, ``maxValueTokenIndex``
``explanations``                    ``[{"description": ..., "scores": {...}}]`` when described
==================================  ==================================================================

The field names follow the batch files SAEDashboard writes for Neuronpedia as we read them; they were
not validated against Neuronpedia's uploader here (nothing can be uploaded from this machine).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from mechscope.errors import ConfigError
from mechscope.features.cards import FeatureCard, FeatureCards
from mechscope.io import write_text_atomic


def neuronpedia_feature(card: FeatureCard, *, model_id: str, sae_id: str) -> dict[str, Any]:
    """One feature's record (see the module docstring)."""
    edges, counts = card.histogram.get("edges", []), card.histogram.get("counts", [])
    centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    activations = []
    for ctx in card.top_contexts:
        values = list(ctx.get("acts") or [0.0] * len(ctx["tokens"]))
        activations.append(
            {
                "tokens": list(ctx["tokens"]),
                "values": values,
                "maxValue": float(ctx["activation"]),
                "maxValueTokenIndex": int(ctx["active"]),
            }
        )
    record: dict[str, Any] = {
        "modelId": model_id,
        "layer": sae_id,
        "feature_index": card.feature,
        "frac_nonzero": card.frequency,
        "pos_str": [t for t, _ in card.promoted],
        "pos_values": [v for _, v in card.promoted],
        "neg_str": [t for t, _ in card.suppressed],
        "neg_values": [v for _, v in card.suppressed],
        "freq_hist_data_bar_values": centres,
        "freq_hist_data_bar_heights": list(counts),
        "activations": activations,
        "explanations": [{"description": card.description, "scores": card.scores}] if card.description else [],
    }
    return record


def export_neuronpedia(
    cards: FeatureCards, folder: str | Path, *, model_id: str, sae_id: str, batch_size: int = 128
) -> list[Path]:
    """Write `cards` as ``batch-N.json`` files of `batch_size` features in `folder`; returns the paths."""
    if not model_id or not sae_id:
        raise ConfigError(f"expected a model_id and an sae_id (like '15-res'), got {model_id!r}, {sae_id!r}")
    if batch_size < 1:
        raise ConfigError(f"expected batch_size >= 1, got {batch_size}")
    records = [neuronpedia_feature(c, model_id=model_id, sae_id=sae_id) for c in cards]
    folder = Path(folder)
    return [
        write_text_atomic(folder / f"batch-{i // batch_size}.json", json.dumps(records[i : i + batch_size]))
        for i in range(0, len(records), batch_size)
    ]


__all__ = ["export_neuronpedia", "neuronpedia_feature"]
