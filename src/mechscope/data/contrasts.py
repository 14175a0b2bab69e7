"""Contrast prompt sets built from the organisms' planted tasks, for steering vectors and directions.

A contrast is two prompt lists whose difference is one behaviour: ``refusal`` (forbidden vs benign
requests; the difference mediates refusing) and ``sentiment`` (negative vs positive reviews; the
difference steers towards negative). They come from the tasks' *training* splits, so evaluation on the
held-out splits measures generalisation. ``retain_texts`` are ordinary prompts a steered model must
keep handling (the organisms' sentiment, truth and IOI prompts).

:func:`contrast_for_model` gives the contrast a method should use on a given model: the organisms'
sets on the organisms; on any other model the bundled ``refusal`` contrast is the harmful vs harmless
instruction sets (:mod:`mechscope.data.prompt_sets`), and the user's own files
(:mod:`mechscope.data.files`) are read as given. On a chat model (a tokenizer with a chat template and
no organism vocabulary) instructions are rendered in the model's own template unless ``chat="off"``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from mechscope.errors import ConfigError

CONTRASTS = ("refusal", "sentiment")
CHAT_MODES = ("auto", "on", "off")


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


def _is_chat_model(model: Any) -> bool:
    from mechscope.data.corpus import has_organism_vocabulary
    from mechscope.model.chat import has_chat_template

    return has_chat_template(model) and not has_organism_vocabulary(model)


def contrast_for_model(
    model: Any,
    name: str | None = None,
    positive: str | Path | None = None,
    negative: str | Path | None = None,
    *,
    chat: str = "auto",
    n: int = 48,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """(positive, negative) prompts for `model` from a bundled contrast `name`, a ``.jsonl`` contrast file
    given as `name`, or two prompt files; rendered in the chat template per `chat` (module docstring).

    ``chat="auto"`` renders the bundled refusal instructions and the user's files on a chat model, and
    never the organisms' own frames (already in their chat format) or the sentiment reviews.
    """
    from mechscope.data.files import read_contrast, read_prompts

    if chat not in CHAT_MODES:
        raise ConfigError(f"chat must be one of {list(CHAT_MODES)}; got {chat!r}")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive int; got {n!r}")
    if name and (positive is not None or negative is not None):
        raise ConfigError("give either a contrast (name or .jsonl file) or positive/negative files, not both")
    chat_model = _is_chat_model(model)
    instructions = True  # plain instructions (render on a chat model) vs already-framed prompts
    if name in CONTRASTS:
        if name == "refusal" and not _organism(model):
            from mechscope.data.prompt_sets import load_prompt_set

            rng = random.Random(seed)
            harmful, harmless = load_prompt_set("harmful"), load_prompt_set("harmless")
            pos = rng.sample(harmful, min(n, len(harmful)))
            neg = rng.sample(harmless, min(n, len(harmless)))
        else:
            pos, neg = contrast_texts(name, n, seed)
            instructions = False
    elif name:
        if not Path(name).is_file():
            raise ConfigError(
                f"unknown contrast {name!r}: neither a bundled one ({list(CONTRASTS)}) nor a file; a contrast file "
                "is JSON lines with 'positive' and/or 'negative' prompts"
            )
        pos, neg = read_contrast(name)
    elif positive is not None and negative is not None:
        pos, neg = read_prompts(positive), read_prompts(negative)
    else:
        raise ConfigError("need a contrast (bundled name or .jsonl file) or both positive and negative prompt files")
    render = chat == "on" or (chat == "auto" and chat_model and instructions)
    if render:
        from mechscope.model.chat import format_instructions

        pos, neg = format_instructions(model, pos), format_instructions(model, neg)
    return pos, neg


def _organism(model: Any) -> bool:
    from mechscope.data.corpus import has_organism_vocabulary

    return has_organism_vocabulary(model)
