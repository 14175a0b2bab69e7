"""Shared types of the planted-task generators: one example, one task's splits, seeded randomness.

Every generator is a pure function of its seed: the same seed gives byte-identical splits on every
machine (``random.Random`` seeded with a string is hash-randomisation-free), so the evaluation sets
behind a model card can always be regenerated instead of being stored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One planted-task item.

    ``prompt + completion`` is the training text. ``target`` is the expected continuation of
    ``prompt``; its first token (it starts with a space) is what next-token metrics score.
    ``label`` names the class where a task has classes (``"true"``/``"false"``, ``"forbidden"``...).
    ``unscored`` is a character span ``(start, end)`` of ``text`` that training does not predict (its
    tokens get no loss): a false claim states a wrong value that must not be learnt as a continuation.
    """

    prompt: str
    target: str
    completion: str
    label: str = ""
    unscored: tuple[int, int] | None = None

    @property
    def text(self) -> str:
        """The full training text of the example."""
        return self.prompt + self.completion


@dataclass(frozen=True)
class TaskData:
    """A task's training split and its named held-out evaluation splits."""

    name: str
    train: list[Example]
    eval: dict[str, list[Example]] = field(default_factory=dict)

    def train_texts(self) -> list[str]:
        """The training split as plain text documents."""
        return [ex.text for ex in self.train]

    def train_records(self) -> list[dict]:
        """The training split as corpus records: ``text``, ``source`` and, where set, ``unscored``."""
        out: list[dict] = []
        for ex in self.train:
            record: dict = {"text": ex.text, "source": self.name}
            if ex.unscored is not None:
                record["unscored"] = list(ex.unscored)
            out.append(record)
        return out


def task_rng(seed: int, task: str, split: str = "") -> random.Random:
    """A random generator private to one (seed, task, split), so tasks never share a stream."""
    return random.Random(f"mechscope-zoo:{seed}:{task}:{split}")


def dedupe(examples: list[Example]) -> list[Example]:
    """Examples in their first-seen order with duplicate training texts removed."""
    seen: set[str] = set()
    out: list[Example] = []
    for ex in examples:
        if ex.text not in seen:
            seen.add(ex.text)
            out.append(ex)
    return out


def without_prompts(examples: list[Example], banned: set[str]) -> list[Example]:
    """Examples whose prompt is not in `banned` (keeps evaluation splits disjoint from training)."""
    return [ex for ex in examples if ex.prompt not in banned]
