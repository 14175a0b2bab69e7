"""Directional ablation and weight orthogonalisation (Arditi et al. 2024, "Refusal in language
models is mediated by a single direction").

- :func:`directional_ablation`: while active, every residual-stream site (``hook_resid_pre``,
  ``hook_resid_mid`` where it exists, ``hook_resid_post`` of every layer) is replaced by
  ``x - (x . r) r`` for a unit direction ``r``, at every position.
- :func:`orthogonalize`: the permanent version. Every matrix that writes to the residual stream (the
  token and position embeddings, each attention output projection and each MLP output projection,
  and their biases) is replaced by its projection ``(I - r r^T) W``. The residual stream is the sum
  of those writes, so it has no component along ``r`` anywhere, and the model computes exactly what
  the hooked ablation computes -- as a plain ``transformers`` model that ``save_pretrained`` writes.
  Tied embeddings are untied first (the unembedding must stay unchanged). Families with a norm
  after the attention/MLP output (Gemma 2/3, OLMo 2) cannot be orthogonalised exactly and raise.
- :func:`select_direction`: candidates are difference-of-means vectors between `positive` and
  `negative` prompts at each (layer, position from the end); each is scored by the behaviour score on
  `positive` under its ablation (lower is better), the score on `negative` when it is added (it must
  induce the behaviour) and the KL on `negative` under its ablation (it must stay small).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.errors import ConfigError, MechscopeError, ShapeError
from mechscope.locate.results import Result
from mechscope.model.hooks import HookContext, HookFn
from mechscope.sites import Site
from mechscope.steer.intervention import Artifact, Intervention, check_finite, require_hooked
from mechscope.steer.vectors import Steering, from_direction

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

#: A behaviour score from last-position logits, one value per row (higher = more of the behaviour).
ScoreFn = Callable[[Float[Tensor, "batch d_vocab"]], Float[Tensor, " batch"]]
RESID_KINDS: tuple[str, ...] = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


def token_logodds(token_ids: int | Sequence[int]) -> ScoreFn:
    """Score ``log p - log(1 - p)`` where ``p`` is the total probability of `token_ids` (Arditi's
    refusal score with the refusal tokens)."""
    ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
    if not ids:
        raise ConfigError("token_logodds needs at least one token id")

    def score(logits: Tensor) -> Tensor:
        logp = logits.float().log_softmax(-1)
        lp = torch.logsumexp(logp[:, ids], dim=-1).clamp(max=-1e-7)
        return lp - torch.log1p(-lp.exp())

    return score


def unit_direction(direction: Any, d_model: int) -> Float[Tensor, " d_model"]:
    """`direction` (a tensor or :class:`Direction`) as a float32 unit vector; validates its width."""
    vec = direction.vector if isinstance(direction, Direction) else direction
    if not isinstance(vec, Tensor):
        raise ConfigError(f"direction must be a tensor or a Direction; got {type(direction).__name__}")
    if vec.ndim != 1 or vec.shape[0] != d_model:
        raise ShapeError(f"direction must be [d_model]=({d_model},); got {tuple(vec.shape)}")
    vec = vec.detach().float()
    if not bool(torch.isfinite(vec).all()):
        raise ConfigError("direction contains NaN or infinite values")
    norm = vec.norm()
    if float(norm) == 0.0:
        raise ConfigError("direction is the zero vector")
    return vec / norm


class Direction(Artifact):
    """A unit residual-stream direction, tied to the model it was found on."""

    kind = "direction"

    def __init__(
        self,
        vector: Float[Tensor, " d_model"],
        *,
        fingerprint: str,
        model_type: str,
        d_model: int,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(fingerprint=fingerprint, model_type=model_type, d_model=d_model)
        self.vector = unit_direction(vector, d_model).cpu()
        self.info = dict(info or {})

    @classmethod
    def from_tensor(cls, model: HookedModel, vector: Tensor, **info: Any) -> Direction:
        return cls(vector, info=info, **Artifact.model_info(require_hooked(model)))

    def _parts(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"vector": self.vector}, {"info": self.info}

    @classmethod
    def _from_parts(cls, tensors: dict[str, Tensor], config: dict[str, Any], info: dict[str, Any]) -> Direction:
        return cls(
            tensors["vector"],
            info=config.get("info", {}),
            fingerprint=info["fingerprint"],
            model_type=info["model_type"],
            d_model=int(info["d_model"]),
        )

    def __repr__(self) -> str:
        return f"Direction(d_model={self.d_model}, {self.info})"


def _as_unit(model: HookedModel, direction: Direction | Tensor) -> Tensor:
    if isinstance(direction, Direction):
        direction.check_model(model)
    return unit_direction(direction, model.dims.d_model)


class DirectionalAblation(Intervention):
    """Project a direction out of the residual stream at every layer and position while active."""

    kind = "directional_ablation"

    def __init__(self, model: HookedModel, direction: Direction | Tensor) -> None:
        super().__init__(model)
        self.direction = _as_unit(self.model, direction)
        self.sites = [s for s in self.model.sites(list(RESID_KINDS))]

    def hook_plan(self) -> dict[Site, list[HookFn]]:
        r = self.direction

        def project_out(act: Tensor, _ctx: HookContext) -> Tensor:
            rr = r.to(act.device, act.dtype)
            return act - (act @ rr).unsqueeze(-1) * rr

        return {site: [project_out] for site in self.sites}

    def describe(self) -> str:
        return "directional ablation at every residual site"


def directional_ablation(model: HookedModel, direction: Direction | Tensor) -> DirectionalAblation:
    """``with directional_ablation(model, r): ...`` -- the residual stream is kept orthogonal to `r`."""
    return DirectionalAblation(model, direction)


# Weight orthogonalisation ---------------------------------------------------------------------------------
def _project_rows(weight: Tensor, r: Tensor) -> Tensor:
    """``W - (W r) r^T`` for a weight whose last axis is d_model (embeddings, Conv1D [in, out])."""
    w = weight.float()
    return (w - (w @ r).unsqueeze(-1) * r).to(weight.dtype)


def _project_cols(weight: Tensor, r: Tensor) -> Tensor:
    """``W - r (r^T W)`` for a Linear weight [d_model, in]."""
    w = weight.float()
    return (w - r.unsqueeze(-1) * (r @ w).unsqueeze(0)).to(weight.dtype)


def _orthogonalize_writer(module: nn.Module, r: Tensor, conv1d: bool, where: str) -> None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise ConfigError(f"cannot orthogonalise {where}: it has no weight matrix ({type(module).__name__})")
    d = r.shape[0]
    if conv1d:
        if weight.shape[-1] != d:
            raise ShapeError(f"{where}: expected a Conv1D weight [in, {d}]; got {tuple(weight.shape)}")
        weight.copy_(_project_rows(weight, r))
    else:
        if weight.shape[0] != d:
            raise ShapeError(f"{where}: expected a Linear weight [{d}, in]; got {tuple(weight.shape)}")
        weight.copy_(_project_cols(weight, r))
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        bias.copy_(_project_rows(bias, r))


def orthogonalize(model: HookedModel, direction: Direction | Tensor, *, inplace: bool = False) -> HookedModel:
    """A model whose weights never write along `direction` (a copy unless ``inplace``).

    Its logits equal those of ``with directional_ablation(model, direction)`` on the original, and
    ``result.hf_model.save_pretrained(folder)`` writes a model that plain transformers loads.
    """
    from mechscope.model.hooked import HookedModel

    model = require_hooked(model)
    r = _as_unit(model, direction)
    a = model.adapter
    if a.post_attn_norm is not None or a.post_mlp_norm is not None:
        raise ConfigError(
            f"{a.family} applies a norm to the attention/MLP output before the residual add, so no weight change "
            "reproduces directional ablation exactly; use directional_ablation(...) (hooks) instead"
        )
    if model._sessions:
        raise ConfigError("leave every active hook/intervention block before orthogonalising (hooks would be copied)")
    hf = model.hf_model if inplace else copy.deepcopy(model.hf_model)
    r = r.to(model.device)
    with torch.no_grad():
        embed, unembed = hf.get_input_embeddings(), hf.get_output_embeddings()
        if unembed is not None and unembed.weight is embed.weight:
            unembed.weight = nn.Parameter(embed.weight.detach().clone())
            hf.config.tie_word_embeddings = False
            text_config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else None
            if text_config is not None:
                text_config.tie_word_embeddings = False
        embed.weight.copy_(_project_rows(embed.weight, r))
        if a.pos_embed is not None:
            pos = hf.get_submodule(a.pos_embed)
            pos.weight.copy_(_project_rows(pos.weight, r))
        layers = hf.get_submodule(a.layers)
        for i in range(model.dims.n_layers):
            for path in (a.o_proj, a.mlp_down):
                _orthogonalize_writer(layers[i].get_submodule(path), r, a.conv1d, f"layer {i} {path}")
    if inplace:
        model._module_cache.clear()
        return model
    return HookedModel(hf, model.tokenizer, attention_sites=model.attention_base is not None)


# Choosing the direction -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DirectionSelectionConfig:
    """Candidates and filters of :func:`select_direction` (defaults follow Arditi et al.).

    Eligible: KL <= ``max_kl`` and layer < ``max_layer_fraction * n_layers``; with
    ``require_induction=True`` also induction score > 0 (adding the direction to negative prompts
    induces the behaviour); with ``"prefer"``, inducing candidates are kept when there are any.
    Ranking: without ``max_ablation_score`` the eligible candidate with the lowest ablation score
    wins (Arditi et al.); with it, among eligible candidates whose ablation score is at most that
    value ("removes the behaviour well enough"), the one with the lowest KL wins (fewest side effects).
    """

    layers: tuple[int, ...] | None = None
    positions: tuple[int, ...] = (-1,)
    site: str = "hook_resid_pre"
    max_layer_fraction: float = 0.8
    max_kl: float = 0.1
    require_induction: bool | Literal["prefer"] = True
    retain_components: int = 16
    max_ablation_score: float | None = None

    def __post_init__(self) -> None:
        if not self.positions or not all(isinstance(p, int) and p < 0 for p in self.positions):
            raise ConfigError(f"positions count from the end and must be negative ints; got {self.positions!r}")
        if not 0 < self.max_layer_fraction <= 1:
            raise ConfigError(f"max_layer_fraction must be in (0, 1]; got {self.max_layer_fraction}")
        if not self.max_kl > 0:
            raise ConfigError(f"max_kl must be positive; got {self.max_kl}")
        if self.require_induction not in (True, False, "prefer"):
            raise ConfigError(f"require_induction must be True, False or 'prefer'; got {self.require_induction!r}")
        if self.max_ablation_score is not None:
            object.__setattr__(self, "max_ablation_score", check_finite("max_ablation_score", self.max_ablation_score))
        if self.retain_components < 0:
            raise ConfigError(f"retain_components must be >= 0; got {self.retain_components}")
        if self.site not in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"):
            raise ConfigError(f"site must be a residual site kind; got {self.site!r}")


class DirectionSelection(Result):
    """Scores of every candidate direction over (layer, position) and the chosen one.

    Tensors: ``directions`` [layer, position, d_model] (unnormalised mean differences),
    ``ablation_score`` (behaviour on positive prompts under ablation; lower is better),
    ``induction_score`` (behaviour on negative prompts with the direction added),
    ``kl`` (KL on negative prompts under ablation) and ``eligible`` (1 where filters pass).
    ``config["chosen"]`` is ``[layer, position]``.
    """

    method = "direction_selection"

    def default_tensor(self) -> str:
        return "ablation_score"

    @property
    def chosen(self) -> tuple[int, int]:
        layer, position = self.config["chosen"]
        return int(layer), int(position)

    def direction(self, model: HookedModel) -> Direction:
        """The chosen direction as a :class:`Direction` artifact for `model`."""
        layer, position = self.chosen
        li = self.labels["layer"].index(str(layer))
        pi = self.labels["position"].index(str(position))
        info = {"layer": layer, "position": position, "method": "select_direction"}
        return Direction.from_tensor(model, self.tensors["directions"][li, pi], **info)


def _last_logits(model: HookedModel, batch: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model.forward(batch)[:, -1].float()


def _token_logprobs(model: HookedModel, batch: dict[str, Tensor]) -> Tensor:
    """Log-probabilities at every real token of a batch, [n_tokens, d_vocab]."""
    with torch.no_grad():
        logits = model.forward(batch)
    return logits[batch["attention_mask"].to(logits.device).bool()].float().log_softmax(-1)


def _mean_kl(reference: Tensor, new: Tensor) -> float:
    return float((reference.exp() * (reference - new)).sum(-1).mean())


def retain_subspace(model: HookedModel, texts: Sequence[str], site: Site, k: int) -> Float[Tensor, "k d_model"]:
    """Top-`k` principal directions (uncentred) of `site` activations over every token of `texts`."""
    batch = model.to_tokens(list(texts))
    _, cache = model.run_with_cache(batch, site)
    acts = cache[site.name][batch["attention_mask"].to(model.device).bool()].float()
    _, _, vh = torch.linalg.svd(acts, full_matrices=False)
    return vh[: min(k, vh.shape[0])]


def select_direction(
    model: HookedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    score: ScoreFn,
    config: DirectionSelectionConfig | None = None,
    *,
    retain: Sequence[str] | None = None,
) -> DirectionSelection:
    """Arditi et al.'s selection: difference-of-means candidates, scored by ablation, induction and KL.

    With `retain` texts (ordinary text the model must keep handling), each candidate is first made
    orthogonal to the top ``config.retain_components`` principal directions of the retain
    activations at its layer (so ablating it spares what that text uses), and the KL filter is the
    mean next-token KL over every retain token instead of the last token of `negative`.
    """
    model = require_hooked(model)
    cfg = config or DirectionSelectionConfig()
    n = model.dims.n_layers
    layers = list(cfg.layers) if cfg.layers is not None else [x for x in range(n) if x < cfg.max_layer_fraction * n]
    if not layers or any(not 0 <= x < n for x in layers):
        raise ConfigError(f"layers must be a non-empty subset of 0..{n - 1}; got {layers}")
    pos_batch = model.to_tokens(list(positive), padding_side="left")
    neg_batch = model.to_tokens(list(negative), padding_side="left")
    width = min(pos_batch["input_ids"].shape[1], neg_batch["input_ids"].shape[1])
    if any(-p > width for p in cfg.positions):
        raise ConfigError(f"positions {cfg.positions} reach before the start of the shortest prompt ({width} tokens)")
    sites = [Site(cfg.site, layer) for layer in layers]
    positions = list(cfg.positions)
    _, pos_cache = model.run_with_cache(pos_batch, sites, positions=positions)
    _, neg_cache = model.run_with_cache(neg_batch, sites, positions=positions)
    directions = torch.stack([pos_cache[s.name].float().mean(0) - neg_cache[s.name].float().mean(0) for s in sites])
    retain_batch = None
    if retain is not None:
        if isinstance(retain, str) or not retain:
            raise ConfigError(f"retain must be a non-empty list of texts; got {retain!r}")
        retain_batch = model.to_tokens(list(retain))
        if cfg.retain_components > 0:
            for li, site in enumerate(sites):
                basis = retain_subspace(model, retain, site, cfg.retain_components).to(directions.device)
                directions[li] -= (directions[li] @ basis.T) @ basis
        base_retain = _token_logprobs(model, retain_batch)
    base_pos = _last_logits(model, pos_batch)
    base_neg = _last_logits(model, neg_batch)
    ablation = torch.zeros(len(layers), len(positions))
    induction = torch.zeros_like(ablation)
    kl = torch.zeros_like(ablation)
    for li, layer in enumerate(layers):
        for pi in range(len(positions)):
            vec = directions[li, pi]
            if float(vec.norm()) == 0.0:
                ablation[li, pi], induction[li, pi], kl[li, pi] = float("inf"), float("-inf"), float("inf")
                continue
            with DirectionalAblation(model, vec):
                ablation[li, pi] = score(_last_logits(model, pos_batch)).mean()
                if retain_batch is not None:
                    kl[li, pi] = _mean_kl(base_retain, _token_logprobs(model, retain_batch))
                else:
                    kl[li, pi] = _mean_kl(base_neg.log_softmax(-1), _last_logits(model, neg_batch).log_softmax(-1))
            with Steering(model, from_direction(model, vec, layers=layer, site=cfg.site), coefficient=1.0):
                induction[li, pi] = score(_last_logits(model, neg_batch)).mean()
    eligible = kl <= cfg.max_kl
    if cfg.require_induction is True:
        eligible &= induction > 0
    if not bool(eligible.any()):
        raise MechscopeError(
            f"no candidate direction passes the filters (KL <= {cfg.max_kl}"
            + (", induction score > 0" if cfg.require_induction is True else "")
            + f"); best KL {float(kl.min()):.3g}, best induction {float(induction.max()):.3g}. "
            "Loosen max_kl / require_induction or add candidate positions."
        )
    if cfg.max_ablation_score is not None:
        eligible &= ablation <= cfg.max_ablation_score
        if not bool(eligible.any()):
            raise MechscopeError(
                f"no eligible candidate reaches ablation score <= {cfg.max_ablation_score}; "
                f"the lowest is {float(ablation.min()):.3g}. Raise max_ablation_score or add candidates."
            )
    inducing = eligible & (induction > 0)
    if cfg.require_induction == "prefer" and bool(inducing.any()):
        eligible = inducing
    ranked = ablation if cfg.max_ablation_score is None else kl
    masked = torch.where(eligible, ranked, torch.full_like(ranked, float("inf")))
    flat = int(masked.argmin())
    li, pi = divmod(flat, len(positions))
    return DirectionSelection(
        tensors={
            "directions": directions,
            "ablation_score": ablation,
            "induction_score": induction,
            "kl": kl,
            "eligible": eligible.float(),
        },
        axes={
            "directions": ("layer", "position", "d_model"),
            "ablation_score": ("layer", "position"),
            "induction_score": ("layer", "position"),
            "kl": ("layer", "position"),
            "eligible": ("layer", "position"),
        },
        labels={"layer": [str(x) for x in layers], "position": [str(p) for p in positions]},
        config={
            "chosen": [layers[li], positions[pi]],
            "site": cfg.site,
            "max_kl": cfg.max_kl,
            "require_induction": cfg.require_induction,
            "max_ablation_score": cfg.max_ablation_score,
            "baseline_positive_score": float(score(base_pos).mean()),
            "baseline_negative_score": float(score(base_neg).mean()),
            "n_positive": len(positive),
            "n_negative": len(negative),
            "n_retain": 0 if retain is None else len(retain),
            "retain_components": cfg.retain_components if retain is not None else 0,
            "kl_on": "retain tokens" if retain is not None else "last token of negative prompts",
        },
    )


__all__ = [
    "Direction",
    "DirectionSelection",
    "DirectionSelectionConfig",
    "DirectionalAblation",
    "ScoreFn",
    "directional_ablation",
    "orthogonalize",
    "retain_subspace",
    "select_direction",
    "token_logodds",
    "unit_direction",
]
