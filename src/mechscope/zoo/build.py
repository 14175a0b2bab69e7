"""End-to-end build of one organism: train (or resume), save into the package, evaluate, write its card."""

from __future__ import annotations

from pathlib import Path

from mechscope.zoo.card import render_card, write_card
from mechscope.zoo.evaluate import METRICS_FILE
from mechscope.zoo.loading import save_organism
from mechscope.zoo.organisms import Recipe
from mechscope.zoo.registry import MODELS_DIR
from mechscope.data.tasks import evaluate_all
from mechscope.zoo.train import TrainOptions, train

NOTES_FILE = "NOTES.md"  # hand-written notes beside the weights, copied into the card


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


def refresh_card(recipe: Recipe, folder: Path) -> None:
    """Re-render MODEL_CARD.md from the folder's config, metrics.json and NOTES.md; update checksums."""
    import json

    from mechscope.zoo.loading import write_checksums

    folder = Path(folder)
    record = json.loads((folder / METRICS_FILE).read_text())
    config = json.loads((folder / "config.json").read_text())
    notes_path = folder / NOTES_FILE
    notes = notes_path.read_text() if notes_path.is_file() else ""
    write_card(folder, render_card(recipe, config, record["training"], record["metrics"], notes))
    write_checksums(folder)
