"""Steering vectors: build a direction per layer, then add ``coefficient * vector`` while steering.

Constructors (each returns a :class:`SteeringVector` recording the model's fingerprint):

- :func:`mean_difference` -- contrastive activation addition (CAA, Rimsky et al. 2023):
  ``mean(a(positive)) - mean(a(negative))`` at each chosen layer.
- :func:`pca_direction` -- representation-engineering reading vectors (Zou et al. 2023): the first
  principal direction of the paired differences ``a(pos_i) - a(neg_i)``, signed so that the mean
  difference projects positively and scaled to the mean projection (so coefficients are comparable
  with :func:`mean_difference`).
- :func:`from_direction` -- any direction (a probe's weight, a DLA direction, a refusal direction).

:class:`Steering` applies one at chosen layers and positions: ``"all"``, ``"prompt"`` (forwards that
read the prompt), ``"generated"`` (generation steps after the prompt) or explicit indices of each
forward (negative from the end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.direction import Direction
from mechscope.errors import ConfigError, ShapeError, renamed_keywords
from mechscope.model.hooks import HookContext, HookFn
from mechscope.model.tokens import text_mask
from mechscope.results import Artifact
from mechscope.sites import BLOCK_KINDS, Site
from mechscope.steer.intervention import Intervention, check_finite, require_hooked

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

Read = Literal["last", "mean"]
PositionMode = Literal["all", "prompt", "generated"]
POSITION_MODES: tuple[str, ...] = ("all", "prompt", "generated")
#: Block sites whose last axis is d_model, where a steering vector can be added.
STEERABLE_KINDS: tuple[str, ...] = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
)


def _layers(model: HookedModel, layers: int | Sequence[int] | None) -> list[int]:
    n = model.dims.n_layers
    chosen = list(range(n)) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    if not chosen:
        raise ConfigError("expected at least one layer; got none")
    bad = [layer for layer in chosen if not isinstance(layer, int) or not 0 <= layer < n]
    if bad:
        raise ConfigError(f"layers {bad} do not exist; this model has layers 0..{n - 1}")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"layers must be distinct; got {chosen}")
    return chosen


def _site_kind(model: HookedModel, kind: str) -> str:
    if kind not in STEERABLE_KINDS:
        known = [k for k in BLOCK_KINDS if k in STEERABLE_KINDS]
        raise ConfigError(f"steering sites are residual-width block sites {known}; got {kind!r}")
    model.site(Site(kind, 0))  # e.g. hook_resid_mid does not exist in parallel blocks
    return kind


def read_activations(
    model: HookedModel, texts: Sequence[str], sites: Sequence[Site], *, read: Read = "last"
) -> dict[Site, Float[Tensor, "batch d_model"]]:
    """Each text's activation at `sites`: at its last token, or averaged over its text tokens (the BOS the
    tokenizer adds is left out: :func:`~mechscope.model.tokens.text_mask`)."""
    if isinstance(texts, str) or not texts:
        raise ConfigError(f"expected a non-empty list of texts; got {texts!r}")
    if read not in ("last", "mean"):
        raise ConfigError(f"read must be 'last' or 'mean'; got {read!r}")
    batch = model.to_tokens(list(texts), padding_side="left")
    _, cache = model.run_with_cache(batch, sites)
    mask = text_mask(model.tokenizer, batch["input_ids"], batch["attention_mask"]).to(model.device)  # BOS left out
    out: dict[Site, Tensor] = {}
    for site in sites:
        act = cache[site.name].float()
        if read == "last":
            out[site] = act[:, -1]
        else:
            weights = mask.to(act.dtype).unsqueeze(-1)
            out[site] = (act * weights).sum(1) / weights.sum(1)
    return out


class SteeringVector(Artifact):
    """One direction per chosen layer at one residual-width site kind, tied to its model."""

    kind = "steering_vector"

    def __init__(
        self,
        directions: Float[Tensor, "n_layers d_model"],
        layers: Sequence[int],
        *,
        site: str = "hook_resid_pre",
        method: str = "from_direction",
        fingerprint: str,
        model_type: str,
        d_model: int,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(fingerprint=fingerprint, model_type=model_type, d_model=d_model)
        if directions.ndim != 2 or directions.shape != (len(layers), d_model):
            raise ShapeError(
                f"directions must be [n_layers, d_model] = ({len(layers)}, {d_model}); got {tuple(directions.shape)}"
            )
        if not bool(torch.isfinite(directions).all()):
            raise ConfigError("steering directions contain NaN or infinite values")
        self.directions = directions.detach().float().cpu()
        self.layers = [int(x) for x in layers]
        self.site = site
        self.method = method
        self.info = dict(info or {})

    def at(self, layer: int) -> Float[Tensor, " d_model"]:
        if layer not in self.layers:
            raise ConfigError(f"this steering vector has layers {self.layers}; got {layer}")
        return self.directions[self.layers.index(layer)]

    def norms(self) -> dict[int, float]:
        return {layer: float(self.directions[i].norm()) for i, layer in enumerate(self.layers)}

    def apply(
        self,
        model: HookedModel,
        coefficient: float = 1.0,
        *,
        positions: PositionMode | int | Sequence[int] = "all",
        layers: int | Sequence[int] | None = None,
    ) -> Steering:
        """A :class:`Steering` intervention adding ``coefficient * self`` to `model`."""
        return Steering(model, self, coefficient=coefficient, positions=positions, layers=layers)

    def _parts(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"directions": self.directions}, {
            "layers": self.layers,
            "site": self.site,
            "method": self.method,
            "info": self.info,
        }

    @classmethod
    def _from_parts(cls, tensors: dict[str, Tensor], config: dict[str, Any], info: dict[str, Any]) -> SteeringVector:
        return cls(
            tensors["directions"],
            config["layers"],
            site=config["site"],
            method=config["method"],
            info=config.get("info", {}),
            fingerprint=info["fingerprint"],
            model_type=info["model_type"],
            d_model=int(info["d_model"]),
        )

    def __repr__(self) -> str:
        return f"SteeringVector({self.method}, site={self.site}, layers={self.layers}, d_model={self.d_model})"


def _contrast(
    model: HookedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: int | Sequence[int] | None,
    site: str,
    read: Read,
) -> tuple[list[int], list[Site], dict[Site, Tensor], dict[Site, Tensor]]:
    model = require_hooked(model)
    chosen = _layers(model, layers)
    kind = _site_kind(model, site)
    sites = [Site(kind, layer) for layer in chosen]
    pos = read_activations(model, positive, sites, read=read)
    neg = read_activations(model, negative, sites, read=read)
    return chosen, sites, pos, neg


@renamed_keywords(site="kind")
def mean_difference(
    model: HookedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    layers: int | Sequence[int] | None = None,
    kind: str = "hook_resid_pre",
    read: Read = "last",
) -> SteeringVector:
    """CAA: mean activation on `positive` minus mean on `negative`, per layer (unpaired sets are fine).

    `kind` is the site kind read at each layer (``site=`` is its deprecated spelling)."""
    chosen, sites, pos, neg = _contrast(model, positive, negative, layers, kind, read)
    directions = torch.stack([pos[s].mean(0) - neg[s].mean(0) for s in sites])
    return SteeringVector(
        directions,
        chosen,
        site=kind,
        method="mean_difference",
        info={"n_positive": len(positive), "n_negative": len(negative), "read": read},
        **Artifact.model_info(model),
    )


@renamed_keywords(site="kind")
def pca_direction(
    model: HookedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    layers: int | Sequence[int] | None = None,
    kind: str = "hook_resid_pre",
    read: Read = "last",
    center: bool = False,
) -> SteeringVector:
    """RepE reading vector: first principal direction of paired differences ``pos_i - neg_i``.

    Uncentred by default (the top singular direction of the differences, which keeps the shared
    contrast); ``center=True`` removes the mean difference first (classic PCA). `kind` is the site kind
    read at each layer (``site=`` is its deprecated spelling).
    """
    if len(positive) != len(negative):
        raise ConfigError(
            f"pca_direction pairs positive[i] with negative[i]; got {len(positive)} and {len(negative)} texts"
        )
    if len(positive) < 2:
        raise ConfigError("pca_direction needs at least 2 pairs")
    chosen, sites, pos, neg = _contrast(model, positive, negative, layers, kind, read)
    rows = []
    explained = []
    for s in sites:
        diffs = pos[s] - neg[s]
        centred = diffs - diffs.mean(0) if center else diffs
        _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
        unit = vh[0]
        proj = diffs @ unit
        if float(proj.mean()) < 0:
            unit, proj = -unit, -proj
        rows.append(unit * proj.mean())
        explained.append(float(singular[0] ** 2 / (singular**2).sum()))
    return SteeringVector(
        torch.stack(rows),
        chosen,
        site=kind,
        method="pca",
        info={"n_pairs": len(positive), "read": read, "center": center, "explained_variance": explained},
        **Artifact.model_info(model),
    )


@renamed_keywords(site="kind")
def from_direction(
    model: HookedModel,
    direction: Float[Tensor, " d_model"] | Float[Tensor, "n_layers d_model"] | Direction,
    *,
    layers: int | Sequence[int] | None = None,
    kind: str | None = None,
    normalize: bool = False,
    method: str = "from_direction",
) -> SteeringVector:
    """A steering vector from any direction: one ``[d_model]`` for every layer, or one per layer.

    A rank-1 :class:`~mechscope.direction.Direction` (from a probe, DAS, DLA or direction selection) is
    checked against `model` and, unless `layers` / `kind` are given, steers where it was found (its
    recorded layer and residual site kind; every layer at ``hook_resid_pre`` when it records none).
    ``site=`` is the deprecated spelling of `kind`.
    """
    model = require_hooked(model)
    if isinstance(direction, Direction):
        direction.check_model(model)
        found = Site.parse(direction.site) if direction.site is not None else None
        if found is not None and found.kind in STEERABLE_KINDS:
            kind = kind or found.kind
            layers = found.layer if layers is None else layers
        direction = direction.vector
    kind = kind or "hook_resid_pre"
    chosen = _layers(model, layers)
    _site_kind(model, kind)
    d_model = model.dims.d_model
    if not isinstance(direction, Tensor):
        raise ConfigError(f"direction must be a tensor; got {type(direction).__name__}")
    vec = direction.detach().float().cpu()
    if vec.ndim == 1:
        vec = vec.unsqueeze(0).expand(len(chosen), -1)
    if vec.ndim != 2 or vec.shape[-1] != d_model or vec.shape[0] != len(chosen):
        raise ShapeError(
            f"direction must be [d_model]=({d_model},) or [n_layers, d_model]=({len(chosen)}, {d_model}); "
            f"got {tuple(direction.shape)}"
        )
    if normalize:
        norms = vec.norm(dim=-1, keepdim=True)
        if bool((norms == 0).any()):
            raise ConfigError("cannot normalise a zero direction")
        vec = vec / norms
    return SteeringVector(vec.clone(), chosen, site=kind, method=method, **Artifact.model_info(model))


class Steering(Intervention):
    """Add ``coefficient * vector[layer]`` at the vector's site of the chosen layers and positions."""

    kind = "steering"

    def __init__(
        self,
        model: HookedModel,
        vector: SteeringVector,
        *,
        coefficient: float = 1.0,
        positions: PositionMode | int | Sequence[int] = "all",
        layers: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__(model)
        if not isinstance(vector, SteeringVector):
            raise ConfigError(f"expected a SteeringVector; got {type(vector).__name__}")
        self.coefficient = check_finite("coefficient", coefficient)
        vector.check_model(self.model)
        self.vector = vector
        self.layers = vector.layers if layers is None else _layers(self.model, layers)
        missing = [layer for layer in self.layers if layer not in vector.layers]
        if missing:
            raise ConfigError(f"the steering vector has no direction for layers {missing}; it has {vector.layers}")
        zero = [layer for layer in self.layers if not bool(vector.at(layer).any())]
        if zero:
            raise ConfigError(
                f"the steering vector is the zero vector at layers {zero}: steering by it changes nothing; expected a "
                "non-zero direction (were the positive and negative texts the same?)"
            )
        if isinstance(positions, str):
            if positions not in POSITION_MODES:
                raise ConfigError(f"positions must be one of {POSITION_MODES} or indices; got {positions!r}")
            self.mode: str = positions
            self.indices: tuple[int, ...] | None = None
        else:
            seq = (positions,) if isinstance(positions, int) else tuple(positions)
            if not seq or not all(isinstance(p, int) and not isinstance(p, bool) for p in seq):
                raise ConfigError(f"positions must be a mode {POSITION_MODES} or a list of ints; got {positions!r}")
            self.mode, self.indices = "indices", seq

    def _hook(self, layer: int) -> HookFn:
        delta = self.coefficient * self.vector.at(layer)

        def fn(act: Tensor, ctx: HookContext) -> Tensor | None:
            if self.mode in ("prompt", "generated") and self.phase != self.mode:
                return None
            add = delta.to(act.device, act.dtype)
            if self.indices is None:
                return act + add
            n = act.shape[1]
            rows = self.row_positions(self.indices, n)
            if rows is not None:  # a padded batch: each row's own positions
                return torch.where(rows.to(act.device)[..., None], act + add, act)
            idx = sorted({p % n for p in self.indices if -n <= p < n})
            out = act.clone()
            out[:, idx] = out[:, idx] + add
            return out

        return fn

    def hook_plan(self) -> dict[Site, list[HookFn]]:
        return {Site(self.vector.site, layer): [self._hook(layer)] for layer in self.layers}

    def describe(self) -> str:
        where = self.mode if self.indices is None else f"positions {list(self.indices)}"
        return f"steer {self.vector.method} x{self.coefficient:g} at {self.vector.site} layers {self.layers} ({where})"


def steer(
    model: HookedModel,
    vector: SteeringVector | Direction,
    coefficient: float = 1.0,
    *,
    positions: PositionMode | int | Sequence[int] = "all",
    layers: int | Sequence[int] | None = None,
) -> Steering:
    """Steering intervention: ``with steer(model, vec, 4.0): model.generate(...)``.

    A :class:`~mechscope.direction.Direction` steers along its unit vector where it was found (see
    :func:`from_direction`), so `coefficient` is then in residual-stream units."""
    if isinstance(vector, Direction):
        vector = from_direction(model, vector, layers=layers, method=f"direction ({vector.method or 'given'})")
    return Steering(model, vector, coefficient=coefficient, positions=positions, layers=layers)


__all__ = [
    "POSITION_MODES",
    "STEERABLE_KINDS",
    "Steering",
    "SteeringVector",
    "from_direction",
    "mean_difference",
    "pca_direction",
    "read_activations",
    "steer",
]
