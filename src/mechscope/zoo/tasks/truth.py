"""Truth: claims about the synthetic world, half true and half false, judged by the next token.

Format: ``"Claim: Korvin works as a baker. This claim is"`` -> ``" true"`` / ``" false"``. The claim
body is a fact template followed by a value, so the position before the value is exactly where the
model recalls the fact: judging a claim means comparing the recalled value with the stated one. A false
claim states a random wrong value. The ``Claim:`` frame keeps false values from being learnt as facts
in the plain templates. Train: for the first 80 % of entities, every (fact, training template) once
true and once false (balanced). Eval ``heldout_entities``: claims about the other 20 % (whose facts
were trained only as plain statements), so a correct verdict needs recall + comparison, not a memorised
verdict. Eval ``paraphrase``: claims about training entities in held-out templates. Both eval splits
are balanced. Metric: top-1 next-token accuracy.
"""

from __future__ import annotations

import random

from mechscope.zoo.tasks import vocab
from mechscope.zoo.tasks.base import Example, TaskData, task_rng
from mechscope.zoo.tasks.metrics import accuracy
from mechscope.zoo.tasks.world import RELATIONS, World, make_world

NAME = "truth"
TRAIN_FRACTION = 0.8


def claim(template: str, entity: str, value: str, true: bool) -> Example:
    """One claim built from a fact template, and its verdict."""
    word = vocab.TRUE_WORD if true else vocab.FALSE_WORD
    body = f"{template.format(e=entity)} {value}."
    return Example(f"Claim: {body} This claim is", " " + word, f" {word}.", label=word)


def _claims(world: World, entities, rng: random.Random, templates_of) -> list[Example]:
    out: list[Example] = []
    for entity in entities:
        for rel in RELATIONS:
            value = world.facts[entity][rel.name]
            for template in templates_of(rel, rng):
                out.append(claim(template, entity, value, True))
                wrong = rng.choice([v for v in rel.values if v != value])
                out.append(claim(template, entity, wrong, False))
    return out


def generate(seed: int = 0, world: World | None = None) -> TaskData:
    """Balanced truth claims: training, held-out entities, held-out templates."""
    world = world or make_world(seed)
    n_train = int(len(world.entities) * TRAIN_FRACTION)
    seen, unseen = world.entities[:n_train], world.entities[n_train:]
    train = _claims(world, seen, task_rng(seed, NAME, "train"), lambda r, _: r.train_templates)
    heldout = _claims(world, unseen, task_rng(seed, NAME, "heldout"), lambda r, g: [g.choice(r.train_templates)])
    para = _claims(world, seen, task_rng(seed, NAME, "eval"), lambda r, g: [g.choice(r.heldout_templates)])
    return TaskData(NAME, train, {"heldout_entities": heldout, "paraphrase": para})


def evaluate(model, tokenizer, data: TaskData) -> dict[str, float]:
    """Verdict accuracy on claims about held-out entities and in held-out templates."""
    return {
        "truth_heldout_entities": accuracy(model, tokenizer, data.eval["heldout_entities"]),
        "truth_paraphrase": accuracy(model, tokenizer, data.eval["paraphrase"]),
    }
