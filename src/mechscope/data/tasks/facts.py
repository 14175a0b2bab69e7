"""Factual recall: every fact of the synthetic world, stated through several templates.

Train: each (entity, relation) stated once with every training template. Eval ``trained``: each fact
queried with one training template (the facts were trained). Eval ``paraphrase``: each fact queried
with a held-out template never seen in training (does recall transfer across phrasings?).
Metric: top-1 next-token accuracy of the answer word.
"""

from __future__ import annotations

from mechscope.data.tasks.base import Example, TaskData, task_rng
from mechscope.data.tasks.world import RELATIONS, World, make_world

NAME = "facts"


def fact_example(template: str, entity: str, value: str) -> Example:
    """One query: the prompt ends before the answer; the completion ends the sentence."""
    return Example(template.format(e=entity), " " + value, " " + value + ".", label=value)


def generate(seed: int = 0, world: World | None = None) -> TaskData:
    """All facts of `world` (default: :func:`make_world` of `seed`) as train text and eval queries."""
    world = world or make_world(seed)
    rng = task_rng(seed, NAME, "eval")
    train: list[Example] = []
    trained: list[Example] = []
    paraphrase: list[Example] = []
    for entity in world.entities:
        for rel in RELATIONS:
            value = world.facts[entity][rel.name]
            train += [fact_example(t, entity, value) for t in rel.train_templates]
            trained.append(fact_example(rng.choice(rel.train_templates), entity, value))
            paraphrase.append(fact_example(rng.choice(rel.heldout_templates), entity, value))
    return TaskData(NAME, train, {"trained": trained, "paraphrase": paraphrase})


def evaluate(model, tokenizer, data: TaskData) -> dict[str, float]:
    """Recall accuracy on trained facts and on held-out paraphrases."""
    from mechscope.data.tasks.metrics import accuracy

    return {
        "facts_trained": accuracy(model, tokenizer, data.eval["trained"]),
        "facts_paraphrase": accuracy(model, tokenizer, data.eval["paraphrase"]),
    }
