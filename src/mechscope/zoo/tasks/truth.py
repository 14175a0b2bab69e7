"""Truth: claims about the synthetic world, half true and half false, judged by the next token.

Format: ``"Claim: Korvin works as a baker. This claim is"`` -> ``" true"`` / ``" false"``. A false
claim swaps in a random wrong value. The ``Claim:`` frame keeps false statements from being learnt as
facts in the plain templates. Train: claims about the first 80 % of entities. Eval ``heldout_entities``:
claims about the other 20 % (whose facts were trained only as plain statements), so a correct judgement
needs recall + comparison, not a memorised verdict. Eval ``seen_entities``: fresh claims (not in
training) about training entities. Metric: top-1 next-token accuracy.
"""

from __future__ import annotations

import random

from mechscope.zoo.tasks import vocab
from mechscope.zoo.tasks.base import Example, TaskData, dedupe, task_rng, without_prompts
from mechscope.zoo.tasks.world import RELATIONS, World, make_world

NAME = "truth"
TRAIN_FRACTION = 0.8


def claim(entity: str, relation_index: int, value: str, true: bool) -> Example:
    """One claim and its verdict."""
    statement = RELATIONS[relation_index].statement.format(e=entity, v=value)
    word = vocab.TRUE_WORD if true else vocab.FALSE_WORD
    return Example(f"Claim: {statement} This claim is", " " + word, f" {word}.", label=word)


def _claims(world: World, entities: tuple[str, ...], rng: random.Random, per_fact: int) -> list[Example]:
    out: list[Example] = []
    for entity in entities:
        for i, rel in enumerate(RELATIONS):
            value = world.facts[entity][rel.name]
            for _ in range(per_fact):
                out.append(claim(entity, i, value, True))
                wrong = rng.choice([v for v in rel.values if v != value])
                out.append(claim(entity, i, wrong, False))
    return out


def generate(seed: int = 0, world: World | None = None, per_fact: int = 3) -> TaskData:
    """Truth claims; `per_fact` true and `per_fact` false claims per (entity, relation) in training."""
    world = world or make_world(seed)
    n_train = int(len(world.entities) * TRAIN_FRACTION)
    seen, unseen = world.entities[:n_train], world.entities[n_train:]
    train = dedupe(_claims(world, seen, task_rng(seed, NAME, "train"), per_fact))
    banned = {ex.prompt for ex in train}
    fresh = without_prompts(dedupe(_claims(world, seen, task_rng(seed, NAME, "eval"), 1)), banned)
    heldout = _claims(world, unseen, task_rng(seed, NAME, "heldout"), 1)
    return TaskData(NAME, train, {"heldout_entities": heldout, "seen_entities": fresh[:1000]})


def evaluate(model, tokenizer, data: TaskData) -> dict[str, float]:
    """Verdict accuracy on claims about held-out and about training entities."""
    from mechscope.zoo.tasks.metrics import accuracy

    return {
        "truth_heldout_entities": accuracy(model, tokenizer, data.eval["heldout_entities"]),
        "truth_seen_entities": accuracy(model, tokenizer, data.eval["seen_entities"]),
    }
