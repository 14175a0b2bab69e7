"""Choosing a behaviour direction (Arditi et al. 2024): difference-of-means candidates, scored, filtered, chosen.

Candidates are difference-of-means vectors between `positive` and `negative` prompts at each (layer,
position from the end). Each is scored by the behaviour score on `positive` under its ablation (lower
is better), the score on `negative` when it is added (it must induce the behaviour) and the KL under its
ablation (it must stay small). With ``max_rank > 1`` and no single candidate removing the behaviour well
enough, a span of several candidates is grown greedily and the smallest that does is chosen.
:func:`select_direction` reads as its phases: candidates -> orthogonalise against retained directions ->
score -> choose a single direction or a span -> assemble the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, cast

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.direction import Direction
from mechscope.errors import ConfigError, MechscopeError
from mechscope.metrics import kl_div
from mechscope.model.tokens import text_mask
from mechscope.results import Result
from mechscope.sites import Site
from mechscope.steer.directional import DirectionalAblation
from mechscope.steer.intervention import check_finite, require_hooked
from mechscope.steer.vectors import Steering, from_direction

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

#: A behaviour score from last-position logits, one value per row (higher = more of the behaviour).
ScoreFn = Callable[[Float[Tensor, "batch d_vocab"]], Float[Tensor, " batch"]]


class BatchScore(Protocol):
    """A behaviour score that needs the model and the (left-padded) prompt batch, not only the last logits
    -- e.g. :class:`mechscope.improve.refusal.PrefixScore`, the log-odds of a multi-token refusal prefix."""

    needs_model: ClassVar[bool]

    def __call__(self, model: HookedModel, batch: dict[str, Tensor]) -> Float[Tensor, " batch"]: ...


def _behaviour(score: ScoreFn | BatchScore, model: HookedModel, batch: dict[str, Tensor]) -> Tensor:
    """Per-row behaviour of `batch` on `model` as it runs now, for either kind of score."""
    if getattr(score, "needs_model", False):
        return cast("BatchScore", score)(model, batch)
    return cast("ScoreFn", score)(_last_logits(model, batch))


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

    Attributes:
        layers: candidate layers (None: every layer below ``max_layer_fraction`` of the depth).
        positions: candidate positions, counted from the end of each prompt (negative).
        site: the residual site kind the candidates are read at and ablated from.
        max_layer_fraction: candidates must sit below this fraction of the depth.
        max_kl: a candidate's KL on retained prompts when ablated must be at most this.
        require_induction: True, False or "prefer" (see above).
        retain_components: principal directions of the retained prompts' activations the candidates are
            made orthogonal to (protects ordinary behaviour).
        max_ablation_score: rank by KL among candidates whose ablation score is at most this (None: rank
            by ablation score).
        max_rank: with max_ablation_score, the largest span of candidates tried when no single one reaches it.
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
        info: dict[str, Any] = {
            "site": self.config.get("site", "hook_resid_pre"),
            "layer": layer,
            "position": position,
            "method": "select_direction",
        }
        if len(self.members) > 1:
            info["subspace"] = [list(m) for m in self.members]
        return Direction.from_tensor(model, vectors if len(vectors) > 1 else vectors[0], **info)


def _last_logits(model: HookedModel, batch: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model.forward(batch)[:, -1].float()


def _real_token_logits(model: HookedModel, batch: dict[str, Tensor]) -> Tensor:
    """Logits at every real token of a batch, [n_tokens, d_vocab]."""
    with torch.no_grad():
        logits = model.forward(batch)
    return logits[batch["attention_mask"].to(logits.device).bool()].float()


def _mean_kl(reference: Tensor, new: Tensor) -> float:
    """Mean ``KL(reference || new)`` over rows of logits (the shared :func:`mechscope.metrics.kl_div`)."""
    return float(kl_div(new, reference, reduction="mean"))


def retain_subspace(model: HookedModel, texts: Sequence[str], site: Site, k: int) -> Float[Tensor, "k d_model"]:
    """Top-`k` principal directions (uncentred) of `site` activations over every text token of `texts`: the
    BOS a tokenizer adds is left out, as in every token mean (Gemma-3-270M's BOS residual is 14x a text
    token's, so the top components of an uncentred PCA that counts it are spent on the BOS)."""
    batch = model.to_tokens(list(texts))
    _, cache = model.run_with_cache(batch, site)
    text = text_mask(model.tokenizer, batch["input_ids"], batch["attention_mask"])
    acts = cache[site.name][text.to(model.device).bool()].float()
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


@dataclass
class _Candidates:
    """Phase 1's output: the prompts, the (layer, position) grid and one mean-difference vector per cell."""

    layers: list[int]
    positions: list[int]
    sites: list[Site]
    pos_batch: dict[str, Tensor]
    neg_batch: dict[str, Tensor]
    directions: Float[Tensor, "layer position d_model"]


@dataclass
class _Scores:
    ablation: Float[Tensor, "layer position"]
    induction: Float[Tensor, "layer position"]
    kl: Float[Tensor, "layer position"]


def select_direction(
    model: HookedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    score: ScoreFn | BatchScore,
    config: DirectionSelectionConfig | None = None,
    *,
    retain: Sequence[str] | None = None,
    progress: bool = False,
) -> DirectionSelection:
    """Arditi et al.'s selection: difference-of-means candidates, scored by ablation, induction and KL.

    `progress` shows a bar over the candidates being scored (the long phase: three runs per candidate).

    `score` is a :data:`ScoreFn` of the last-position logits, or a :class:`BatchScore` that runs the model
    itself (a multi-token refusal prefix scored whatever the tokenisation: ``improve.refusal.PrefixScore``).
    With `retain` texts (ordinary text the model must keep handling), each candidate is first made
    orthogonal to the top ``config.retain_components`` principal directions of the retain
    activations at its layer (so ablating it spares what that text uses), and the KL filter is the
    mean next-token KL over every retain token instead of the last token of `negative`.
    """
    model = require_hooked(model)
    cfg = config or DirectionSelectionConfig()
    if retain is not None and (isinstance(retain, str) or not retain):
        raise ConfigError(f"retain must be a non-empty list of texts; got {retain!r}")
    cand = _candidates(model, positive, negative, cfg)
    side_effect = _orthogonalise_against_retained(model, cand, cfg, retain)
    scores = _score(model, cand, score, side_effect, cfg, progress=progress)
    eligible, subspace, tried = _choose(model, cand, scores, score, side_effect, cfg)
    return _assemble(model, cand, scores, eligible, subspace, tried, score, cfg, positive, negative, retain)


def _candidates(
    model: HookedModel, positive: Sequence[str], negative: Sequence[str], cfg: DirectionSelectionConfig
) -> _Candidates:
    """Phase 1: mean activation difference (positive - negative) at every (layer, position) cell."""
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
    return _Candidates(layers, positions, sites, pos_batch, neg_batch, directions)


def _orthogonalise_against_retained(
    model: HookedModel, cand: _Candidates, cfg: DirectionSelectionConfig, retain: Sequence[str] | None
) -> Callable[[], float]:
    """Phase 2: with retain texts, remove from each candidate the principal directions those texts use
    (in place). Returns the side-effect measure every later phase uses: mean KL on the retain tokens, or
    on the last token of the negative prompts when there are none."""
    if retain is None:
        base_neg = _last_logits(model, cand.neg_batch)
        return lambda: _mean_kl(base_neg, _last_logits(model, cand.neg_batch))
    retain_batch = model.to_tokens(list(retain))
    if cfg.retain_components > 0:
        for li, site in enumerate(cand.sites):
            basis = retain_subspace(model, retain, site, cfg.retain_components).to(cand.directions.device)
            cand.directions[li] -= (cand.directions[li] @ basis.T) @ basis
    base_retain = _real_token_logits(model, retain_batch)
    return lambda: _mean_kl(base_retain, _real_token_logits(model, retain_batch))


def _score(
    model: HookedModel,
    cand: _Candidates,
    score: ScoreFn | BatchScore,
    side_effect: Callable[[], float],
    cfg: DirectionSelectionConfig,
    *,
    progress: bool = False,
) -> _Scores:
    """Phase 3: each candidate's behaviour under ablation, behaviour induced when added, and side effect."""
    from tqdm.auto import tqdm

    ablation = torch.zeros(len(cand.layers), len(cand.positions))
    induction = torch.zeros_like(ablation)
    kl = torch.zeros_like(ablation)
    cells = [(li, layer, pi) for li, layer in enumerate(cand.layers) for pi in range(len(cand.positions))]
    for li, layer, pi in tqdm(cells, desc="scoring candidate directions", unit="cand", disable=not progress):
        vec = cand.directions[li, pi]
        if float(vec.norm()) == 0.0:
            ablation[li, pi], induction[li, pi], kl[li, pi] = float("inf"), float("-inf"), float("inf")
            continue
        with DirectionalAblation(model, vec):
            ablation[li, pi] = _behaviour(score, model, cand.pos_batch).mean()
            kl[li, pi] = side_effect()
        with Steering(model, from_direction(model, vec, layers=layer, kind=cfg.site), coefficient=1.0):
            induction[li, pi] = _behaviour(score, model, cand.neg_batch).mean()
    return _Scores(ablation, induction, kl)


def _choose(
    model: HookedModel,
    cand: _Candidates,
    scores: _Scores,
    score: ScoreFn | BatchScore,
    side_effect: Callable[[], float],
    cfg: DirectionSelectionConfig,
) -> tuple[Tensor, list[int], list[tuple[float, float]]]:
    """Phase 4: filter, then choose one candidate or grow a span. Returns (eligible mask, flat indices of the
    chosen candidates, (score, KL) of every span tried)."""
    ablation, induction, kl = scores.ablation, scores.induction, scores.kl
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
                        cand.directions,
                        ablation,
                        pool,
                        cfg.max_rank,
                        cfg.max_ablation_score,
                        cfg.max_kl,
                        lambda: _behaviour(score, model, cand.pos_batch).mean(),
                        side_effect,
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
    if not subspace:
        ranked = ablation if cfg.max_ablation_score is None else kl
        masked = torch.where(eligible, ranked, torch.full_like(ranked, float("inf")))
        subspace = [int(masked.argmin())]
    return eligible, subspace, tried


def _assemble(
    model: HookedModel,
    cand: _Candidates,
    scores: _Scores,
    eligible: Tensor,
    subspace: list[int],
    tried: list[tuple[float, float]],
    score: ScoreFn | BatchScore,
    cfg: DirectionSelectionConfig,
    positive: Sequence[str],
    negative: Sequence[str],
    retain: Sequence[str] | None,
) -> DirectionSelection:
    """Phase 5: the result, with every candidate's scores and the chosen member(s)."""
    layers, positions = cand.layers, cand.positions
    li, pi = divmod(subspace[0], len(positions))
    return DirectionSelection(
        tensors={
            "directions": cand.directions,
            "ablation_score": scores.ablation,
            "induction_score": scores.induction,
            "kl": scores.kl,
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
            "baseline_positive_score": float(_behaviour(score, model, cand.pos_batch).mean()),
            "baseline_negative_score": float(_behaviour(score, model, cand.neg_batch).mean()),
            "n_positive": len(positive),
            "n_negative": len(negative),
            "dtype": str(model.dtype).removeprefix("torch."),
            "n_retain": 0 if retain is None else len(retain),
            "retain_components": cfg.retain_components if retain is not None else 0,
            "kl_on": "retain tokens" if retain is not None else "last token of negative prompts",
        },
    )


__all__ = [
    "BatchScore",
    "DirectionSelection",
    "DirectionSelectionConfig",
    "ScoreFn",
    "logodds_bar",
    "retain_subspace",
    "select_direction",
    "token_logodds",
]
