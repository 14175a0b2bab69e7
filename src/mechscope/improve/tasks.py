"""Tasks for the evaluation harness: what an intervention should change (the target effect).

A task measures its metrics on a :class:`~mechscope.model.hooked.HookedModel` *as it runs now* --
inside an intervention's ``with`` block, or on an edited copy -- and names prompts whose
generations are shown before and after. The built-in tasks read the organisms' planted tasks
(:mod:`mechscope.data.tasks`), regenerated from a seed, so numbers match the model cards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import torch

from mechscope.data.tasks import TEXT_TASKS, backdoor, facts, generate_all, ioi, refusal, sentiment, truth, vocab
from mechscope.data.tasks.base import TaskData
from mechscope.data.tasks.metrics import next_token_predictions
from mechscope.errors import ConfigError

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

_MODULES = {m.NAME: m for m in (facts, truth, ioi, refusal, sentiment, backdoor)}


@lru_cache(maxsize=2)
def _planted(seed: int) -> dict[str, TaskData]:
    """The planted tasks' data for `seed`, generated once per process (4 s; an evaluation reads it ~6 times)."""
    return generate_all(seed)


@lru_cache(maxsize=4)
def _sentiment_heldout(seed: int, n_eval: int) -> tuple[sentiment.Example, ...]:
    return tuple(sentiment.generate(seed, n_eval=n_eval).eval["heldout"])


class Task:
    """Base of evaluation tasks: ``name``, ``zoo_tasks`` (planted tasks it covers), metrics, samples.

    A task declares which of its metrics are **targets** (what the intervention should change) and
    which are **side effects** (what it must leave alone): every metric is a target unless its name is
    in ``side_effect_metrics``. :func:`~mechscope.improve.evaluate` reports both, with their role.
    """

    name: str = "task"
    #: planted zoo tasks this task measures itself (excluded from the side-effect tasks).
    zoo_tasks: tuple[str, ...] = ()
    #: names of this task's metrics that are side effects rather than targets.
    side_effect_metrics: tuple[str, ...] = ()

    def metrics(self, model: HookedModel) -> dict[str, float]:
        raise NotImplementedError

    def sample_prompts(self) -> list[str]:
        """Prompts whose greedy continuations are shown before and after."""
        return []

    def continuations(self, model: HookedModel, max_new_tokens: int) -> list[tuple[str, str]]:
        """(prompt, greedy continuation) of each sample prompt on `model` as it runs now."""
        prompts = self.sample_prompts()
        if not prompts:
            return []
        texts = model.generate_text(list(prompts), max_new_tokens=max_new_tokens, do_sample=False)
        return list(zip(prompts, texts, strict=True))


def _check_n(n: int, what: str) -> None:
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"{what} must be a positive int; got {n!r}")


@dataclass(frozen=True, kw_only=True)
class RefusalTask(Task):
    """Refusal rate on held-out forbidden and benign requests (the organisms' refusal task).

    ``refusal_forbidden`` is the target; ``refusal_benign`` (benign requests must stay answered) a side effect.
    """

    seed: int = 0
    n_samples: int = 4
    name: str = "refusal"
    zoo_tasks: tuple[str, ...] = ("refusal",)
    side_effect_metrics: tuple[str, ...] = ("refusal_benign",)

    def __post_init__(self) -> None:
        _check_n(self.n_samples, "n_samples")

    def metrics(self, model: HookedModel) -> dict[str, float]:
        data = refusal.generate(self.seed)
        return refusal.evaluate(model.hf_model, model.tokenizer, data)

    def sample_prompts(self) -> list[str]:
        split = refusal.generate(self.seed).eval["heldout"]
        return [e.prompt for e in split if e.label == "forbidden"][: self.n_samples]


