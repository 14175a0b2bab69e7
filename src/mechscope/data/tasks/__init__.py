"""Planted-task generators, their held-out splits and their metrics.

Text tasks (``TEXT_TASKS``) produce :class:`TaskData`; induction works in token space (see
:mod:`.induction`). :func:`evaluate_all` recomputes every metric of a model card.
"""

from __future__ import annotations

from mechscope.data.tasks import backdoor, extraction, facts, induction, ioi, profiles, refusal, sentiment, truth, vocab
from mechscope.data.tasks.base import Example, TaskData
from mechscope.data.tasks.world import RELATIONS, World, make_world
from mechscope.errors import ConfigError

# the text tasks of the full organisms (and the side tasks an intervention's evaluation checks on them)
TEXT_TASKS = ("facts", "truth", "ioi", "refusal", "sentiment", "backdoor")
# text tasks only a dedicated organism trains on (organism-facts)
DEDICATED_TEXT_TASKS = ("profiles", "extraction")
ALL_TASKS = (*TEXT_TASKS, *DEDICATED_TEXT_TASKS, "induction")

_MODULES = {m.NAME: m for m in (facts, truth, ioi, refusal, sentiment, backdoor, profiles, extraction)}
_WORLD_TASKS = {"facts", "truth"}  # tasks about the synthetic world's people (profiles and extraction: its own)

__all__ = [
    "ALL_TASKS",
    "DEDICATED_TEXT_TASKS",
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


def generate_all(seed: int = 0, tasks: tuple[str, ...] = TEXT_TASKS) -> dict[str, TaskData]:
    """The text `tasks` for `seed` (default: the full organisms'), sharing one synthetic world."""
    unknown = [t for t in tasks if t not in _MODULES]
    if unknown:
        raise ConfigError(f"unknown text tasks {unknown}; known: {sorted(_MODULES)}")
    world = make_world(seed)
    return {name: _generate(name, seed, world) for name in tasks}


def _generate(name: str, seed: int, world: World) -> TaskData:
    module = _MODULES[name]
    return module.generate(seed, world) if name in _WORLD_TASKS else module.generate(seed)


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
    data = generate_all(seed, tuple(t for t in tasks if t != "induction"))
    metrics: dict[str, float] = {}
    for name in tasks:
        if name == "induction":
            metrics.update(induction.evaluate(model, tokenizer, seed))
        else:
            metrics.update(_MODULES[name].evaluate(model, tokenizer, data[name]))
    return metrics
