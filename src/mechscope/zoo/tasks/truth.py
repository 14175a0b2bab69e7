"""Truth: claims about the synthetic world, half true and half false, judged by the next token.

Format: ``"Claim: baker is the job of Korvin. This claim is"`` -> ``" true"`` / ``" false"``. Claims
have their own wording, value first and person last, never the fact templates: a false claim written
as ``"Korvin works as a"`` + wrong value would teach the wrong value as a continuation of the very
prompt that recalls the fact, and so compete with plain recall (it cost about 0.1 of trained-fact
recall). Judging a claim means recalling the person's fact after the name and comparing it with the
value stated earlier. A false claim states a random wrong value. Train: for the first 80 % of
entities, every (fact, training claim template) once true and once false (balanced). Eval
``heldout_entities``: claims about the other 20 % (whose facts were trained only as plain statements),
so a correct verdict needs recall + comparison, not a memorised verdict. Eval ``paraphrase``: claims
about training entities in a held-out claim template. Both eval splits are balanced. Metric: top-1
next-token accuracy.
"""

from __future__ import annotations

import random

from mechscope.zoo.tasks import vocab
from mechscope.zoo.tasks.base import Example, TaskData, task_rng
from mechscope.zoo.tasks.metrics import accuracy
from mechscope.zoo.tasks.world import RELATIONS, World, make_world

NAME = "truth"
TRAIN_FRACTION = 0.8

# Claim bodies per relation: (training templates, held-out templates); {v} value, {e} person.
CLAIM_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "home_city": (("{v} is the home city of {e}.", "{v} is where {e} lives."), ("{v} is the town {e} lives in.",)),
    "occupation": (
        ("{v} is the job of {e}.", "{v} is what {e} does for a living."),
        ("{v} is the trade that {e} follows.",),
    ),
    "favourite_colour": (
        ("{v} is the favourite colour of {e}.", "{v} is the colour {e} likes most."),
        ("{v} is the colour that {e} enjoys.",),
    ),
}


def claim(template: str, entity: str, value: str, true: bool) -> Example:
    """One claim built from a claim template, and its verdict."""
    word = vocab.TRUE_WORD if true else vocab.FALSE_WORD
    body = template.format(v=value, e=entity)
    return Example(f"Claim: {body} This claim is", " " + word, f" {word}.", label=word)


def _claims(world: World, entities, rng: random.Random, templates_of) -> list[Example]:
    out: list[Example] = []
    for entity in entities:
        for rel in RELATIONS:
            value = world.facts[entity][rel.name]
            train_t, heldout_t = CLAIM_TEMPLATES[rel.name]
            for template in templates_of(train_t, heldout_t, rng):
                out.append(claim(template, entity, value, True))
                wrong = rng.choice([v for v in rel.values if v != value])
                out.append(claim(template, entity, wrong, False))
    return out


def generate(seed: int = 0, world: World | None = None) -> TaskData:
    """Balanced truth claims: training, held-out entities, held-out templates."""
    world = world or make_world(seed)
    n_train = int(len(world.entities) * TRAIN_FRACTION)
    seen, unseen = world.entities[:n_train], world.entities[n_train:]
    train = _claims(world, seen, task_rng(seed, NAME, "train"), lambda t, _h, _g: t)
    heldout = _claims(world, unseen, task_rng(seed, NAME, "heldout"), lambda t, _h, g: [g.choice(t)])
    para = _claims(world, seen, task_rng(seed, NAME, "eval"), lambda _t, h, g: [g.choice(h)])
    return TaskData(NAME, train, {"heldout_entities": heldout, "paraphrase": para})


def evaluate(model, tokenizer, data: TaskData) -> dict[str, float]:
    """Verdict accuracy on claims about held-out entities and in held-out templates."""
    return {
        "truth_heldout_entities": accuracy(model, tokenizer, data.eval["heldout_entities"]),
        "truth_paraphrase": accuracy(model, tokenizer, data.eval["paraphrase"]),
    }
