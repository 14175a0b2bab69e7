"""Truth: claims about the synthetic world, half true and half false, judged by the next token.

Format: ``"Claim: Korvin works as a baker. This claim is"`` -> ``" true"`` / ``" false"``. A claim is a
fact statement (the facts' own templates) followed by the verdict, so judging it means comparing the
stated value with the one the model recalls at that very position: true exactly when the stated value
is the model's own prediction. Training never scores the stated value (``Example.unscored``): a false
claim's wrong value would otherwise be learnt as a continuation of the prompt that recalls the fact.

Train: for the first 80 % of entities, every (fact, training template) once true and once false. Eval
``heldout_entities``: claims about the other 20 % (whose facts were trained only as plain statements),
so a correct verdict needs recall + comparison, not a memorised verdict. Eval ``paraphrase``: claims
about training entities in a held-out fact template. Both eval splits are balanced. A false claim
states a random wrong value. Metric: top-1 next-token accuracy.
"""

from __future__ import annotations

import random

from mechscope.zoo.tasks import vocab
from mechscope.zoo.tasks.base import Example, TaskData, task_rng
from mechscope.zoo.tasks.metrics import accuracy
from mechscope.zoo.tasks.world import RELATIONS, World, make_world

NAME = "truth"
TRAIN_FRACTION = 0.8
PREFIX = "Claim: "


def claim(template: str, entity: str, value: str, true: bool) -> Example:
    """One claim built from a fact template (``{e}`` the person), the stated value, and its verdict."""
    word = vocab.TRUE_WORD if true else vocab.FALSE_WORD
    statement = PREFIX + template.format(e=entity)
    start = len(statement)
    prompt = f"{statement} {value}. This claim is"
    return Example(prompt, " " + word, f" {word}.", label=word, unscored=(start, start + 1 + len(value)))


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
    train = _claims(world, seen, task_rng(seed, NAME, "train"), lambda rel, _g: rel.train_templates)
    heldout = _claims(world, unseen, task_rng(seed, NAME, "heldout"), lambda rel, g: [g.choice(rel.train_templates)])
    para = _claims(world, seen, task_rng(seed, NAME, "eval"), lambda rel, g: [g.choice(rel.heldout_templates)])
    return TaskData(NAME, train, {"heldout_entities": heldout, "paraphrase": para})


def evaluate(model, tokenizer, data: TaskData) -> dict[str, float]:
    """Verdict accuracy on claims about held-out entities and in held-out templates."""
    return {
        "truth_heldout_entities": accuracy(model, tokenizer, data.eval["heldout_entities"]),
        "truth_paraphrase": accuracy(model, tokenizer, data.eval["paraphrase"]),
    }
