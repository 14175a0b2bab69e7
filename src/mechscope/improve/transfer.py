"""Transfer between models: a linear map between two residual streams, and interventions carried over it.

:func:`learn_map` fits ``a_target ~ a_source @ W + b`` (ridge least squares) on activations of the same
texts in both models: every real token when both tokenise the texts identically (``read="tokens"``),
else each text's last token or token mean. The :class:`ResidualMap` is an artifact tied to the source
model; it records the target model's fingerprint and its fit (R^2 on the training rows and, when given,
on held-out texts).

A steering vector or an ablation direction is a *difference* of activations, so it maps by the linear
part only: ``v_target = v_source @ W`` (:func:`transfer_vector`, :func:`transfer_direction`).
:func:`transfer_effect` measures how much effect survives: the metric change the transferred vector
makes on the target model, over the change made by the target's natively extracted vector (the same
recipe on the same texts) -- the *effect ratio*, 1 when the transfer is perfect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.direction import Direction
from mechscope.errors import ConfigError, ShapeError
from mechscope.metrics import Metric
from mechscope.model.tokens import text_mask
from mechscope.results import Artifact, ModelMismatchError, Result
from mechscope.sites import Site
from mechscope.steer.intervention import check_finite, require_hooked
from mechscope.steer.vectors import STEERABLE_KINDS, SteeringVector, from_direction, mean_difference, steer

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

Read = Literal["tokens", "last", "mean"]


@dataclass(frozen=True, kw_only=True)
class MapConfig:
    """Options of :func:`learn_map`: the two sites, how texts are read, the ridge penalty, and whether
    the map has a bias (affine)."""

    source_site: str
    target_site: str
    read: Read = "tokens"
    ridge: float = 1e-3
    affine: bool = True

    def __post_init__(self) -> None:
        for name in ("source_site", "target_site"):
            site = Site.parse(getattr(self, name))
            if site.kind not in STEERABLE_KINDS:
                raise ConfigError(f"MapConfig.{name} must be a residual-width site {STEERABLE_KINDS}; got {site.name}")
        if self.read not in ("tokens", "last", "mean"):
            raise ConfigError(f"MapConfig.read must be 'tokens', 'last' or 'mean'; got {self.read!r}")
        if not check_finite("ridge", self.ridge) >= 0:
            raise ConfigError(f"MapConfig.ridge must be >= 0; got {self.ridge}")


class ResidualMap(Artifact):
    """``a_target ~ a_source @ weight + bias`` between one site of a source and one of a target model."""

    kind = "residual_map"

    def __init__(
        self,
        weight: Float[Tensor, "d_source d_target"],
        bias: Float[Tensor, " d_target"],
        *,
        source_site: str,
        target_site: str,
        target: dict[str, Any],
        fit: dict[str, float],
        fingerprint: str,
        model_type: str,
        d_model: int,
    ) -> None:
        super().__init__(fingerprint=fingerprint, model_type=model_type, d_model=d_model)
        if weight.ndim != 2 or weight.shape[0] != d_model or bias.shape != (weight.shape[1],):
            raise ShapeError(
                f"a residual map needs weight [d_source={d_model}, d_target] and bias [d_target]; "
                f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        self.weight = weight.detach().float().cpu()
        self.bias = bias.detach().float().cpu()
        self.source_site = source_site
        self.target_site = target_site
        self.target = dict(target)
        self.fit = dict(fit)

    def check_target(self, model: HookedModel) -> None:
        """:class:`ModelMismatchError` unless `model` is the target this map was fitted for."""
        actual = model.fingerprint()
        if actual != self.target["fingerprint"]:
            raise ModelMismatchError(
                f"this residual map goes to model {self.target['fingerprint']} ({self.target['model_type']}); "
                f"the given target is {actual} ({model.dims.model_type})"
            )

    def __call__(self, acts: Float[Tensor, "... d_source"]) -> Float[Tensor, "... d_target"]:
        return acts.float() @ self.weight.to(acts.device) + self.bias.to(acts.device)

    def _parts(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"weight": self.weight, "bias": self.bias}, {
            "source_site": self.source_site,
            "target_site": self.target_site,
            "target": self.target,
            "fit": self.fit,
        }

    @classmethod
    def _from_parts(cls, tensors: dict[str, Tensor], config: dict[str, Any], info: dict[str, Any]) -> ResidualMap:
        return cls(
            tensors["weight"],
            tensors["bias"],
            source_site=config["source_site"],
            target_site=config["target_site"],
            target=config["target"],
            fit=config["fit"],
            fingerprint=info["fingerprint"],
            model_type=info["model_type"],
            d_model=int(info["d_model"]),
        )

    def __repr__(self) -> str:
        return (
            f"ResidualMap({self.model_type} {self.source_site} -> {self.target['model_type']} {self.target_site}, "
            f"R^2 {self.fit.get('r2_train', float('nan')):.3f})"
        )


def _rows(model: HookedModel, texts: Sequence[str], site: Site, read: Read) -> tuple[Tensor, Tensor]:
    """Activation rows ``[n, d_model]`` at `site` and the token ids that produced them."""
    batch = model.to_tokens(list(texts), padding_side="right" if read == "tokens" else "left")
    _, cache = model.run_with_cache(batch, [site])
    act = cache[site.name].float()
    # the text's tokens: a BOS the tokenizer adds (Gemma's residual there is 14x a token's) would dominate the fit
    mask = text_mask(model.tokenizer, batch["input_ids"], batch["attention_mask"]).to(act.device).bool()
    if read == "tokens":
        return act[mask], batch["input_ids"].to(act.device)[mask]
    if read == "last":
        return act[:, -1], batch["input_ids"][:, -1]
    weights = mask.float().unsqueeze(-1)
    return (act * weights).sum(1) / weights.sum(1), batch["input_ids"][:, -1]


def _r2(pred: Tensor, y: Tensor) -> float:
    residual = (y - pred).pow(2).sum()
    total = (y - y.mean(0)).pow(2).sum()
    return float(1 - residual / total) if float(total) > 0 else float("nan")


def _texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ConfigError(f"{what} must be a non-empty list of non-empty strings; got {texts!r}")
    return list(texts)


def learn_map(
    source: HookedModel,
    target: HookedModel,
    texts: Sequence[str],
    config: MapConfig,
    *,
    heldout: Sequence[str] | None = None,
) -> ResidualMap:
    """Fit the map from `source`'s ``config.source_site`` to `target`'s ``config.target_site`` on `texts`."""
    source, target = require_hooked(source), require_hooked(target)
    if not isinstance(config, MapConfig):
        raise ConfigError(f"config must be a MapConfig; got {type(config).__name__}")
    s_site, t_site = source.site(config.source_site), target.site(config.target_site)
    train = _texts(texts, "texts")
    held = None if heldout is None else _texts(heldout, "heldout texts")
    x, ids_s = _rows(source, train, s_site, config.read)
    y, ids_t = _rows(target, train, t_site, config.read)
    if config.read == "tokens" and not torch.equal(ids_s.cpu(), ids_t.cpu()):
        raise ConfigError(
            "the two models tokenise the texts differently, so tokens do not pair up; use read='last' or 'mean'"
        )
    n_rows = x.shape[0]
    if n_rows < 2:
        raise ConfigError(f"learn_map needs at least 2 activation rows; the texts gave {n_rows}")
    weight, bias = _solve(x.double(), y.double().to(x.device), config.ridge, config.affine)
    fit = {"r2_train": _r2(x.double() @ weight + bias, y.double().to(x.device)), "n_rows": float(n_rows)}
    if held is not None:
        hx, _ = _rows(source, held, s_site, config.read)
        hy, _ = _rows(target, held, t_site, config.read)
        fit["r2_heldout"] = _r2(hx.double() @ weight + bias, hy.double().to(hx.device))
    return ResidualMap(
        weight.float(),
        bias.float(),
        source_site=s_site.name,
        target_site=t_site.name,
        target=Artifact.model_info(target),
        fit=fit,
        **Artifact.model_info(source),
    )


def _solve(x: Tensor, y: Tensor, ridge: float, affine: bool) -> tuple[Tensor, Tensor]:
    """Ridge least squares ``min ||(x - mx) W - (y - my)||^2 + ridge * n * ||W||^2`` (centred when affine)."""
    mx = x.mean(0) if affine else torch.zeros_like(x[0])
    my = y.mean(0) if affine else torch.zeros_like(y[0])
    xc, yc = x - mx, y - my
    gram = xc.T @ xc + ridge * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    weight = torch.linalg.solve(gram, xc.T @ yc)
    return weight, my - mx @ weight


def _check_map_for(rmap: ResidualMap, artifact: Any, what: str) -> None:
    if not isinstance(rmap, ResidualMap):
        raise ConfigError(f"expected a ResidualMap (learn_map); got {type(rmap).__name__}")
    if artifact.fingerprint != rmap.fingerprint:
        raise ModelMismatchError(
            f"this {what} was made on model {artifact.fingerprint} ({artifact.model_type}); the map starts at "
            f"{rmap.fingerprint} ({rmap.model_type}). Learn a map from the {what}'s own model."
        )


def transfer_vector(vector: SteeringVector, rmap: ResidualMap, target: HookedModel) -> SteeringVector:
    """The steering vector carried to `target` through `rmap` (its direction at the map's source layer)."""
    if not isinstance(vector, SteeringVector):
        raise ConfigError(f"expected a SteeringVector; got {type(vector).__name__}")
    _check_map_for(rmap, vector, "steering vector")
    target = require_hooked(target)
    rmap.check_target(target)
    s_site, t_site = Site.parse(rmap.source_site), Site.parse(rmap.target_site)
    if vector.site != s_site.kind or s_site.layer not in vector.layers:
        raise ConfigError(f"the map reads {s_site.name}; the vector lives at {vector.site} layers {vector.layers}")
    assert s_site.layer is not None
    mapped = vector.at(s_site.layer) @ rmap.weight
    return from_direction(target, mapped, layers=t_site.layer, kind=t_site.kind, method=f"transfer({vector.method})")


def transfer_direction(direction: Direction, rmap: ResidualMap, target: HookedModel) -> Direction:
    """An ablation direction (or subspace) carried to `target` through `rmap` (re-orthonormalised)."""
    if not isinstance(direction, Direction):
        raise ConfigError(f"expected a Direction; got {type(direction).__name__}")
    _check_map_for(rmap, direction, "direction")
    target = require_hooked(target)
    rmap.check_target(target)
    return Direction.from_tensor(target, direction.basis @ rmap.weight, transferred_from=direction.fingerprint)


class TransferResult(Result):
    """``effect [vector]``: the metric change on the target model made by the natively extracted and the
    transferred vector (and the source's own vector on the source); ``effect_ratio`` (0-d): transferred /
    native; ``cosine`` (0-d): between the transferred and the native vector."""

    method = "transfer"

    def default_tensor(self) -> str:
        return "effect"

    @property
    def ratio(self) -> float:
        return float(self["effect_ratio"])


def _effect(
    model: HookedModel, vector: SteeringVector, coefficient: float, prompts: Sequence[str], metric: Metric
) -> float:
    batch = model.to_tokens(list(prompts), padding_side="left")
    with torch.no_grad():
        before = metric(model.forward(batch)).float().mean()
        with steer(model, vector, coefficient):
            after = metric(model.forward(batch)).float().mean()
    return float(after - before)


def transfer_effect(
    source: HookedModel,
    target: HookedModel,
    rmap: ResidualMap,
    positive: Sequence[str],
    negative: Sequence[str],
    prompts: Sequence[str],
    metric: Metric,
    *,
    coefficient: float = 1.0,
) -> TransferResult:
    """Extract a mean-difference vector from `positive` vs `negative` on both models (at the map's sites),
    carry the source's over the map, and compare its effect on `prompts` (left-padded; `metric` of the
    logits) with the target's native vector at the same `coefficient`."""
    source, target = require_hooked(source), require_hooked(target)
    coefficient = check_finite("coefficient", coefficient)
    if not callable(metric):
        raise ConfigError(f"metric must be a function of logits; got {type(metric).__name__}")
    prompts = _texts(prompts, "prompts")
    s_site, t_site = Site.parse(rmap.source_site), Site.parse(rmap.target_site)
    src_vec = mean_difference(source, positive, negative, layers=s_site.layer, kind=s_site.kind)
    native = mean_difference(target, positive, negative, layers=t_site.layer, kind=t_site.kind)
    moved = transfer_vector(src_vec, rmap, target)
    assert t_site.layer is not None
    e_native = _effect(target, native, coefficient, prompts, metric)
    e_moved = _effect(target, moved, coefficient, prompts, metric)
    e_source = _effect(source, src_vec, coefficient, prompts, metric)
    if e_native == 0:
        raise ConfigError("the native vector has no effect on the metric; the effect ratio is undefined")
    a, b = moved.at(t_site.layer), native.at(t_site.layer)
    cosine = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-12))
    return TransferResult(
        tensors={
            "effect": torch.tensor([e_native, e_moved, e_source], dtype=torch.float64),
            "effect_ratio": torch.tensor(e_moved / e_native, dtype=torch.float64),
            "cosine": torch.tensor(cosine, dtype=torch.float64),
        },
        axes={"effect": ("vector",), "effect_ratio": (), "cosine": ()},
        labels={"vector": ["native (target)", "transferred (target)", "source (source)"]},
        config={
            "source": Artifact.model_info(source),
            "target": Artifact.model_info(target),
            "source_site": rmap.source_site,
            "target_site": rmap.target_site,
            "coefficient": coefficient,
            "map_fit": rmap.fit,
            "n_prompts": len(prompts),
        },
    )


__all__ = [
    "MapConfig",
    "ResidualMap",
    "TransferResult",
    "learn_map",
    "transfer_direction",
    "transfer_effect",
    "transfer_vector",
]