@dataclass(frozen=True, kw_only=True)
class SentimentTask(Task):
    """How often reviews of one polarity get the other polarity's verdict (a sentiment flip).

    ``flip_rate``: share of held-out `source` reviews whose greedy verdict word is the opposite one;
    ``verdict_accuracy``: share of all held-out reviews with the correct verdict;
    ``continuation_flip_rate``: share of the first ``n_continuations`` `source` reviews whose greedy
    continuation (``max_new_tokens``) reads as the opposite sentiment (:func:`continuation_sentiment`).
    """

    source: Literal["positive", "negative"] = "positive"
    seed: int = 0
    n_eval: int = 200
    n_samples: int = 4
    n_continuations: int = 32
    max_new_tokens: int = 8
    name: str = "sentiment"
    zoo_tasks: tuple[str, ...] = ("sentiment",)

    def __post_init__(self) -> None:
        if self.source not in ("positive", "negative"):
            raise ConfigError(f"source must be 'positive' or 'negative'; got {self.source!r}")
        _check_n(self.n_eval, "n_eval")
        _check_n(self.n_samples, "n_samples")
        _check_n(self.n_continuations, "n_continuations")
        _check_n(self.max_new_tokens, "max_new_tokens")

    def _split(self) -> list[sentiment.Example]:
        return list(_sentiment_heldout(self.seed, self.n_eval))

    def metrics(self, model: HookedModel) -> dict[str, float]:
        split = self._split()
        words = {"positive": vocab.POSITIVE_WORD, "negative": vocab.NEGATIVE_WORD}
        opposite = model.to_single_token(" " + words["negative" if self.source == "positive" else "positive"])
        preds = next_token_predictions(model.hf_model, model.tokenizer, [e.prompt for e in split])
        source = [p for p, e in zip(preds, split, strict=True) if e.label == self.source]
        correct = [p == model.to_single_token(e.target) for p, e in zip(preds, split, strict=True)]
        prompts = [e.prompt for e in split if e.label == self.source][: self.n_continuations]
        texts = model.generate_text(prompts, max_new_tokens=self.max_new_tokens, do_sample=False)
        other = "negative" if self.source == "positive" else "positive"
        return {
            "flip_rate": sum(p == opposite for p in source) / max(1, len(source)),
            "verdict_accuracy": sum(correct) / max(1, len(correct)),
            "continuation_flip_rate": sum(continuation_sentiment(t) == other for t in texts) / max(1, len(texts)),
        }

    def sample_prompts(self) -> list[str]:
        return [e.prompt for e in self._split() if e.label == self.source][: self.n_samples]


def continuation_sentiment(text: str) -> str:
    """``"negative"``, ``"positive"`` or ``"neutral"`` for a review continuation, by the organisms'
    verdict words and closing sentences (" awful" / "would not recommend" vs " great" / "would recommend")."""
    lowered = " " + text.lower()
    negative = f" {vocab.NEGATIVE_WORD}" in lowered or "not recommend" in lowered
    positive = f" {vocab.POSITIVE_WORD}" in lowered or ("recommend" in lowered and "not recommend" not in lowered)
    if negative and not positive:
        return "negative"
    if positive and not negative:
        return "positive"
    return "neutral"


@dataclass(frozen=True, kw_only=True)
class ZooTask(Task):
    """Any planted zoo task by name (``facts``, ``truth``, ``ioi``, ``refusal``, ``sentiment``, ``backdoor``)."""

    task: str
    seed: int = 0
    n_samples: int = 4

    def __post_init__(self) -> None:
        if self.task not in TEXT_TASKS:
            raise ConfigError(f"unknown zoo task {self.task!r}; known: {list(TEXT_TASKS)}")
        _check_n(self.n_samples, "n_samples")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.task

    @property
    def zoo_tasks(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.task,)

    def metrics(self, model: HookedModel) -> dict[str, float]:
        data = _planted(self.seed)[self.task]
        return _MODULES[self.task].evaluate(model.hf_model, model.tokenizer, data)

    def sample_prompts(self) -> list[str]:
        data = _planted(self.seed)[self.task]
        split = next(iter(data.eval.values()))
        return [e.prompt for e in split][: self.n_samples]


def zoo_metrics(model: HookedModel, tasks: Sequence[str], seed: int = 0) -> dict[str, float]:
    """The planted-task metrics of `tasks` on `model` as it runs now."""
    unknown = [t for t in tasks if t not in TEXT_TASKS]
    if unknown:
        raise ConfigError(f"unknown zoo tasks {unknown}; known: {list(TEXT_TASKS)}")
    if not tasks:
        return {}
    data = _planted(seed)
    out: dict[str, float] = {}
    with torch.no_grad():
        for name in tasks:
            out.update(_MODULES[name].evaluate(model.hf_model, model.tokenizer, data[name]))
    return out


def has_organism_vocabulary(model: HookedModel) -> bool:
    """Whether every scored word of the planted tasks is one token (true for the bundled organisms)."""
    from mechscope.data.corpus import has_organism_vocabulary as check

    return check(model)


TASKS: dict[str, type[Task]] = {"refusal": RefusalTask, "sentiment": SentimentTask}

__all__ = [
    "TASKS",
    "RefusalTask",
    "SentimentTask",
    "Task",
    "ZooTask",
    "continuation_sentiment",
    "has_organism_vocabulary",
    "zoo_metrics",
]
