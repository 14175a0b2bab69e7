"""``mechscope zoo eval``: recompute an organism's planted-task metrics and compare with its card."""

from __future__ import annotations

import json
from pathlib import Path

from mechscope.data.tasks import ALL_TASKS, evaluate_all
from mechscope.zoo.card import METRICS_FILE
from mechscope.zoo.cards import refresh_folder_card
from mechscope.zoo.organisms import RECIPES

TOLERANCE = 0.02  # CPU thread counts and BLAS builds can flip a few near-tied argmaxes


def tasks_for(folder: Path) -> tuple[str, ...]:
    """The tasks an organism is evaluated on (its recipe's; all tasks for unknown folders)."""
    from mechscope.zoo import liar

    recipe = RECIPES.get(Path(folder).name)
    if recipe is None and Path(folder).name == liar.NAME:
        return liar.EVAL_TASKS
    return recipe.eval_tasks if recipe else ALL_TASKS


def evaluate_folder(folder: Path, seed: int = 0) -> dict[str, float]:
    """Every metric of the organism (or organism variant) in `folder` (verified before loading)."""
    import torch

    from mechscope.model.sources.names import VARIANT_FILE
    from mechscope.zoo import liar
    from mechscope.zoo.loading import load_organism

    folder = Path(folder)
    if (folder / VARIANT_FILE).is_file():  # a shipped variant: its base with the delta applied
        from mechscope.model.loading import load_model
        from mechscope.zoo.variants import get_variant, variant_metrics

        return variant_metrics(load_model(folder.name), get_variant(folder.name), seed)
    model, tokenizer = load_organism(folder)
    extra = liar.liar_metrics(model, tokenizer, seed) if folder.name == liar.NAME else {}
    with torch.no_grad():
        return {**extra, **evaluate_all(model, tokenizer, seed, tasks_for(folder))}


def recorded_metrics(folder: Path) -> dict[str, float]:
    """The metrics recorded when the organism was trained ({} when none were)."""
    path = Path(folder) / METRICS_FILE
    return json.loads(path.read_text())["metrics"] if path.is_file() else {}


def compare(recorded: dict[str, float], measured: dict[str, float], tolerance: float = TOLERANCE) -> list[str]:
    """Metric names whose recomputed value differs from the recorded one by more than `tolerance`."""
    return [k for k, v in recorded.items() if k in measured and abs(measured[k] - v) > tolerance]


def record_metrics(folder: Path, measured: dict[str, float]) -> None:
    """Replace the recorded metrics of `folder` by `measured` (training record kept); re-render its card.

    For re-measuring shipped weights after an evaluation split changed; the previous values are kept
    under ``"previous_metrics"`` so the change stays visible.
    """
    path = Path(folder) / METRICS_FILE
    record = json.loads(path.read_text())
    if record["metrics"] != measured:
        record["previous_metrics"] = record["metrics"]
    record["metrics"] = dict(measured)
    path.write_text(json.dumps(record, indent=1) + "\n")
    refresh_folder_card(folder)  # also rewrites checksums.json
