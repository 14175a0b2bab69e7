"""Contrast prompt sets built from the organisms' planted tasks, for steering vectors and directions.

A contrast is two prompt lists whose difference is one behaviour: ``refusal`` (forbidden vs benign
requests; the difference mediates refusing) and ``sentiment`` (negative vs positive reviews; the
difference steers towards negative). They come from the tasks' *training* splits, so evaluation on the
held-out splits measures generalisation. ``retain_texts`` are ordinary prompts a steered model must
keep handling (the organisms' sentiment, truth and IOI prompts).
"""

from __future__ import annotations

import random

from mechscope.errors import ConfigError

CONTRASTS = ("refusal", "sentiment")


def contrast_texts(name: str, n: int = 48, seed: int = 0) -> tuple[list[str], list[str]]:
    """(positive, negative) prompts of a bundled contrast, `n` of each, sampled with `seed`."""
    from mechscope.data.tasks import refusal, sentiment

    if name == "sentiment":
        data, pos, neg = sentiment.generate(seed).train, "negative", "positive"
    elif name == "refusal":
        data, pos, neg = refusal.generate(seed).train, "forbidden", "benign"
    else:
        raise ConfigError(f"unknown contrast {name!r}; known: {list(CONTRASTS)}")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive int; got {n!r}")
    rng = random.Random(seed)
    positive = [e.prompt for e in data if e.label == pos]
    negative = [e.prompt for e in data if e.label == neg]
    return rng.sample(positive, min(n, len(positive))), rng.sample(negative, min(n, len(negative)))


def retain_texts(n_per_task: int = 32, seed: int = 0) -> list[str]:
    """Ordinary prompts from the organisms' sentiment, truth and IOI training splits (not refusal, not facts)."""
    from mechscope.data.tasks import generate_all

    if not isinstance(n_per_task, int) or n_per_task < 1:
        raise ConfigError(f"n_per_task must be a positive int; got {n_per_task!r}")
    rng = random.Random(seed)
    data = generate_all(seed)
    out: list[str] = []
    for name in ("sentiment", "truth", "ioi"):
        out += [e.prompt for e in rng.sample(data[name].train, min(n_per_task, len(data[name].train)))]
    return out
