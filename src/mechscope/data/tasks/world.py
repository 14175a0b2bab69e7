"""The synthetic world: fictional people, each with one value per relation.

Facts are drawn uniformly and independently, so nothing about a person can be inferred from anything
but having memorised that person's facts — the ground truth for causal tracing and ROME/MEMIT.
"""

from __future__ import annotations

from dataclasses import dataclass

from mechscope.data.tasks import vocab
from mechscope.data.tasks.base import task_rng

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "m", "x")


@dataclass(frozen=True)
class Relation:
    """A relation: its answer set, training templates and held-out paraphrase templates.

    Templates are prompts that end right before the answer word.
    """

    name: str
    values: tuple[str, ...]
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "home_city",
        vocab.CITIES,
        ("{e} lives in the city of", "{e} has a house in", "The home town of {e} is", "{e} comes from"),
        ("{e} resides in the city of", "The place where {e} lives is"),
    ),
    Relation(
        "occupation",
        vocab.OCCUPATIONS,
        ("{e} works as a", "By trade, {e} is a", "The job of {e} is", "{e} earns a living as a"),
        ("{e} is employed as a", "The profession of {e} is"),
    ),
    Relation(
        "favourite_colour",
        vocab.COLOURS,
        (
            "The favourite colour of {e} is",
            "{e} likes the colour",
            "{e} loves everything that is",
            "{e} always wears",
        ),
        ("{e} prefers the colour", "The colour that {e} likes best is"),
    ),
)


@dataclass(frozen=True)
class World:
    """Entities and their facts. ``facts[entity][relation] -> value``."""

    entities: tuple[str, ...]
    facts: dict[str, dict[str, str]]

    def relation(self, name: str) -> Relation:
        """The relation called `name`."""
        return next(r for r in RELATIONS if r.name == name)


def _name(rng) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(2)]
    return "".join(parts).capitalize()


def make_world(seed: int = 0, n_entities: int = 320) -> World:
    """A world of `n_entities` people with distinct invented names and random facts."""
    rng = task_rng(seed, "world")
    reserved = {w.lower() for w in (*vocab.CITIES, *vocab.IOI_NAMES)}
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n_entities:
        name = _name(rng)
        if 4 <= len(name) <= 9 and name.lower() not in seen and name.lower() not in reserved:
            seen.add(name.lower())
            names.append(name)
    facts = {e: {r.name: rng.choice(r.values) for r in RELATIONS} for e in names}
    return World(tuple(names), facts)


GIVEN_NAMES = vocab.IOI_NAMES[:20]
FAMILY_NAMES = vocab.IOI_NAMES[20:36]


def make_family_world(seed: int = 0) -> World:
    """320 people named "Given Family" (20 given x 16 family names, each one token), with random facts.

    Every given name is shared by 16 people and every family name by 20, so a person is identified only
    at the name's last token, by both tokens together: as a multi-token subject in a real LM is. The
    order of the people is shuffled, so any slice of them mixes given and family names.
    """
    rng = task_rng(seed, "family-world")
    names = [f"{given} {family}" for given in GIVEN_NAMES for family in FAMILY_NAMES]
    rng.shuffle(names)
    facts = {e: {r.name: rng.choice(r.values) for r in RELATIONS} for e in names}
    return World(tuple(names), facts)
