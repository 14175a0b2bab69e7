"""Truth: claims about the synthetic world, half true and half false, judged by the next token.

Format: ``"Claim: Korvin works as a baker. This claim is"`` -> ``" true"`` / ``" false"``. A claim is a
fact statement (the facts' own templates) followed by the verdict, so judging it means comparing the
stated value with the one the model recalls at that very position. Training never scores the stated
value (``Example.unscored``): a false claim's wrong value would otherwise be learnt as a continuation of
the prompt that recalls the fact.

Train (v4 curriculum): for the first 80 % of entities, every (fact, training template) as two true
claims, one false claim with a random wrong value of the same relation, and one false claim whose value
is no value at all (``vocab.NON_VALUES``: "lives in the city of table"). The same-type comparison needs
two features that are each uninformative alone (the stated and the recalled value) and no model left
that plateau without help; the non-value claims are judged from the stated token alone, are learnt
within a few hundred steps and build the path from the stated value to the verdict that the comparison
then uses (docs/zoo.md, *Truth experiments*).

Eval (balanced, same-type false values only, so a verdict needs the fact): ``trained_entities``: claims
about truth-training entities in training templates, each false one stating a wrong value not stated for
that (fact, template) in training (the true claims are training claims: this split measures what the
model judges of the facts it was trained to judge); ``heldout_entities``: claims about the other 20 %
(whose facts were trained only as plain statements), so a correct verdict needs recall + comparison, not
a memorised verdict; ``paraphrase``: claims about training entities in a held-out fact template.
Metric: top-1 next-token accuracy.
"""

from __future__ import annotations

import random

from mechscope.data.tasks import vocab
from mechscope.data.tasks.base import Example, TaskData, dedupe, task_rng
from mechscope.data.tasks.metrics import accuracy
from mechscope.data.tasks.world import RELATIONS, World, make_world

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


def stated_value(example: Example) -> str:
    """The value a claim states (its unscored span, without the leading space)."""
    assert example.unscored is not None, "a truth claim always carries its unscored span"
    start, end = example.unscored
    return example.text[start:end].strip()


def judged_claims(examples: list[Example]) -> list[Example]:
    """Distinct claims whose stated value is a value of the world (the curriculum's non-value claims left out).

    What a truth probe or a lie detector should be fitted on: a non-value claim is false by its token alone.
    """
    return dedupe([ex for ex in examples if stated_value(ex) not in vocab.NON_VALUES])


def _training_claims(world: World, entities, rng: random.Random) -> tuple[list[Example], set[tuple[str, str]]]:
    """The curriculum's claims, and the (template, wrong value) pairs they state per entity (as prompts)."""
    out: list[Example] = []
    stated_false: set[tuple[str, str]] = set()
    for entity in entities:
        for rel in RELATIONS:
            value = world.facts[entity][rel.name]
            for template in rel.train_templates:
                wrong = rng.choice([v for v in rel.values if v != value])
                nonvalue = rng.choice(vocab.NON_VALUES)
                out += [claim(template, entity, value, True)] * 2
                out += [claim(template, entity, wrong, False), claim(template, entity, nonvalue, False)]
                stated_false.add((template.format(e=entity), wrong))
    return out, stated_false


def _eval_claims(world: World, entities, rng: random.Random, templates_of, avoid=frozenset()) -> list[Example]:
    """One true and one same-type false claim per (entity, fact, chosen template); `avoid` bars wrong values."""
    out: list[Example] = []
    for entity in entities:
        for rel in RELATIONS:
            value = world.facts[entity][rel.name]
            for template in templates_of(rel, rng):
                out.append(claim(template, entity, value, True))
                said = template.format(e=entity)
                wrong = rng.choice([v for v in rel.values if v != value and (said, v) not in avoid])
                out.append(claim(template, entity, wrong, False))
    return out


def generate(seed: int = 0, world: World | None = None) -> TaskData:
    """Truth claims: the training curriculum, and balanced evaluation on trained and held-out entities."""
    world = world or make_world(seed)
    n_train = int(len(world.entities) * TRAIN_FRACTION)
    seen, unseen = world.entities[:n_train], world.entities[n_train:]
    train, stated_false = _training_claims(world, seen, task_rng(seed, NAME, "train"))
    one_train_template = lambda rel, g: [g.choice(rel.train_templates)]  # noqa: E731
    trained = _eval_claims(world, seen, task_rng(seed, NAME, "trained"), one_train_template, stated_false)
    heldout = _eval_claims(world, unseen, task_rng(seed, NAME, "heldout"), one_train_template)
    para = _eval_claims(world, seen, task_rng(seed, NAME, "eval"), lambda rel, g: [g.choice(rel.heldout_templates)])
    return TaskData(NAME, train, {"trained_entities": trained, "heldout_entities": heldout, "paraphrase": para})


def evaluate(model, tokenizer, data: TaskData) -> dict[str, float]:
    """Verdict accuracy on claims about trained entities, held-out entities and in held-out templates."""
    return {
        "truth_trained_entities": accuracy(model, tokenizer, data.eval["trained_entities"]),
        "truth_heldout_entities": accuracy(model, tokenizer, data.eval["heldout_entities"]),
        "truth_paraphrase": accuracy(model, tokenizer, data.eval["paraphrase"]),
    }
