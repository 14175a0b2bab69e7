"""Directional ablation and weight orthogonalisation (Arditi et al. 2024, "Refusal in language
models is mediated by a single direction"), for one direction or a low-rank subspace.

A :class:`Direction` holds an orthonormal basis ``B`` [k, d_model]; ``k = 1`` is Arditi's single
direction ``r``. Some models spread a behaviour over a few directions (refusal "concept cones",
Wollschläger et al. 2025); for them ``k > 1`` projects out the span of several candidates.

- :func:`directional_ablation`: while active, every residual-stream site (``hook_resid_pre``,
  ``hook_resid_mid`` where it exists, ``hook_resid_post`` of every layer) is replaced by
  ``x - (x B^T) B`` (``x - (x . r) r`` for one direction), at every position.
- :func:`orthogonalize`: the permanent version. Every matrix that writes to the residual stream (the
  token and position embeddings, each attention output projection and each MLP output projection,
  and their biases) is replaced by its projection ``(I - B^T B) W``. The residual stream is the sum
  of those writes, so it has no component in the span of ``B`` anywhere, and the model computes exactly what
  the hooked ablation computes -- as a plain ``transformers`` model that ``save_pretrained`` writes.
  Tied embeddings are untied first (the unembedding must stay unchanged). Families with a norm
  after the attention/MLP output (Gemma 2/3, OLMo 2) cannot be orthogonalised exactly and raise.
- :func:`select_direction`: candidates are difference-of-means vectors between `positive` and
  `negative` prompts at each (layer, position from the end); each is scored by the behaviour score on
  `positive` under its ablation (lower is better), the score on `negative` when it is added (it must
  induce the behaviour) and the KL on `negative` under its ablation (it must stay small). With
  ``max_rank > 1`` and no single candidate removing the behaviour well enough, the span of the best
  2, 3, ... candidates is tried, and the smallest that does is chosen.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.errors import ConfigError, MechscopeError, ShapeError
from mechscope.model.hooks import HookContext, HookFn
from mechscope.results import Artifact, Result
from mechscope.sites import Site
from mechscope.steer.intervention import Intervention, check_finite, require_hooked
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


def logodds_bar(probability: float) -> float:
    """``log(p / (1 - p))``: the :func:`token_logodds` score of a behaviour probability `p`, so
    ``max_ablation_score=logodds_bar(0.1)`` asks that ablation leave about a 10 % behaviour probability."""
    if not 0.0 < probability < 1.0:
        raise ConfigError(f"probability must be in (0, 1); got {probability!r}")
    return math.log(probability / (1.0 - probability))


def orthonormal_basis(vectors: Any, d_model: int) -> Float[Tensor, "k d_model"]:
    """`vectors` ([d_model] or [k, d_model], or a :class:`Direction`) as an orthonormal float32 basis of
    their span, in their order (Gram-Schmidt by QR; signs follow the inputs). Validates width and rank."""
    if isinstance(vectors, Direction):
        return vectors.basis
    if not isinstance(vectors, Tensor):
        raise ConfigError(f"direction must be a tensor or a Direction; got {type(vectors).__name__}")
    if vectors.ndim == 1:
        return unit_direction(vectors, d_model).unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[1] != d_model or not 1 <= vectors.shape[0] <= d_model:
        raise ShapeError(
            f"directions must be [d_model]=({d_model},) or [k, d_model]=(k, {d_model}); got {tuple(vectors.shape)}"
        )
    rows = vectors.detach().float()
    if not bool(torch.isfinite(rows).all()):
        raise ConfigError("directions contain NaN or infinite values")
    q, r = torch.linalg.qr(rows.T)
    diag = r.diagonal()
    if bool((diag.abs() <= 1e-6 * rows.norm(dim=1).clamp(min=1e-30)).any()):
        raise ConfigError(f"the {rows.shape[0]} directions are linearly dependent (a zero or repeated direction)")
    return (q * diag.sign()).T.contiguous()


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
    """A residual-stream direction (rank 1) or subspace (rank k), tied to the model it was found on.

    ``basis`` [k, d_model] is orthonormal; ``vector`` is the unit direction of a rank-1 Direction.
    """

    kind = "direction"

    def __init__(
        self,
        vectors: Float[Tensor, " d_model"] | Float[Tensor, "k d_model"],
        *,
        fingerprint: str,
        model_type: str,
        d_model: int,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(fingerprint=fingerprint, model_type=model_type, d_model=d_model)
        self.basis = orthonormal_basis(vectors, d_model).cpu()
        self.info = dict(info or {})

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    @property
    def vector(self) -> Float[Tensor, " d_model"]:
        """The unit direction (rank 1 only: a subspace has no single vector)."""
        if self.rank != 1:
            raise ConfigError(f"this Direction spans {self.rank} dimensions and has no single vector; use .basis")
        return self.basis[0]

    @classmethod
    def from_tensor(cls, model: HookedModel, vectors: Tensor, **info: Any) -> Direction:
        return cls(vectors, info=info, **Artifact.model_info(require_hooked(model)))

    def _parts(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"basis": self.basis}, {"info": self.info}

    @classmethod
    def _from_parts(cls, tensors: dict[str, Tensor], config: dict[str, Any], info: dict[str, Any]) -> Direction:
        vectors = tensors.get("basis", tensors.get("vector"))  # "vector": rank-1 files written before subspaces
        if vectors is None:
            raise ConfigError(f"expected a 'basis' (or 'vector') tensor in a direction file; got {sorted(tensors)}")
        return cls(
            vectors,
            info=config.get("info", {}),
            fingerprint=info["fingerprint"],
            model_type=info["model_type"],
            d_model=int(info["d_model"]),
        )

    def __repr__(self) -> str:
        return f"Direction(d_model={self.d_model}, rank={self.rank}, {self.info})"


def _as_basis(model: HookedModel, direction: Direction | Tensor) -> Float[Tensor, "k d_model"]:
    if isinstance(direction, Direction):
        direction.check_model(model)
    return orthonormal_basis(direction, model.dims.d_model)


class DirectionalAblation(Intervention):
    """Project a direction (or subspace) out of the residual stream at every layer and position."""

    kind = "directional_ablation"

    def __init__(self, model: HookedModel, direction: Direction | Tensor) -> None:
        super().__init__(model)
        self.basis = _as_basis(self.model, direction)
        self.sites = [s for s in self.model.sites(list(RESID_KINDS))]

    def hook_plan(self) -> dict[Site, list[HookFn]]:
        basis = self.basis

        def project_out(act: Tensor, _ctx: HookContext) -> Tensor:
            b = basis.to(act.device, act.dtype)
            return act - (act @ b.T) @ b

        return {site: [project_out] for site in self.sites}

    def describe(self) -> str:
        what = "directional ablation" if self.basis.shape[0] == 1 else f"rank-{self.basis.shape[0]} subspace ablation"
        return f"{what} at every residual site"


def directional_ablation(model: HookedModel, direction: Direction | Tensor) -> DirectionalAblation:
    """``with directional_ablation(model, r): ...`` -- the residual stream is kept orthogonal to `r`
    (a [d_model] direction, a [k, d_model] set of directions, or a :class:`Direction`)."""
    return DirectionalAblation(model, direction)


# Weight orthogonalisation ---------------------------------------------------------------------------------
def _project_rows(weight: Tensor, basis: Tensor) -> Tensor:
    """``W - (W B^T) B`` for a weight whose last axis is d_model (embeddings, Conv1D [in, out])."""
    w = weight.float()
    return (w - (w @ basis.T) @ basis).to(weight.dtype)


def _project_cols(weight: Tensor, basis: Tensor) -> Tensor:
    """``W - B^T (B W)`` for a Linear weight [d_model, in]."""
    w = weight.float()
    return (w - basis.T @ (basis @ w)).to(weight.dtype)


def _orthogonalize_writer(module: nn.Module, r: Tensor, conv1d: bool, where: str) -> None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise ConfigError(f"cannot orthogonalise {where}: it has no weight matrix ({type(module).__name__})")
    d = r.shape[-1]
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
    """A model whose weights never write along `direction` or in its subspace (a copy unless ``inplace``).

    Its logits equal those of ``with directional_ablation(model, direction)`` on the original, and
    ``result.hf_model.save_pretrained(folder)`` writes a model that plain transformers loads.
    """
    from mechscope.model.hooked import HookedModel

    model = require_hooked(model)
    r = _as_basis(model, direction)
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
    Subspaces: with ``max_ablation_score`` and ``max_rank > 1``, when no single candidate reaches the
    bar, a span is grown greedily from the best candidate (each step adds the eligible candidate whose
    addition lowers the span's ablation score most, up to ``max_rank``), and the first span that reaches
    the bar with KL <= ``max_kl`` is chosen;
    with ``"prefer"`` the spans of inducing candidates are tried first, then those of every eligible one
    (a single inducing candidate that does not reach the bar must not block a span that does).
    """

    layers: tuple[int, ...] | None = None
    positions: tuple[int, ...] = (-1,)
    site: str = "hook_resid_pre"
    max_layer_fraction: float = 0.8
    max_kl: float = 0.1
    require_induction: bool | Literal["prefer"] = True
    retain_components: int = 16
    max_ablation_score: float | None = None
    max_rank: int = 1

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
        if not isinstance(self.max_rank, int) or self.max_rank < 1:
            raise ConfigError(f"max_rank must be an int >= 1; got {self.max_rank!r}")
        if self.max_rank > 1 and self.max_ablation_score is None:
            raise ConfigError("max_rank > 1 needs max_ablation_score (the bar a subspace must reach)")
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
    ``config["chosen"]`` is ``[layer, position]`` of the chosen (or first) candidate;
    ``config["subspace"]`` lists the ``[layer, position]`` of every candidate whose span is ablated
    (one for a single direction), ``config["subspace_scores"]`` / ``["subspace_kl"]`` the ablation
    score and KL of the spans of the best 1, 2, ... candidates that were tried.
    """

    method = "direction_selection"

    def default_tensor(self) -> str:
        return "ablation_score"

    @property
    def chosen(self) -> tuple[int, int]:
        layer, position = self.config["chosen"]
        return int(layer), int(position)

    @property
    def members(self) -> list[tuple[int, int]]:
        """``(layer, position)`` of every candidate the chosen direction or subspace spans."""
        return [(int(layer), int(pos)) for layer, pos in self.config.get("subspace", [self.config["chosen"]])]

    def describe_members(self) -> str:
        """``"layer L, position P"`` of each member, joined by ``"; "`` (for reports and the CLI)."""
        return "; ".join(f"layer {layer}, position {position}" for layer, position in self.members)

    def direction(self, model: HookedModel) -> Direction:
        """The chosen direction (or the span of the chosen candidates) as a :class:`Direction` for `model`."""
        vectors = torch.stack(
            [
                self.tensors["directions"][
                    self.labels["layer"].index(str(layer)), self.labels["position"].index(str(pos))
                ]
                for layer, pos in self.members
            ]
        )
        layer, position = self.chosen
        info: dict[str, Any] = {"layer": layer, "position": position, "method": "select_direction"}
        if len(self.members) > 1:
            info["subspace"] = [list(m) for m in self.members]
        return Direction.from_tensor(model, vectors if len(vectors) > 1 else vectors[0], **info)


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


def _smallest_subspace(
    model: HookedModel,
    directions: Tensor,
    ablation: Tensor,
    eligible: Tensor,
    max_rank: int,
    bar: float,
    max_kl: float,
    behaviour: Callable[[], Tensor],
    side_effect: Callable[[], float],
) -> tuple[list[int], list[tuple[float, float]]]:
    """Flat indices of the fewest eligible candidates (at most `max_rank`) whose span, ablated, scores <= `bar`
    with KL <= `max_kl`, chosen greedily; and (score, KL) of every span tried.

    Greedy forward selection: start from the candidate with the lowest ablation score, then add, one at a time,
    the candidate whose addition lowers the span's score most. (Taking the next-best candidates by their own
    scores is not enough: on organism-gpt2 v4 adding the second-best single direction brings refusal back.)"""
    flat_dirs = directions.flatten(0, 1)
    pool = [int(i) for i in ablation.flatten().argsort() if bool(eligible.flatten()[i])]
    chosen = pool[:1]
    tried: list[tuple[float, float]] = [(float(ablation.flatten()[pool[0]]), float("nan"))]
    while len(chosen) < min(max_rank, len(pool)):
        scored: list[tuple[float, int]] = []
        for i in pool:
            if i not in chosen:
                with DirectionalAblation(model, flat_dirs[[*chosen, i]]):
                    scored.append((float(behaviour()), i))
        value, best = min(scored)
        chosen.append(best)
        with DirectionalAblation(model, flat_dirs[chosen]):
            kl = side_effect()
        tried.append((value, kl))
        if value <= bar and kl <= max_kl:
            return chosen, tried
    lowest = min(t[0] for t in tried)
    raise MechscopeError(
        f"no eligible candidate, nor a greedily grown span of up to {len(tried)}, reaches ablation score <= "
        f"{bar} with KL <= {max_kl}; the lowest is {lowest:.3g}. Raise max_ablation_score or max_rank, or add "
        "candidates."
    )


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

    def prefer_inducing(mask: Tensor) -> Tensor:
        """With ``require_induction="prefer"``, the inducing candidates of `mask` when there are any."""
        inducing = mask & (induction > 0)
        return inducing if cfg.require_induction == "prefer" and bool(inducing.any()) else mask

    subspace: list[int] = []
    tried: list[tuple[float, float]] = []
    if cfg.max_ablation_score is None:
        eligible = prefer_inducing(eligible)
    else:
        reaching = eligible & (ablation <= cfg.max_ablation_score)
        if bool(reaching.any()):
            eligible = prefer_inducing(reaching)
        elif cfg.max_rank > 1:
            pools = [prefer_inducing(eligible)]
            if not torch.equal(pools[0], eligible):
                pools.append(eligible)
            for n, pool in enumerate(pools):
                try:
                    subspace, tried = _smallest_subspace(
                        model,
                        directions,
                        ablation,
                        pool,
                        cfg.max_rank,
                        cfg.max_ablation_score,
                        cfg.max_kl,
                        lambda: score(_last_logits(model, pos_batch)).mean(),
                        lambda: (
                            _mean_kl(base_retain, _token_logprobs(model, retain_batch))
                            if retain_batch is not None
                            else _mean_kl(base_neg.log_softmax(-1), _last_logits(model, neg_batch).log_softmax(-1))
                        ),
                    )
                    break
                except MechscopeError:
                    if n == len(pools) - 1:
                        raise
        else:
            raise MechscopeError(
                f"no eligible candidate reaches ablation score <= {cfg.max_ablation_score}; "
                f"the lowest is {float(ablation.min()):.3g}. Raise max_ablation_score, add candidates "
                "or allow a subspace (max_rank > 1)."
            )
    if subspace:
        li, pi = divmod(subspace[0], len(positions))
    else:
        ranked = ablation if cfg.max_ablation_score is None else kl
        masked = torch.where(eligible, ranked, torch.full_like(ranked, float("inf")))
        li, pi = divmod(int(masked.argmin()), len(positions))
        subspace = [li * len(positions) + pi]
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
            "subspace": [[layers[i // len(positions)], positions[i % len(positions)]] for i in subspace],
            "subspace_scores": [t[0] for t in tried],
            "subspace_kl": [t[1] for t in tried],
            "max_rank": cfg.max_rank,
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
    "logodds_bar",
    "orthogonalize",
    "orthonormal_basis",
    "retain_subspace",
    "select_direction",
    "token_logodds",
    "unit_direction",
]
