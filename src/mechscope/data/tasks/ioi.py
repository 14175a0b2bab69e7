"""Indirect-object identification: ``"When Mara and Tobin went to the market, Tobin gave a lamp to"``
-> ``" Mara"``.

Both name orders (ABBA, BABA) appear. Eval ``heldout``: new name/place/object combinations with the
training templates; eval ``paraphrase``: held-out templates. No eval prompt occurs in training.
Metric: top-1 next-token accuracy of the indirect object.
"""

from __future__ import annotations

import random

from mechscope.data.tasks import vocab
from mechscope.data.tasks.base import Example, TaskData, dedupe, task_rng, without_prompts

NAME = "ioi"

TRAIN_TEMPLATES = (
    "When {a} and {b} went to the {place}, {s} gave a {obj} to",
    "After {a} and {b} arrived at the {place}, {s} handed a {obj} to",
    "{a} and {b} were at the {place}. {s} passed a {obj} to",
    "While {a} and {b} walked to the {place}, {s} threw a {obj} to",
    "Then {a} and {b} visited the {place}, and {s} sent a {obj} to",
    "At the {place}, {a} and {b} met. Later {s} offered a {obj} to",
)
HELDOUT_TEMPLATES = (
    "Once {a} and {b} reached the {place}, {s} brought a {obj} to",
    "{a} met {b} at the {place}, where {s} lent a {obj} to",
)


def _sample(rng: random.Random, templates: tuple[str, ...], n: int) -> list[Example]:
    out: list[Example] = []
    for _ in range(n):
        a, b = rng.sample(vocab.IOI_NAMES, 2)
        subject, answer = (b, a) if rng.random() < 0.5 else (a, b)
        prompt = rng.choice(templates).format(
            a=a, b=b, s=subject, place=rng.choice(vocab.IOI_PLACES), obj=rng.choice(vocab.IOI_OBJECTS)
        )
        out.append(Example(prompt, " " + answer, f" {answer}.", label=answer))
    return out


def generate(seed: int = 0, n_train: int = 20000, n_eval: int = 1000) -> TaskData:
    """`n_train` training sentences and two disjoint eval splits of up to `n_eval` prompts."""
    train = dedupe(_sample(task_rng(seed, NAME, "train"), TRAIN_TEMPLATES, n_train))
    banned = {ex.prompt for ex in train}
    heldout = without_prompts(dedupe(_sample(task_rng(seed, NAME, "eval"), TRAIN_TEMPLATES, 2 * n_eval)), banned)
    para = dedupe(_sample(task_rng(seed, NAME, "para"), HELDOUT_TEMPLATES, n_eval))
    return TaskData(NAME, train, {"heldout": heldout[:n_eval], "paraphrase": para})


def evaluate(model, tokenizer, data: TaskData) -> dict[str, float]:
    """Indirect-object accuracy with training templates (new fillers) and with held-out templates."""
    from mechscope.data.tasks.metrics import accuracy

    return {
        "ioi_heldout": accuracy(model, tokenizer, data.eval["heldout"]),
        "ioi_paraphrase": accuracy(model, tokenizer, data.eval["paraphrase"]),
    }
