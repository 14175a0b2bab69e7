"""Neighbourhood checks of an edit: the edited relation asked about *other* subjects, on the user's model.

A ROME edit "Germany -> Rome" at a late layer of SmolLM2 turned 10 of 14 other capitals into " Rome"
while the mean next-token KL on neutral text moved by 0.0025, as little as a clean edit: neutral text
does not ask about capitals, so it cannot see the damage. The check that sees it asks the same relation
(the request's prompt with ``{}``) about other subjects of the same kind and compares the model's
answers before and after the edit.

:func:`neighbour_prompts` builds those prompts from the request (other subjects of the edited subject's
kind from :mod:`mechscope.data.subjects`, or the subjects given), :func:`neighbourhood` pairs each with
the *unedited* model's greedy answer (the reference the edit must keep), and :func:`with_neighbourhood`
fills a request's ``neighbours`` with them unless the user gave some. :func:`~mechscope.steer.editing.
edit_metrics` then reports, besides the answer checks, ``neighbourhood_to_target`` (share of neighbours
whose answer became the edit's target) and ``neighbourhood_kl`` (mean next-token KL at the neighbours).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from mechscope.errors import ConfigError
from mechscope.steer.editing.requests import EditError, EditRequest


@dataclass(frozen=True, kw_only=True)
class NeighbourhoodConfig:
    """Which other subjects to ask: `subjects` if given, else `n` subjects of the edited subject's kind
    (``kind`` forces one of :data:`mechscope.data.subjects.SUBJECTS`), deterministic in `seed`."""

    n: int = 14
    subjects: tuple[str, ...] = ()
    kind: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"NeighbourhoodConfig.n must be a positive int; got {self.n!r}")
        if isinstance(self.subjects, str) or not all(isinstance(s, str) and s.strip() for s in self.subjects):
            raise ConfigError(f"NeighbourhoodConfig.subjects must be non-empty strings; got {self.subjects!r}")
        object.__setattr__(self, "subjects", tuple(self.subjects))


def neighbour_prompts(request: EditRequest, config: NeighbourhoodConfig | None = None) -> list[tuple[str, str]]:
    """(subject, prompt) pairs: the request's prompt about each other subject."""
    from mechscope.data.subjects import neighbour_subjects

    cfg = config or NeighbourhoodConfig()
    if cfg.subjects:
        others = [s for s in cfg.subjects if s.strip().casefold() != request.subject.strip().casefold()]
    else:
        others = neighbour_subjects(request.subject, cfg.n, kind=cfg.kind, seed=cfg.seed)
    if not others:
        raise EditError(f"no neighbour subject other than {request.subject!r} to check the edit on")
    return [(s, request.prompt.replace("{}", s)) for s in others]


@torch.no_grad()
def greedy_ids(model: Any, prompts: Sequence[str], batch_size: int = 32) -> list[int]:
    """The greedy next token id after each prompt (same scoring rule as the edit metrics)."""
    out: list[int] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        batch = model.to_tokens(chunk, padding_side="right")  # as text: BOS where the tokenizer adds one
        logits = model.forward(batch)
        last = (batch["attention_mask"].sum(-1) - 1).to(logits.device)
        out += [int(i) for i in logits[torch.arange(len(chunk), device=logits.device), last].argmax(-1).tolist()]
    return out


def neighbourhood(
    model: Any, request: EditRequest, config: NeighbourhoodConfig | None = None
) -> tuple[tuple[str, str], ...]:
    """(prompt, answer) pairs about other subjects, answered by `model` as it is now (before the edit).

    Neighbours whose answer text does not re-tokenise to the same first token are dropped (a reference
    the metrics could not compare exactly)."""
    pairs = neighbour_prompts(request, config)
    prompts = [p for _, p in pairs]
    tok = model.tokenizer
    kept: list[tuple[str, str]] = []
    for prompt, first in zip(prompts, greedy_ids(model, prompts), strict=True):
        answer = model.to_string([first])
        ids = tok(answer, add_special_tokens=False)["input_ids"] if answer else []
        if ids and int(ids[0]) == first:
            kept.append((prompt, answer))
    if not kept:
        raise EditError(
            f"none of the {len(prompts)} neighbour prompts has an answer that can be checked; give neighbours "
            "with their answers in the request"
        )
    return tuple(kept)


def with_neighbourhood(model: Any, request: EditRequest, config: NeighbourhoodConfig | None = None) -> EditRequest:
    """`request` with ``neighbours`` built by :func:`neighbourhood` on `model` (unchanged if it has some)."""
    if request.neighbours:
        return request
    return replace(request, neighbours=neighbourhood(model, request, config))


__all__ = ["NeighbourhoodConfig", "greedy_ids", "neighbour_prompts", "neighbourhood", "with_neighbourhood"]
