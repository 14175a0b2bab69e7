"""Trait vectors: from a trait's positive and negative examples to a vector that both *predicts* the trait
before generation and *steers* it (persona vectors, Chen et al. 2025; contrastive activation addition).

1. :func:`trait_vector` -- the mean activation difference between texts that express the trait and texts
   that do not (or the same request under a trait-eliciting vs a neutral system prompt), at one layer.
2. :func:`trait_projection` -- each prompt's activation at its last token projected on the unit trait
   vector: a score read *before* anything is generated.
3. :func:`trait_report` -- measures, on a set of prompts, how well that projection predicts the trait's
   expression (Pearson correlation with a per-prompt expression score the caller defines, e.g. the
   probability of the trait's verdict word or a judge's score of the generation), and how expression
   moves when steering with the vector at several coefficients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.results import Result
from mechscope.sites import Site
from mechscope.steer.intervention import check_finite, require_hooked
from mechscope.steer.vectors import PositionMode, SteeringVector, mean_difference, read_activations, steer

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

#: Per-prompt expression of the trait, measured on the model as it runs now: ``(model, prompts) -> [n]``.
Expression = Callable[["HookedModel", list[str]], Tensor]


def trait_vector(
    model: HookedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    layer: int,
    site: str = "hook_resid_pre",
    read: str = "last",
) -> SteeringVector:
    """Mean activation on `positive` (trait expressed) minus on `negative`, at `site` of `layer`."""
    vec = mean_difference(model, positive, negative, layers=layer, kind=site, read=read)  # type: ignore[arg-type]
    vec.method = "trait"
    return vec


def trait_projection(model: HookedModel, vector: SteeringVector, prompts: Sequence[str]) -> Float[Tensor, " n"]:
    """Each prompt's last-token activation at the vector's site, projected on its unit direction."""
    model = require_hooked(model)
    vector.check_model(model)
    if len(vector.layers) != 1:
        raise ConfigError(f"a trait vector has one layer; this one has {vector.layers}")
    site = Site(vector.site, vector.layers[0])
    acts = read_activations(model, list(prompts), [site], read="last")[site]
    unit = vector.directions[0] / vector.directions[0].norm().clamp_min(1e-12)
    return (acts.float().cpu() @ unit).detach()


class TraitResult(Result):
    """``projection`` and ``expression [prompt]`` (unsteered), ``correlation`` (0-d, Pearson), and the
    steering curve ``steered [coefficient]`` (mean expression with the vector added at each coefficient)."""

    method = "trait_report"

    def default_tensor(self) -> str:
        return "steered"

    @property
    def correlation(self) -> float:
        return float(self["correlation"])


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two equal-length vectors (NaN when either is constant)."""
    xc, yc = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = xc.norm() * yc.norm()
    return float(xc @ yc / denom) if float(denom) > 0 else float("nan")


def trait_report(
    model: HookedModel,
    vector: SteeringVector,
    prompts: Sequence[str],
    expression: Expression,
    *,
    coefficients: Sequence[float] = (-1.0, 0.0, 1.0),
    positions: PositionMode | int | Sequence[int] = "all",
) -> TraitResult:
    """Projection vs expression on `prompts` (their correlation) and expression under steering."""
    model = require_hooked(model)
    if isinstance(prompts, str) or len(prompts) < 3:
        raise ConfigError(f"trait_report needs a list of at least 3 prompts to correlate; got {prompts!r}")
    coefs = [check_finite("coefficient", c) for c in coefficients]
    if not coefs:
        raise ConfigError("coefficients must name at least one steering strength")
    if not callable(expression):
        raise ConfigError(f"expression must be a function (model, prompts) -> [n]; got {type(expression).__name__}")
    projection = trait_projection(model, vector, prompts)
    with torch.no_grad():
        expressed = _scores(expression(model, list(prompts)), len(prompts))
        steered = []
        for c in coefs:
            with steer(model, vector, c, positions=positions):
                steered.append(float(_scores(expression(model, list(prompts)), len(prompts)).mean()))
    return TraitResult(
        tensors={
            "projection": projection.double(),
            "expression": expressed.double(),
            "correlation": torch.tensor(pearson(projection, expressed), dtype=torch.float64),
            "steered": torch.tensor(steered, dtype=torch.float64),
        },
        axes={"projection": ("prompt",), "expression": ("prompt",), "correlation": (), "steered": ("coefficient",)},
        labels={"coefficient": [f"{c:g}" for c in coefs]},
        config={
            "vector": repr(vector),
            "n_prompts": len(prompts),
            "positions": positions if isinstance(positions, str | int) else list(positions),
        },
    )


def _scores(values: Tensor, n: int) -> Tensor:
    if not isinstance(values, Tensor) or values.shape != (n,):
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ConfigError(f"expression must return one score per prompt, a [{n}] tensor; got {got}")
    return values.detach().float().cpu()


__all__ = ["Expression", "TraitResult", "pearson", "trait_projection", "trait_report", "trait_vector"]
