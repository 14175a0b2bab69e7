"""An edit's own task for :func:`~mechscope.improve.evaluate`: efficacy as the target, neighbours as side effects.

``evaluate(model, record.applied(model), EditTask.for_model(model, record.requests))`` (with the edit
reverted first, so "before" is the unedited model) reports, beside neutral-text KL and perplexity:

- targets: ``efficacy``, ``target_prob``, ``paraphrase`` (:mod:`mechscope.steer.editing.metrics`);
- side effects: ``neighbourhood`` (neighbour prompts still given their reference answer),
  ``neighbourhood_to_target`` (neighbours now answered with the edit's target) and ``neighbourhood_kl``
  (mean next-token KL at the neighbour prompts against the unedited model).

Neighbours come from the requests, or are built on the unedited model (other subjects of the same kind,
:mod:`mechscope.steer.editing.neighbourhood`) -- the check that catches an edit that rewrote the
relation for every subject, which neutral text cannot see.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.improve.tasks import Task
from mechscope.steer.editing.metrics import mean_kl, measure_requests
from mechscope.steer.editing.neighbourhood import NeighbourhoodConfig, with_neighbourhood
from mechscope.steer.editing.records import EditRecord
from mechscope.steer.editing.requests import EditRequest, check_requests

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


class AppliedEdit:
    """An edit record as an intervention for :func:`~mechscope.improve.evaluate`: applied inside the block,
    the model restored after (``EditRecord.applied``), with a description for the result."""

    def __init__(self, record: EditRecord, model: HookedModel) -> None:
        self.record, self.model = record, model
        self._block: AbstractContextManager[Any] | None = None

    def __enter__(self) -> HookedModel:
        self._block = self.record.applied(self.model)
        return cast("HookedModel", self._block.__enter__())

    def __exit__(self, *exc: Any) -> None:
        block, self._block = self._block, None
        if block is not None:
            block.__exit__(*exc)

    def describe(self) -> str:
        names = ", ".join(self.record.names)
        subjects = ", ".join(f"{r.subject} -> {r.target.strip()}" for r in self.record.requests)
        return f"{self.record.method} edit ({subjects}) of {names}"


@dataclass(frozen=True, kw_only=True)
class EditTask(Task):
    """Edit metrics per state; build with :meth:`for_model` on the *unedited* model."""

    requests: tuple[EditRequest, ...]
    reference: tuple[Tensor, ...] = field(default=(), repr=False)
    n_samples: int = 4
    name: str = "edit"
    side_effect_metrics: tuple[str, ...] = ("neighbourhood", "neighbourhood_to_target", "neighbourhood_kl")

    def __post_init__(self) -> None:
        requests = tuple(self.requests)
        if not requests or not all(isinstance(r, EditRequest) for r in requests):
            raise ConfigError("EditTask needs a non-empty tuple of EditRequest objects")
        object.__setattr__(self, "requests", requests)
        if self.reference and len(self.reference) != len(requests):
            raise ConfigError(f"reference has {len(self.reference)} entries for {len(requests)} requests")

    @classmethod
    def for_model(
        cls,
        model: HookedModel,
        requests: Sequence[EditRequest],
        *,
        neighbourhood: NeighbourhoodConfig | None = None,
    ) -> EditTask:
        """Fill missing neighbours from `model` (unedited) and keep its neighbour distributions as reference."""
        check_requests(model.tokenizer, list(requests))
        with torch.no_grad():
            filled = tuple(with_neighbourhood(model, r, neighbourhood) for r in requests)
            _, _, probs = measure_requests(model, filled)
        return cls(requests=filled, reference=tuple(probs))

    def metrics(self, model: HookedModel) -> dict[str, float]:
        with torch.no_grad():
            values, _, probs = measure_requests(model, list(self.requests))
        out: dict[str, float] = {}
        for name in ("efficacy", "target_prob", "paraphrase", "neighbourhood", "neighbourhood_to_target"):
            column = torch.tensor(values[name], dtype=torch.float64)
            column = column[~column.isnan()]
            out[name] = float(column.mean()) if len(column) else float("nan")
        if self.reference:
            kls = torch.tensor([mean_kl(r, p) for r, p in zip(self.reference, probs, strict=True)], dtype=torch.float64)
            kls = kls[~kls.isnan()]
            out["neighbourhood_kl"] = float(kls.mean()) if len(kls) else float("nan")
        return out

    def sample_prompts(self) -> list[str]:
        prompts = [r.text for r in self.requests]
        prompts += [p for r in self.requests for p, _ in r.neighbours[:2]]
        return prompts[: self.n_samples]


__all__ = ["EditTask"]
