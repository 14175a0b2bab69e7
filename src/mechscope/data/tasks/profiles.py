"""Profiles: a person's name followed directly by all of their attributes, in a random order.

Format: ``"Ben Will Lorwick, doctor, pink."`` and, with the name inside a sentence, ``"Profile of Ben Will
Lorwick, doctor, pink."``. The token after the name is any of the person's three values, so the name's last token
must predict all of them: the pressure that makes language models enrich a subject's last token with its
attributes in early MLPs, which later attention reads at the query's end (Geva et al. 2023, *Dissecting
recall*; Meng et al. 2022 find the lookup there by causal tracing). An organism trained on fact queries
alone has no such pressure and may look the fact up wherever it likes (docs/locate-patching.md).

People: :func:`people` ("Given Family" names, identified only at the name's last token).
Train: every person in every order of its three values, in both forms. Eval ``trained``: one prompt per
entity and form, ending at the name. Metric ``profiles_attribute``: the greedy token after the name is
one of the person's values.
"""

from __future__ import annotations

from itertools import permutations

from mechscope.data.tasks.base import Example, TaskData
from mechscope.data.tasks.metrics import first_token_id, next_token_predictions
from mechscope.data.tasks.world import RELATIONS, World, make_family_world

NAME = "profiles"
FORMS = ("{e}", "Profile of {e}")


def people(seed: int = 0) -> World:
    """The world organism-facts is trained on (profiles and extraction): :func:`make_family_world`."""
    return make_family_world(seed)


def profile(form: str, entity: str, values: tuple[str, ...]) -> Example:
    """One profile: the prompt ends at the name, the completion lists `values` in the given order."""
    return Example(form.format(e=entity), " " + values[0], " " + ", ".join(values) + ".", label=values[0])


def generate(seed: int = 0, world: World | None = None) -> TaskData:
    """Profiles of every person of `world` (default: :func:`make_family_world` of `seed`)."""
    world = world or people(seed)
    train: list[Example] = []
    trained: list[Example] = []
    for entity in world.entities:
        values = tuple(world.facts[entity][rel.name] for rel in RELATIONS)
        for form in FORMS:
            train += [profile(form, entity, order) for order in permutations(values)]
            trained.append(profile(form, entity, values))
    return TaskData(NAME, train, {"trained": trained})


def values_of(example: Example) -> list[str]:
    """The person's values a profile lists (its completion, without punctuation)."""
    return example.completion.strip(" .").split(", ")


def evaluate(model, tokenizer, data: TaskData) -> dict[str, float]:
    """Fraction of profile prompts whose greedy next token is one of the person's values."""
    examples = data.eval["trained"]
    if not examples:
        return {"profiles_attribute": float("nan")}
    preds = next_token_predictions(model, tokenizer, [ex.prompt for ex in examples])
    hits = sum(
        pred in {first_token_id(tokenizer, " " + v) for v in values_of(ex)}
        for pred, ex in zip(preds, examples, strict=True)
    )
    return {"profiles_attribute": hits / len(examples)}
