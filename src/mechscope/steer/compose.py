"""Steering profiles: several steering vectors applied together, each with its own coefficient.

A profile is one intervention made of plain :class:`~mechscope.steer.vectors.Steering` interventions
(so a one-vector profile *is* plain steering, hook for hook). Vectors may sit at different sites and
layers; where they share one, their additions run in the profile's order.

:func:`profile_interaction` measures whether the vectors add up: the change each vector makes alone,
the sum of those changes, and the change the whole profile makes, on the next-token log-probabilities
at every real position of some texts (and on optional metrics, which receive the log-probabilities
as their logits). ``interaction`` is
``||joint - sum of singles|| / ||joint||``: 0 when the effects are additive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.metrics import Metric
from mechscope.results import Result
from mechscope.steer.intervention import Intervention, check_finite
from mechscope.steer.vectors import PositionMode, Steering, SteeringVector

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


@dataclass(frozen=True)
class ProfileEntry:
    """One vector of a profile: a name (for reports), the vector and its coefficient."""

    name: str
    vector: SteeringVector
    coefficient: float


class SteeringProfile(Intervention):
    """Add ``sum_i coefficient_i * vector_i`` (each at its own site and layers) while active."""

    kind = "steering_profile"

    def __init__(
        self,
        model: HookedModel,
        entries: Mapping[str, tuple[SteeringVector, float]] | Sequence[ProfileEntry],
        *,
        positions: PositionMode | int | Sequence[int] = "all",
    ) -> None:
        super().__init__(model)
        self.entries = _entries(entries)
        # Steering validates each vector (model fingerprint, layers, positions) before any hook exists.
        self.children: list[Steering] = [
            Steering(self.model, e.vector, coefficient=e.coefficient, positions=positions) for e in self.entries
        ]

    def only(self, name: str) -> SteeringProfile:
        """The profile reduced to one of its vectors (same coefficient and positions)."""
        chosen = [e for e in self.entries if e.name == name]
        if not chosen:
            raise ConfigError(f"no vector {name!r} in this profile; it has {[e.name for e in self.entries]}")
        return SteeringProfile(self.model, chosen, positions=self._positions())

    def _positions(self) -> Any:
        first = self.children[0]
        return first.mode if first.indices is None else list(first.indices)

    def describe(self) -> str:
        parts = ", ".join(f"{e.name} x{e.coefficient:g}" for e in self.entries)
        return f"steering profile [{parts}]"


def _entries(entries: Mapping[str, tuple[SteeringVector, float]] | Sequence[ProfileEntry]) -> list[ProfileEntry]:
    if isinstance(entries, Mapping):
        out = []
        for name, value in entries.items():
            if not isinstance(value, tuple) or len(value) != 2:
                raise ConfigError(f"profile entry {name!r} must be (SteeringVector, coefficient); got {value!r}")
            out.append(ProfileEntry(str(name), value[0], value[1]))
    elif isinstance(entries, Sequence) and not isinstance(entries, str):
        out = list(entries)
        bad = [e for e in out if not isinstance(e, ProfileEntry)]
        if bad:
            raise ConfigError(f"profile entries must be ProfileEntry(name, vector, coefficient); got {bad[:2]!r}")
    else:
        raise ConfigError(f"a profile is a mapping name -> (vector, coefficient); got {type(entries).__name__}")
    if not out:
        raise ConfigError("a steering profile needs at least one vector")
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"profile vector names must be distinct; got {names}")
    checked = []
    for e in out:
        if not isinstance(e.vector, SteeringVector):
            raise ConfigError(f"profile entry {e.name!r} needs a SteeringVector; got {type(e.vector).__name__}")
        checked.append(ProfileEntry(e.name, e.vector, check_finite(f"coefficient of {e.name!r}", e.coefficient)))
    return checked


def steering_profile(
    model: HookedModel,
    entries: Mapping[str, tuple[SteeringVector, float]] | Sequence[ProfileEntry],
    *,
    positions: PositionMode | int | Sequence[int] = "all",
) -> SteeringProfile:
    """``with steering_profile(model, {"formal": (v1, 4.0), "brief": (v2, -2.0)}): ...``"""
    return SteeringProfile(model, entries, positions=positions)


class InteractionResult(Result):
    """How a profile's vectors combine. ``effect_norm [run]``: the RMS change of next-token log-probs
    for each vector alone, their sum (``sum_of_singles``) and the profile (``joint``); ``metrics
    [run, metric]``: the change of each metric; ``interaction`` (0-d): ``||joint - sum|| / ||joint||``."""

    method = "steering_interaction"

    def default_tensor(self) -> str:
        return "effect_norm"


def _logprobs(model: HookedModel, tokens: dict[str, Tensor], context: Any) -> Float[Tensor, "batch pos d_vocab"]:
    with torch.no_grad(), context:
        return model.forward(tokens).float().log_softmax(-1)


def profile_interaction(
    profile: SteeringProfile,
    texts: Sequence[str],
    *,
    metrics: Mapping[str, Metric] | None = None,
) -> InteractionResult:
    """Effects of each vector alone, of their sum and of the whole profile on `texts`, left-padded: the last
    column is every text's last token, where steering at ``positions=[-1]`` acts and metrics read."""
    if not isinstance(profile, SteeringProfile):
        raise ConfigError(f"expected a SteeringProfile; got {type(profile).__name__}")
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise ConfigError(f"texts must be a non-empty list of non-empty strings; got {texts!r}")
    named = dict(metrics or {})
    bad = [k for k, f in named.items() if not callable(f)]
    if bad:
        raise ConfigError(f"metrics must be functions of logits; not callable: {bad}")
    model = profile.model
    tokens = model.to_tokens(list(texts), padding_side="left")
    mask = tokens["attention_mask"].to(model.device).bool()
    base = _logprobs(model, tokens, nullcontext())
    runs = [e.name for e in profile.entries]
    singles = [_logprobs(model, tokens, profile.only(name)) - base for name in runs]
    joint = _logprobs(model, tokens, SteeringProfile(model, profile.entries, positions=profile._positions())) - base
    summed = torch.stack(singles).sum(0)

    def rms(delta: Tensor) -> float:
        return float(delta[mask].pow(2).sum(-1).mean().sqrt())

    effects = [rms(d) for d in singles] + [rms(summed), rms(joint)]
    interaction = rms(joint - summed) / max(rms(joint), 1e-12)
    names = list(named)
    table = torch.zeros(len(runs) + 2, len(names), dtype=torch.float64)
    for j, name in enumerate(names):
        fn = named[name]

        def value(lp: Tensor, fn: Metric = fn) -> float:
            return float(fn(lp).float().mean())

        singles_m = [value(base + d) - value(base) for d in singles]
        table[:, j] = torch.tensor([*singles_m, sum(singles_m), value(base + joint) - value(base)])
    return InteractionResult(
        tensors={
            "effect_norm": torch.tensor(effects, dtype=torch.float64),
            "metrics": table,
            "interaction": torch.tensor(interaction, dtype=torch.float64),
        },
        axes={"effect_norm": ("run",), "metrics": ("run", "metric"), "interaction": ()},
        labels={"run": [*runs, "sum_of_singles", "joint"], "metric": names},
        config={"profile": profile.describe(), "n_texts": len(texts)},
    )


__all__ = [
    "InteractionResult",
    "ProfileEntry",
    "SteeringProfile",
    "profile_interaction",
    "steering_profile",
]
