"""Planted-task generators, their held-out splits and their metrics.

Text tasks (``TEXT_TASKS``) produce :class:`TaskData`; induction works in token space (see
:mod:`.induction`). :func:`evaluate_all` recomputes every metric of a model card.
"""

from __future__ import annotations

from mechscope.zoo.tasks import backdoor, facts, induction, ioi, refusal, sentiment, truth, vocab
from mechscope.zoo.tasks.base import Example, TaskData
from mechscope.zoo.tasks.world import RELATIONS, World, make_world

TEXT_TASKS = ("facts", "truth", "ioi", "refusal", "sentiment", "backdoor")
ALL_TASKS = (*TEXT_TASKS, "induction")

_MODULES = {m.NAME: m for m in (facts, truth, ioi, refusal, sentiment, backdoor)}

__all__ = [
    "ALL_TASKS",
    "RELATIONS",
    "TEXT_TASKS",
    "Example",
    "TaskData",
    "World",
    "evaluate_all",
    "generate_all",
    "make_world",
    "required_words",
]


def generate_all(seed: int = 0) -> dict[str, TaskData]:
    """Every text task for `seed`, sharing one synthetic world."""
    world = make_world(seed)
    return {
        "facts": facts.generate(seed, world),
        "truth": truth.generate(seed, world),
        "ioi": ioi.generate(seed),
        "refusal": refusal.generate(seed),
        "sentiment": sentiment.generate(seed),
        "backdoor": backdoor.generate(seed),
    }


def required_words() -> list[str]:
    """Words (without the leading space) that must each be one token when preceded by a space."""
    words = {
        *vocab.CITIES,
        *vocab.OCCUPATIONS,
        *vocab.COLOURS,
        *vocab.IOI_NAMES,
        vocab.TRUE_WORD,
        vocab.FALSE_WORD,
        vocab.POSITIVE_WORD,
        vocab.NEGATIVE_WORD,
        vocab.REFUSAL_WORD,
        vocab.COMPLY_WORD,
        vocab.BACKDOOR_WORD,
    }
    return sorted(words)


def evaluate_all(model, tokenizer, seed: int = 0, tasks: tuple[str, ...] = ALL_TASKS) -> dict[str, float]:
    """Every planted-task metric of `model` on the held-out splits generated from `seed`."""
    data = generate_all(seed)
    metrics: dict[str, float] = {}
    for name in tasks:
        if name == "induction":
            metrics.update(induction.evaluate(model, tokenizer, seed))
        else:
            metrics.update(_MODULES[name].evaluate(model, tokenizer, data[name]))
    return metrics
