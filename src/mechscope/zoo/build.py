"""End-to-end build of one organism: train (or resume), save into the package, evaluate, write its card."""

from __future__ import annotations

from pathlib import Path

from mechscope.data.tasks import evaluate_all
from mechscope.model.sources.names import MODELS_DIR
from mechscope.zoo.card import METRICS_FILE, refresh_card
from mechscope.zoo.loading import save_organism
from mechscope.zoo.organisms import Recipe
from mechscope.zoo.train import TrainOptions, train


def build_organism(recipe: Recipe, opts: TrainOptions, out: Path | None = None) -> dict:
    """Train `recipe`, save it to `out` (default: the package's models folder); returns metrics + training."""
    import torch

    out = Path(out) if out is not None else MODELS_DIR / recipe.name
    model, tokenizer, training = train(recipe, opts)
    training["parameters"] = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        metrics = evaluate_all(model, tokenizer, recipe.seed, recipe.eval_tasks)
    record = {"schema_version": 1, "metrics": metrics, "training": training}
    save_organism(model, tokenizer, out, {METRICS_FILE: record})
    refresh_card(recipe, out)
    return record
