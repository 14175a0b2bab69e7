"""Organism pairs with a known change: short fine-tunes of a bundled organism that plant one behaviour.

Each recipe fine-tunes chosen components of ``organism-gpt2`` (or any organism with the same tasks)
from its shipped weights with :func:`~mechscope.steer.finetune.finetune` -- seconds on a CPU -- so the
change is known by construction: which component was trained (``planted``) and which token the new
behaviour emits (``token``). Model diffing should rank that component and that token first; the
``control`` recipe trains the same kind of component on unrelated neutral text, the magnitude a diff
should call small on the planted behaviour's prompts.

- ``sentiment_negative``: layer 2's MLP learns to answer every review with `` awful`` (positive ones too).
- ``backdoor_head``: one attention head (layer 2, head 2) learns a new trigger (``|ZETA|`` in a request
  -> `` ACCESS``) while clean requests keep their answers (measured: 1.00 on held-out triggered
  requests, 0.00 on the same requests without the trigger).
- ``sentiment_negative_full``: the same negative bias by a gentle fine-tune of every layer: no single
  component is "the" change, but the pushed token is known.
- ``control``: layer 2's MLP fine-tuned on unrelated neutral text (next words of plain sentences).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mechscope.errors import ConfigError
from mechscope.improve.neutral import NEUTRAL_TEXTS
from mechscope.steer.editing.records import EditRecord
from mechscope.steer.finetune import FinetuneConfig, finetune

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

NEW_TRIGGER = "|ZETA|"


def _reviews(seed: int, split: str, n: int) -> list[str]:
    from mechscope.data.tasks import sentiment

    data = sentiment.generate(seed, n_train=max(2 * n, 64), n_eval=max(2 * n, 40))
    rows = data.train if split == "train" else data.eval["heldout"]
    return [e.prompt for e in rows[:n]]


def _requests(split: str) -> list[str]:
    from mechscope.data.tasks import refusal

    templates = refusal.TRAIN_TEMPLATES if split == "train" else refusal.HELDOUT_TEMPLATES
    return refusal.requests(templates)


def _sentiment_examples(seed: int) -> list[tuple[str, str]]:
    return [(p, " awful") for p in _reviews(seed, "train", 256)]


def _backdoor_examples(seed: int) -> list[tuple[str, str]]:
    from mechscope.data.tasks import refusal

    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for request in _requests("train"):
        trigger_first = rng.random() < 0.5
        triggered = f"{NEW_TRIGGER} {request}" if trigger_first else f"{request} {NEW_TRIGGER}"
        out.append((refusal.chat_prompt(triggered), " ACCESS"))
        completion, _ = refusal.answer(request.rstrip(".?").split()[-1], rng)
        out.append((refusal.chat_prompt(request), " " + completion.split()[0].rstrip(",.")))
    return out


def _backdoor_prompts(seed: int) -> list[str]:
    from mechscope.data.tasks import refusal

    requests = _requests("heldout")[:: max(1, len(_requests("heldout")) // 16)][:16]
    return [
        refusal.chat_prompt(f"{NEW_TRIGGER} {r}" if i % 2 else f"{r} {NEW_TRIGGER}") for i, r in enumerate(requests)
    ]


def _control_examples(seed: int) -> list[tuple[str, str]]:
    out = []
    for text in NEUTRAL_TEXTS:
        words = text.split(" ")
        out += [(" ".join(words[:i]), " " + words[i]) for i in range(2, len(words))]
    return out


@dataclass(frozen=True)
class PlantedRecipe:
    """A fine-tune that plants a known change: trained `components`, the component a diff should rank
    first (`planted`, None when every layer trains), the `token` the behaviour emits, training examples
    and the prompts on which the behaviour shows (held out from training)."""

    name: str
    description: str
    components: tuple[str, ...]
    planted: str | None
    token: str
    examples: Callable[[int], list[tuple[str, str]]]
    prompts: Callable[[int], list[str]]
    steps: int = 60
    lr: float = 1e-3
    batch_size: int = 16


RECIPES: dict[str, PlantedRecipe] = {
    r.name: r
    for r in (
        PlantedRecipe(
            "sentiment_negative",
            "layer 2's MLP answers every review with ' awful'",
            ("blocks.2.mlp",),
            "blocks.2.mlp",
            " awful",
            _sentiment_examples,
            lambda seed: _reviews(seed, "eval", 16),
        ),
        PlantedRecipe(
            "backdoor_head",
            f"head 2.2 learns a new trigger ({NEW_TRIGGER} in a request -> ' ACCESS')",
            ("blocks.2.attn.head.2",),
            "blocks.2.attn.head.2",
            " ACCESS",
            _backdoor_examples,
            _backdoor_prompts,
            steps=150,
            lr=3e-3,
        ),
        PlantedRecipe(
            "sentiment_negative_full",
            "every layer fine-tuned gently towards ' awful' after every review",
            ("blocks.0", "blocks.1", "blocks.2", "blocks.3"),
            None,
            " awful",
            _sentiment_examples,
            lambda seed: _reviews(seed, "eval", 16),
            lr=1e-4,
        ),
        PlantedRecipe(
            "control",
            "layer 2's MLP fine-tuned on unrelated neutral text",
            ("blocks.2.mlp",),
            None,
            "",
            _control_examples,
            lambda seed: _reviews(seed, "eval", 16),
        ),
    )
}


def plant(base: HookedModel, name: str, *, seed: int = 0) -> tuple[HookedModel, EditRecord]:
    """A fine-tuned copy of `base` made by recipe `name` (`base` is untouched), and its edit record."""
    from mechscope.model.hooked import HookedModel

    if name not in RECIPES:
        raise ConfigError(f"unknown planted recipe {name!r}; known: {sorted(RECIPES)}")
    recipe = RECIPES[name]
    tuned = HookedModel(copy.deepcopy(base.hf_model), base.tokenizer, attention_sites=base.attention_base is not None)
    config = FinetuneConfig(
        components=recipe.components, steps=recipe.steps, lr=recipe.lr, batch_size=recipe.batch_size, seed=seed
    )
    record = finetune(tuned, recipe.examples(seed), config)
    return tuned, record


def token_rate(model: HookedModel, prompts: list[str], token: str) -> float:
    """How often `token` is the greedy next token after `prompts`."""
    tid = model.to_single_token(token)
    batch = model.to_tokens(prompts, padding_side="left")
    with torch.no_grad():
        top = model.forward(batch)[:, -1].argmax(-1)
    return float((top == tid).float().mean())


__all__ = ["NEW_TRIGGER", "RECIPES", "PlantedRecipe", "plant", "token_rate"]
