"""SAE evaluations beyond reconstruction, in the spirit of the SAE evaluation suites.

- :func:`ground_truth_match`: for data built from a known dictionary of planted directions, the mean over
  planted directions of their best cosine with a decoder row (MMCS) and the fraction matched above a
  cosine threshold -- the synthetic check that an architecture recovers what is there.
- :func:`feature_density`: how often each feature fires; dead (never) and dense (on more than
  ``dense_threshold`` of tokens) fractions.
- :func:`sparse_probing`: a known binary attribute of the tokens probed with the ``k`` features whose mean
  activation differs most between the classes, against a dense logistic probe on the raw activations.
  Both are reported: dense probes often win, and the gap is the point.
- :func:`absorption`: the attribute's main feature (decoder most aligned with the dense probe) and the
  share of tokens with the attribute where that feature is silent while the SAE's reconstruction still
  carries the attribute -- the attribute was absorbed into other features (Chanin et al. 2024).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ShapeError
from mechscope.features.sae import SparseAutoencoder


@torch.no_grad()
def ground_truth_match(
    sae: SparseAutoencoder, true: Float[Tensor, "n_true d"], threshold: float = 0.9
) -> dict[str, float]:
    """``mmcs`` (mean max cosine of each planted direction with the decoder rows) and ``matched_fraction``."""
    if true.ndim != 2 or true.shape[1] != sae.config.width_out:
        raise ShapeError(f"expected planted directions [n, {sae.config.width_out}], got {tuple(true.shape)}")
    t = true.float() / true.float().norm(dim=-1, keepdim=True)
    w = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    best = (t @ w.T).max(-1).values
    return {"mmcs": float(best.mean()), "matched_fraction": float((best >= threshold).float().mean())}


@torch.no_grad()
def feature_density(
    sae: SparseAutoencoder,
    activations: Float[Tensor, "tokens d_in"],
    *,
    dense_threshold: float = 0.1,
    batch_size: int = 4096,
) -> dict[str, float | list[float]]:
    """Firing frequency per feature, ``dead_fraction`` and ``dense_fraction``."""
    counts = torch.zeros(sae.config.d_sae)
    for start in range(0, activations.shape[0], batch_size):
        counts += (sae.encode(activations[start : start + batch_size]) > 0).sum(0).float()
    freq = counts / max(1, activations.shape[0])
    return {
        "dead_fraction": float((freq == 0).float().mean()),
        "dense_fraction": float((freq > dense_threshold).float().mean()),
        "frequencies": freq.tolist(),
    }


def _fit_logistic(x: Tensor, y: Tensor, steps: int = 100, l2: float = 1e-3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(weights, bias, mean, std) of an L2-regularised logistic regression on standardised `x`."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), mean, std


def _accuracy(params: tuple[Tensor, Tensor, Tensor, Tensor], x: Tensor, y: Tensor) -> float:
    w, b, mean, std = params
    return float((((x - mean) / std @ w + b > 0).float() == y).float().mean())


def _split(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(n * (1 - test_fraction))
    return perm[:cut], perm[cut:]


def _check(activations: Tensor, labels: Tensor, d_in: int) -> Tensor:
    if activations.ndim != 2 or activations.shape[1] != d_in:
        raise ShapeError(f"expected activations [tokens, {d_in}], got {tuple(activations.shape)}")
    if labels.shape != (activations.shape[0],) or not set(labels.unique().tolist()) <= {0, 1}:
        raise ShapeError(f"expected 0/1 labels of shape [{activations.shape[0]}], got {tuple(labels.shape)}")
    if labels.float().mean() in (0.0, 1.0):
        raise ShapeError("expected both classes among the labels")
    return labels.float()


@torch.no_grad()
def sparse_probing(
    sae: SparseAutoencoder,
    activations: Float[Tensor, "tokens d_in"],
    labels: Tensor,
    *,
    ks: Sequence[int] = (1, 2, 5, 20),
    test_fraction: float = 0.3,
    seed: int = 0,
) -> dict[str, float | list[int]]:
    """Held-out accuracy of probes on the top-``k`` features (``k1``, ``k2``...) and of a dense probe on
    the raw activations (``dense``); ``features``: the top features by class mean difference."""
    y = _check(activations, labels, sae.config.d_in)
    x = activations.float()
    train, test = _split(x.shape[0], test_fraction, seed)
    f = sae.encode(x)
    diff = (f[train][y[train] == 1].mean(0) - f[train][y[train] == 0].mean(0)).abs()
    order = diff.argsort(descending=True)
    out: dict[str, float | list[int]] = {"features": order[: max(ks)].tolist()}
    for k in ks:
        chosen = order[:k]
        out[f"k{k}"] = _accuracy(_fit_logistic(f[train][:, chosen], y[train]), f[test][:, chosen], y[test])
    out["dense"] = _accuracy(_fit_logistic(x[train], y[train]), x[test], y[test])
    return out


@torch.no_grad()
def absorption(
    sae: SparseAutoencoder, activations: Float[Tensor, "tokens d_in"], labels: Tensor, *, seed: int = 0
) -> dict[str, float | int]:
    """``main_feature``, its cosine with the dense probe, and ``absorption_rate``: among tokens with the
    attribute that the dense probe classifies correctly, the share where the main feature is silent but the
    SAE's reconstruction is still classified positive by the probe."""
    y = _check(activations, labels, sae.config.d_in)
    x = activations.float()
    w, b, mean, std = _fit_logistic(x, y)
    direction = w / std  # the probe in raw activation coordinates: logit = x . direction + const
    const = b - (mean / std) @ w
    cos = (sae.W_dec.detach() @ direction) / (sae.W_dec.detach().norm(dim=-1) * direction.norm())
    main = int(cos.argmax())
    recon, f = sae(x)
    positive = (y == 1) & (x @ direction + const > 0)
    silent = positive & (f[:, main] <= 0)
    carried = silent & (recon @ direction + const > 0)
    n_pos = int(positive.sum())
    return {
        "main_feature": main,
        "main_cosine": float(cos[main]),
        "absorption_rate": float(carried.sum()) / max(1, n_pos),
        "silent_rate": float(silent.sum()) / max(1, n_pos),
        "positives": n_pos,
    }


__all__ = ["absorption", "feature_density", "ground_truth_match", "sparse_probing"]
