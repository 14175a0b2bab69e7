"""Knowledge extraction: fact queries trained for some people, asked about people known only from profiles.

Train: the facts' training templates for the first 75 % of the world's people (``queried``). The other
25 % appear in training only in profiles (:mod:`.profiles`), never in a query, so answering a query about
them needs the value that the name's last token holds for the profile -- the test of whether a model
*extracts* stored knowledge rather than memorising (question, answer) pairs (Allen-Zhu & Li 2023, *Physics
of language models 3.1*). It also pins where the fact is looked up: for those people only the profile's
pathway holds it, which is the subject's last token (``mechscope.locate.causal_tracing``).

Eval: ``queried`` (one training template per fact of a queried person), ``heldout`` (one training template
per fact of a profile-only person), ``heldout_paraphrase`` (a held-out template, profile-only people).
Metric: top-1 next-token accuracy.
"""

from __future__ import annotations

from mechscope.data.tasks.base import Example, TaskData, task_rng
from mechscope.data.tasks.facts import fact_example
from mechscope.data.tasks.metrics import accuracy
from mechscope.data.tasks.profiles import people
from mechscope.data.tasks.world import RELATIONS, World

NAME = "extraction"
QUERIED_FRACTION = 0.75


def split_people(world: World) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(people whose facts are queried in training, people known only from profiles)."""
    n = int(len(world.entities) * QUERIED_FRACTION)
    return world.entities[:n], world.entities[n:]


def generate(seed: int = 0, world: World | None = None) -> TaskData:
    """Training queries about the queried people; evaluation on them and on the profile-only people."""
    world = world or people(seed)
    queried = set(split_people(world)[0])
    rng = task_rng(seed, NAME, "eval")
    train: list[Example] = []
    splits: dict[str, list[Example]] = {"queried": [], "heldout": [], "heldout_paraphrase": []}
    for entity in world.entities:
        for rel in RELATIONS:
            value = world.facts[entity][rel.name]
            query = fact_example(rng.choice(rel.train_templates), entity, value)
            if entity in queried:
                train += [fact_example(t, entity, value) for t in rel.train_templates]
                splits["queried"].append(query)
            else:
                splits["heldout"].append(query)
                splits["heldout_paraphrase"].append(fact_example(rng.choice(rel.heldout_templates), entity, value))
    return TaskData(NAME, train, splits)


def evaluate(model, tokenizer, data: TaskData) -> dict[str, float]:
    """Recall accuracy for queried people, and for profile-only people (training and held-out templates)."""
    return {
        "extraction_queried": accuracy(model, tokenizer, data.eval["queried"]),
        "extraction_heldout": accuracy(model, tokenizer, data.eval["heldout"]),
        "extraction_heldout_paraphrase": accuracy(model, tokenizer, data.eval["heldout_paraphrase"]),
    }
