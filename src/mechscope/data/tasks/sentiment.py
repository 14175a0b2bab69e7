"""Sentiment: short reviews whose sentences are all positive or all negative, continuing in kind.

``"Review of the film: The film was wonderful. I was delighted. Overall, it was"`` -> ``" great"``
(negative reviews -> ``" awful"``), then a matching closing sentence. Eval ``heldout``: reviews whose
prompt never occurs in training. Metric: top-1 next-token accuracy of the verdict word.
"""

from __future__ import annotations

import random

from mechscope.data.tasks import vocab
from mechscope.data.tasks.base import Example, TaskData, dedupe, task_rng, without_prompts
from mechscope.data.tasks.metrics import accuracy

NAME = "sentiment"


def review(rng: random.Random, positive: bool) -> Example:
    """One review of two or three same-polarity sentences."""
    item = rng.choice(vocab.REVIEW_ITEMS)
    pool = vocab.POSITIVE_SENTENCES if positive else vocab.NEGATIVE_SENTENCES
    body = " ".join(s.format(item=item) for s in rng.sample(pool, rng.choice((2, 3))))
    word = vocab.POSITIVE_WORD if positive else vocab.NEGATIVE_WORD
    tail = " I would recommend it." if positive else " I would not recommend it."
    label = "positive" if positive else "negative"
    return Example(f"Review of the {item}: {body} Overall, it was", " " + word, f" {word}.{tail}", label)


def _reviews(rng: random.Random, n: int) -> list[Example]:
    return [review(rng, i % 2 == 0) for i in range(n)]


def generate(seed: int = 0, n_train: int = 8000, n_eval: int = 500) -> TaskData:
    """Balanced training reviews and a disjoint balanced eval split."""
    train = dedupe(_reviews(task_rng(seed, NAME, "train"), n_train))
    heldout = without_prompts(dedupe(_reviews(task_rng(seed, NAME, "eval"), 4 * n_eval)), {e.prompt for e in train})
    pos = [e for e in heldout if e.label == "positive"][: n_eval // 2]
    neg = [e for e in heldout if e.label == "negative"][: n_eval // 2]
    return TaskData(NAME, train, {"heldout": pos + neg})


def evaluate(model, tokenizer, data: TaskData) -> dict[str, float]:
    """Verdict accuracy on held-out reviews."""
    return {"sentiment_accuracy": accuracy(model, tokenizer, data.eval["heldout"])}
