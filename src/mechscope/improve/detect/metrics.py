"""Detection metrics on scores: ROC curve, AUROC, recall at a false-positive rate, calibration error,
and stratified bootstrap intervals. Pure functions of two score vectors (class 1 = should alert).

Ties are handled exactly: AUROC is the Mann-Whitney probability ``P(s+ > s-) + P(s+ = s-) / 2``, and a
threshold alerts on scores strictly above it, so ``recall_at_fpr`` never exceeds the requested rate on
the negatives it was read from.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError


def _scores(name: str, values: Tensor | list[float]) -> Tensor:
    out = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if out.numel() == 0:
        raise ConfigError(f"{name} scores are empty; expected at least one score")
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise ConfigError(f"{name} scores contain {bad} NaN or infinite values; a detector must give finite scores")
    return out


def auroc(positive: Float[Tensor, " n1"], negative: Float[Tensor, " n0"]) -> float:
    """Area under the ROC curve: ``P(s+ > s-) + P(s+ = s-) / 2`` (Mann-Whitney U / (n1 n0))."""
    pos, neg = _scores("positive", positive), _scores("negative", negative)
    both = torch.cat([pos, neg])
    ranks = _average_ranks(both)
    n1, n0 = len(pos), len(neg)
    u = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2
    return u / (n1 * n0)


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks, tied values sharing their average rank."""
    sorted_x, order = torch.sort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(x)
    ranks[order] = average[inverse]
    return ranks


def roc_curve(positive: Tensor, negative: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(false-positive rates, true-positive rates, thresholds), from (0, 0) to (1, 1).

    Each point alerts on scores strictly above its threshold; the first threshold is ``+inf``.
    """
    pos, neg = _scores("positive", positive), _scores("negative", negative)
    thresholds = torch.cat([torch.tensor([math.inf], dtype=torch.float64), torch.cat([pos, neg]).unique().flip(0)])
    # alert iff score > t; for t = each distinct value (descending), plus -inf to reach (1, 1)
    cuts = torch.cat([thresholds, torch.tensor([-math.inf], dtype=torch.float64)])
    tpr = (pos[None, :] > cuts[:, None]).double().mean(1)
    fpr = (neg[None, :] > cuts[:, None]).double().mean(1)
    return fpr, tpr, cuts


def threshold_at_fpr(negative: Tensor, fpr: float) -> float:
    """The lowest threshold whose alert rate (scores strictly above it) on `negative` is <= `fpr`."""
    neg = _scores("negative", negative)
    if not 0 < fpr < 1:
        raise ConfigError(f"fpr must be in (0, 1); got {fpr}")
    desc = neg.sort(descending=True).values
    k = math.floor(fpr * len(desc) + 1e-9)  # alerts allowed
    if k >= len(desc):
        return float(desc[-1]) - 1.0
    t = float(desc[k])
    return t


def recall_at_fpr(positive: Tensor, negative: Tensor, fpr: float) -> float:
    """Recall on `positive` at the threshold that gives at most `fpr` false alerts on `negative`."""
    pos = _scores("positive", positive)
    return float((pos > threshold_at_fpr(negative, fpr)).double().mean())


def expected_calibration_error(probability: Tensor, label: Tensor, bins: int = 10) -> float:
    """ECE: the bin-size-weighted mean ``|accuracy - confidence|`` over `bins` equal-width probability bins,
    with confidence the predicted probability of class 1 and accuracy the share of class-1 labels."""
    p = _scores("probability", probability)
    y = torch.as_tensor(label, dtype=torch.float64).reshape(-1)
    if y.shape != p.shape:
        raise ConfigError(f"expected one label per probability ({len(p)}); got {len(y)}")
    if bool(((p < 0) | (p > 1)).any()):
        raise ConfigError("probabilities must lie in [0, 1]")
    index = torch.clamp((p * bins).long(), max=bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if bool(mask.any()):
            total += float(mask.double().mean()) * abs(float(y[mask].mean()) - float(p[mask].mean()))
    return total


def bootstrap_interval(
    statistic: Callable[[Tensor, Tensor], float],
    positive: Tensor,
    negative: Tensor,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of `statistic(positive, negative)` over stratified bootstrap resamples
    (each class resampled with replacement at its own size)."""
    if n_boot < 2:
        raise ConfigError(f"n_boot must be >= 2; got {n_boot}")
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1); got {level}")
    pos, neg = _scores("positive", positive), _scores("negative", negative)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_boot):
        p = pos[torch.randint(len(pos), (len(pos),), generator=gen)]
        n = neg[torch.randint(len(neg), (len(neg),), generator=gen)]
        values.append(statistic(p, n))
    v = torch.tensor(values, dtype=torch.float64)
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return math.nan, math.nan
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return float(v.quantile(lo)), float(v.quantile(hi))


__all__ = [
    "auroc",
    "bootstrap_interval",
    "expected_calibration_error",
    "recall_at_fpr",
    "roc_curve",
    "threshold_at_fpr",
]
