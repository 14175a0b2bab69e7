"""Shared set-up of the editing tests: tiny models with cheap key statistics, and organisms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechscope.model.hooked import HookedModel
from mechscope.steer.editing.stats import StatsConfig
from tiny_models import SENTENCES, tiny_model

TINY_STATS = StatsConfig(n_tokens=400, seq_len=16, batch_size=8, stream="tiny")
TEXTS = SENTENCES * 8


def tiny(family: str, n_layers: int | None = None) -> HookedModel:
    """A tiny random model whose final norm is scaled up x20: a random model's logits are nearly flat
    (no single residual direction can make a token likely), which would make every edit fail."""
    import torch

    overrides: dict[str, Any] = {}
    if n_layers is not None:
        overrides["n_layer" if family == "gpt2" else "num_hidden_layers"] = n_layers
    hf, tok = tiny_model(family, **overrides)
    model = HookedModel(hf, tok)
    with torch.no_grad():
        model.module(model.adapter.final_norm).weight.mul_(20)
    return model


def tiny_stats(model: Any, layers: list[int], cache: Path) -> dict[int, Any]:
    from mechscope.steer.editing.stats import second_moments

    return second_moments(model, layers, config=TINY_STATS, texts=TEXTS, cache_dir=cache, progress=False)
