"""Detectors: a model's activations on a text -> one score per token, pooled to one score per text.

Three kinds, each an :class:`~mechscope.results.Artifact` (safetensors + JSON with the model's fingerprint,
its sites, pooling, threshold and a description of its training data):

- ``probe``: logistic regression on standardised activations (each feature centred and scaled by its
  training standard deviation; several sites are concatenated). Score: the logit of class 1.
- ``mean_difference``: the unit difference of class means; score: the projection minus the midpoint of
  the two means' projections (the mass-mean probe of Marks & Tegmark).
- ``mahalanobis``: fitted on normal data only; score: the Mahalanobis distance to the normal mean under a
  shrinkage covariance (Ledoit-Wolf by default), per site; several sites combine as the mean of their
  distances standardised by the training distances' mean and standard deviation.

Per-token scores depend only on that token's activations, so a monitor can compute them while the model
generates. Pooling (``mean``, ``max`` or ``last`` over an example's scored tokens) makes one score per
text; with ``last`` the detector is also fitted on last tokens only, otherwise on every scored token
(each labelled with its example's class).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError
from mechscope.improve.detect.activations import (
    Example,
    TokenActivations,
    check_examples,
    detector_sites,
    token_activations,
)
from mechscope.locate.probes import ProbeConfig, fit_probe
from mechscope.results import Artifact
from mechscope.steer.intervention import require_hooked

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

DETECTOR_KINDS = ("probe", "mean_difference", "mahalanobis")
POOLINGS = ("mean", "max", "last")


@dataclass(frozen=True, kw_only=True)
class DetectorConfig:
    """Options of :func:`train_detector`.

    Attributes:
        kind: ``"probe"``, ``"mean_difference"`` (both supervised) or ``"mahalanobis"`` (normal data only).
        sites: per-token sites read (e.g. ``("blocks.2.hook_resid_post",)``); several are concatenated
            (probe, mean difference) or combined (Mahalanobis).
        pooling: per-text score from per-token scores: ``mean``, ``max`` or ``last``.
        l2: L2 penalty of the logistic probe (on standardised features).
        shrinkage: ``"ledoit_wolf"`` or a fixed weight in [0, 1] on the scaled identity (Mahalanobis).
        batch_size: examples per forward pass.
        max_iter: LBFGS iterations of the probe.
    """

    kind: Literal["probe", "mean_difference", "mahalanobis"] = "probe"
    sites: tuple[str, ...] = ()
    pooling: Literal["mean", "max", "last"] = "mean"
    l2: float = 1e-2
    shrinkage: str | float = "ledoit_wolf"
    batch_size: int = 16
    max_iter: int = 200

    def __post_init__(self) -> None:
        if self.kind not in DETECTOR_KINDS:
            raise ConfigError(f"kind must be one of {DETECTOR_KINDS}; got {self.kind!r}")
        if isinstance(self.sites, str) or not self.sites or not all(isinstance(s, str) for s in self.sites):
            raise ConfigError(f"sites must be a non-empty tuple of site names; got {self.sites!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}; got {self.pooling!r}")
        if not self.l2 >= 0:
            raise ConfigError(f"l2 must be >= 0; got {self.l2}")
        if isinstance(self.shrinkage, str):
            if self.shrinkage != "ledoit_wolf":
                raise ConfigError(f"shrinkage must be 'ledoit_wolf' or a number in [0, 1]; got {self.shrinkage!r}")
        elif not 0 <= float(self.shrinkage) <= 1:
            raise ConfigError(f"shrinkage must be 'ledoit_wolf' or a number in [0, 1]; got {self.shrinkage}")
        if self.batch_size < 1 or self.max_iter < 1:
            raise ConfigError(f"batch_size and max_iter must be >= 1; got {self.batch_size}, {self.max_iter}")


def _finite(name: str, x: Tensor) -> Tensor:
    if not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{name} contain NaN or infinite values ({int((~torch.isfinite(x)).sum())} entries)")
    return x


def pool(scores: Float[Tensor, " n_tokens"], example: Tensor, n: int, pooling: str) -> Float[Tensor, " n"]:
    """One score per example from its tokens' scores (tokens in order within each example)."""
    example = example.to(scores.device)
    if pooling == "mean":
        total = torch.zeros(n, dtype=scores.dtype, device=scores.device).index_add_(0, example, scores)
        count = torch.zeros(n, dtype=scores.dtype, device=scores.device).index_add_(0, example, torch.ones_like(scores))
        return total / count
    if pooling == "max":
        out = torch.full((n,), -torch.inf, dtype=scores.dtype, device=scores.device)
        return out.scatter_reduce(0, example, scores, reduce="amax")
    if pooling == "last":
        last = torch.zeros(n, dtype=torch.long, device=scores.device)
        last = last.scatter_reduce(0, example, torch.arange(len(example), device=scores.device), reduce="amax")
        return scores[last]
    raise ConfigError(f"pooling must be one of {POOLINGS}; got {pooling!r}")


class Detector(Artifact):
    """Base of the detectors: sites, pooling, an optional calibrated threshold, training description."""

    kind: ClassVar[str] = "detector"
    method: ClassVar[str] = "detector"

    def __init__(
        self,
        *,
        sites: Sequence[str],
        pooling: str,
        threshold: float | None = None,
        calibration: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        fingerprint: str,
        model_type: str,
        d_model: int,
    ) -> None:
        super().__init__(fingerprint=fingerprint, model_type=model_type, d_model=d_model)
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
        self.sites = list(sites)
        self.pooling = pooling
        self.threshold = threshold
        self.calibration = dict(calibration or {})
        self.training = dict(training or {})

    # Scores ---------------------------------------------------------------------------------------
    def token_scores_from(self, acts: dict[str, Float[Tensor, "... d"]]) -> Float[Tensor, " ..."]:
        """Per-token scores from activations at the detector's sites (any leading shape)."""
        raise NotImplementedError

    def probability(self, scores: Tensor) -> Tensor | None:
        """P(class 1) for each score where the detector defines one (probes); None otherwise."""
        return None

    def check_model(self, model: Any) -> None:
        super().check_model(model)
        detector_sites(model, self.sites)

    def _collect(self, model: HookedModel, examples: Any, what: str, batch_size: int) -> TokenActivations:
        model = require_hooked(model)
        self.check_model(model)
        chosen = check_examples(examples, what)
        return token_activations(model, chosen, self.sites, batch_size=batch_size)

    def score_tokens(
        self, model: HookedModel, examples: Sequence[Example], *, batch_size: int = 16
    ) -> list[Float[Tensor, " n_scored"]]:
        """Per-token scores of each example's scored tokens (in order)."""
        acts = self._collect(model, examples, "examples", batch_size)
        scores = _finite("scores", self.token_scores_from(acts.acts))
        return [scores[acts.example == i] for i in range(acts.n_examples)]

    def score(self, model: HookedModel, examples: Sequence[Example], *, batch_size: int = 16) -> Float[Tensor, " n"]:
        """One pooled score per example."""
        acts = self._collect(model, examples, "examples", batch_size)
        scores = _finite("scores", self.token_scores_from(acts.acts))
        return pool(scores, acts.example, acts.n_examples, self.pooling)

    def alerts(self, scores: Tensor) -> Tensor:
        """``scores > threshold`` (needs a threshold: :func:`~mechscope.improve.detect.calibrate`)."""
        if self.threshold is None:
            raise ConfigError("this detector has no alert threshold yet; calibrate it on control data first")
        return scores > self.threshold

    def with_threshold(self, threshold: float, calibration: dict[str, Any]) -> Detector:
        """A copy with the alert `threshold` and the record of how it was set."""
        out = copy.copy(self)
        out.threshold = float(threshold)
        out.calibration = dict(calibration)
        return out

    # Files ----------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _parts(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        config = {
            "sites": self.sites,
            "pooling": self.pooling,
            "threshold": self.threshold,
            "calibration": self.calibration,
            "training": self.training,
        }
        return self._tensors(), config

    @classmethod
    def _from_parts(cls, tensors: dict[str, Tensor], config: dict[str, Any], info: dict[str, Any]) -> Any:
        common = {
            "sites": config["sites"],
            "pooling": config["pooling"],
            "threshold": config.get("threshold"),
            "calibration": config.get("calibration"),
            "training": config.get("training"),
            "fingerprint": info["fingerprint"],
            "model_type": info["model_type"],
            "d_model": int(info["d_model"]),
        }
        kwargs: dict[str, Any] = {**tensors, **common}
        return cls(**kwargs)

    def describe(self) -> str:
        thr = "uncalibrated" if self.threshold is None else f"threshold {self.threshold:.4g}"
        return f"{self.kind.split('.')[-1]} detector on {', '.join(self.sites)} ({self.pooling} pooling, {thr})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def _cat(acts: dict[str, Tensor], sites: Sequence[str]) -> Tensor:
    return torch.cat([acts[s].float() for s in sites], dim=-1)


class ProbeDetector(Detector):
    """Logistic probe on standardised activations; score = logit of class 1."""

    kind = "detector.probe"

    def __init__(self, *, mean: Tensor, std: Tensor, weight: Tensor, bias: Tensor, **common: Any) -> None:
        super().__init__(**common)
        if not (mean.shape == std.shape == weight.shape) or mean.ndim != 1:
            raise ShapeError(f"probe mean/std/weight must share one [features] shape; got {mean.shape}, {weight.shape}")
        self.mean, self.std, self.weight = mean.float(), std.float(), weight.float()
        self.bias = bias.float().reshape(1)

    def token_scores_from(self, acts: dict[str, Tensor]) -> Tensor:
        x = _cat(acts, self.sites)
        dev = x.device
        return ((x - self.mean.to(dev)) / self.std.to(dev)) @ self.weight.to(dev) + self.bias.to(dev)

    def probability(self, scores: Tensor) -> Tensor:
        return torch.sigmoid(scores)

    def _tensors(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}


class MeanDifferenceDetector(Detector):
    """Projection on the unit difference of class means, centred at the means' midpoint."""

    kind = "detector.mean_difference"

    def __init__(self, *, direction: Tensor, midpoint: Tensor, platt: Tensor, **common: Any) -> None:
        super().__init__(**common)
        self.direction = direction.float()
        self.midpoint = midpoint.float().reshape(1)
        self.platt = platt.float().reshape(2)  # probability = sigmoid(a * score + b), fitted on training scores

    def token_scores_from(self, acts: dict[str, Tensor]) -> Tensor:
        x = _cat(acts, self.sites)
        return x @ self.direction.to(x.device) - self.midpoint.to(x.device)

    def probability(self, scores: Tensor) -> Tensor:
        a, b = self.platt.to(scores.device)
        return torch.sigmoid(a * scores + b)

    def _tensors(self) -> dict[str, Tensor]:
        return {"direction": self.direction, "midpoint": self.midpoint, "platt": self.platt}


class MahalanobisDetector(Detector):
    """Mahalanobis distance to normal activations under a shrinkage covariance, per site, combined."""

    kind = "detector.mahalanobis"

    def __init__(self, *, means: Tensor, covariances: Tensor, shrinkages: Tensor, norms: Tensor, **common: Any) -> None:
        super().__init__(**common)
        self.means = means.float()  # [site, d]
        self.covariances = covariances.float()  # [site, d, d], shrunk
        self.shrinkages = shrinkages.float()  # [site]
        self.norms = norms.float()  # [site, 2]: training distances' mean and std
        # One site at a time: a batched inverse runs LAPACK inside torch's OpenMP loop over the batch, which
        # deadlocked in a long-lived process here (OpenBLAS threads nested in OpenMP); single inverses do not nest.
        self.precisions = torch.stack([torch.linalg.inv(c.double()).float() for c in self.covariances])

    def site_distances(self, acts: dict[str, Tensor]) -> Float[Tensor, "site ..."]:
        """The Mahalanobis distance at each site."""
        out = []
        for i, s in enumerate(self.sites):
            x = acts[s].float()
            z = x - self.means[i].to(x.device)
            q = ((z @ self.precisions[i].to(x.device)) * z).sum(-1)
            out.append(q.clamp_min(0).sqrt())
        return torch.stack(out)

    def token_scores_from(self, acts: dict[str, Tensor]) -> Tensor:
        d = self.site_distances(acts)
        if len(self.sites) == 1:
            return d[0]
        norms = self.norms.to(d.device)
        shape = (len(self.sites),) + (1,) * (d.ndim - 1)
        return ((d - norms[:, 0].reshape(shape)) / norms[:, 1].reshape(shape)).mean(0)

    def _tensors(self) -> dict[str, Tensor]:
        return {
            "means": self.means,
            "covariances": self.covariances,
            "shrinkages": self.shrinkages,
            "norms": self.norms,
        }


# Fitting ------------------------------------------------------------------------------------------
def ledoit_wolf(x: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "d d"], float]:
    """Ledoit-Wolf shrinkage covariance of the rows of `x` (centred here) and its shrinkage weight.

    ``(1 - s) S + s (tr S / d) I`` with S the (1/n) sample covariance and s the Ledoit & Wolf (2004)
    estimate ``min(beta, delta) / delta``, ``delta = ||S - mu I||_F^2``,
    ``beta = (sum_i ||x_i||^4 / n - ||S||_F^2) / n``.
    """
    x = x.double()
    n, d = x.shape
    z = x - x.mean(0)
    s = z.T @ z / n
    mu = float(s.diagonal().mean())
    delta = float((s - mu * torch.eye(d, dtype=s.dtype)).pow(2).sum())
    beta = float((z.pow(2).sum(1).pow(2).mean() - s.pow(2).sum()) / n)
    shrink = 1.0 if delta == 0 else min(max(beta, 0.0), delta) / delta
    return ((1 - shrink) * s + shrink * mu * torch.eye(d, dtype=s.dtype)), shrink


def shrunk_covariance(x: Tensor, shrinkage: str | float) -> tuple[Tensor, float]:
    if shrinkage == "ledoit_wolf":
        return ledoit_wolf(x)
    x = x.double()
    z = x - x.mean(0)
    s = z.T @ z / len(z)
    w = float(shrinkage)
    mu = float(s.diagonal().mean())
    return (1 - w) * s + w * mu * torch.eye(s.shape[0], dtype=s.dtype), w


def fit_supervised(
    positive: TokenActivations,
    negative: TokenActivations,
    config: DetectorConfig,
    model_info: dict[str, Any],
    training: dict[str, Any] | None = None,
) -> Detector:
    """A probe or mean-difference detector from activations already collected (class 1 = `positive`)."""
    cfg = config
    if cfg.pooling == "last":
        positive, negative = positive.last(), negative.last()
    x = _finite("training activations", torch.cat([_cat(positive.acts, cfg.sites), _cat(negative.acts, cfg.sites)]))
    y = torch.cat([torch.ones(len(positive.example)), torch.zeros(len(negative.example))]).long()
    if len(positive.example) == 0 or len(negative.example) == 0:
        raise ConfigError("training data must hold both classes (positive and negative tokens); one is empty")
    record = {
        "kind": cfg.kind,
        "fitted_on": "last tokens" if cfg.pooling == "last" else "every scored token",
        "n_tokens": len(y),
        **(training or {}),
    }
    common = {"sites": list(cfg.sites), "pooling": cfg.pooling, "training": record, **model_info}
    if cfg.kind == "probe":
        mean = x.mean(0)
        std = x.std(0, unbiased=False).clamp_min(1e-6)
        probe = fit_probe((x - mean) / std, y, ProbeConfig(kind="logistic", l2=cfg.l2, max_iter=cfg.max_iter))
        record["l2"] = cfg.l2
        return ProbeDetector(mean=mean, std=std, weight=probe.weight, bias=torch.tensor([probe.bias]), **common)
    if cfg.kind != "mean_difference":
        raise ConfigError(f"fit_supervised fits 'probe' or 'mean_difference' detectors; got {cfg.kind!r}")
    mu1, mu0 = x[y == 1].mean(0), x[y == 0].mean(0)
    diff = mu1 - mu0
    if float(diff.norm()) == 0:
        raise ConfigError("the two classes have identical mean activations; there is no direction to fit")
    u = diff / diff.norm()
    mid = (mu1 + mu0) / 2 @ u
    s = (x @ u - mid).reshape(-1, 1)
    platt = fit_probe(s, y, ProbeConfig(kind="logistic", l2=0.0, max_iter=cfg.max_iter))
    return MeanDifferenceDetector(
        direction=u, midpoint=mid.reshape(1), platt=torch.tensor([float(platt.weight[0]), platt.bias]), **common
    )


def fit_anomaly(
    normal: TokenActivations,
    config: DetectorConfig,
    model_info: dict[str, Any],
    training: dict[str, Any] | None = None,
) -> MahalanobisDetector:
    """A Mahalanobis detector from normal activations already collected."""
    cfg = config
    acts = normal.last() if cfg.pooling == "last" else normal
    n = len(acts.example)
    if n < 2:
        raise ConfigError(f"the anomaly detector needs at least 2 normal tokens to estimate a covariance; got {n}")
    means, covs, shrinks = [], [], []
    for s in cfg.sites:
        x = _finite("normal activations", acts.acts[s])
        cov, w = shrunk_covariance(x, cfg.shrinkage)
        if float(torch.linalg.eigvalsh(cov).min()) <= 0:
            raise ConfigError(
                f"the normal activations at {s} have a singular covariance (too few tokens or constant features); "
                "use shrinkage > 0 or more normal data"
            )
        means.append(x.double().mean(0).float())
        covs.append(cov.float())
        shrinks.append(w)
    record = {
        "kind": "mahalanobis",
        "fitted_on": "last tokens" if cfg.pooling == "last" else "every scored token",
        "n_tokens": n,
        "shrinkage": cfg.shrinkage if isinstance(cfg.shrinkage, str) else float(cfg.shrinkage),
        **(training or {}),
    }
    det = MahalanobisDetector(
        means=torch.stack(means),
        covariances=torch.stack(covs),
        shrinkages=torch.tensor(shrinks),
        norms=torch.tensor([[0.0, 1.0]] * len(cfg.sites)),
        sites=list(cfg.sites),
        pooling=cfg.pooling,
        training=record,
        **model_info,
    )
    d = det.site_distances(acts.acts)
    det.norms = torch.stack([d.mean(1), d.std(1).clamp_min(1e-6)], dim=1)
    return det


def _sample(examples: Sequence[Example]) -> list[str]:
    return [str(e)[:120] for e in examples[:3]]


def train_detector(
    model: HookedModel,
    config: DetectorConfig,
    *,
    positive: Sequence[Example] | None = None,
    negative: Sequence[Example] | None = None,
    normal: Sequence[Example] | None = None,
    description: str = "",
) -> Detector:
    """Fit a detector of ``config.kind`` on `model`'s activations.

    Supervised kinds take `positive` (should alert) and `negative` examples; ``mahalanobis`` takes
    `normal` examples only. `description` says what the training data is (saved with the detector).
    """
    model = require_hooked(model)
    if not isinstance(config, DetectorConfig):
        raise ConfigError(f"config must be a DetectorConfig; got {type(config).__name__}")
    detector_sites(model, config.sites)
    info = Artifact.model_info(model)
    with torch.no_grad():
        if config.kind == "mahalanobis":
            if normal is None or positive is not None or negative is not None:
                raise ConfigError("the mahalanobis detector is fitted on normal= examples only (no positive/negative)")
            norm_ex = check_examples(normal, "normal examples")
            acts = token_activations(model, norm_ex, config.sites, batch_size=config.batch_size)
            record = {"description": description, "n_normal": len(norm_ex), "normal_sample": _sample(norm_ex)}
            return fit_anomaly(acts, config, info, record)
        if positive is None or negative is None or normal is not None:
            raise ConfigError(f"a {config.kind} detector needs positive= and negative= examples (both classes)")
        pos = check_examples(positive, "positive examples")
        neg = check_examples(negative, "negative examples")
        a_pos = token_activations(model, pos, config.sites, batch_size=config.batch_size)
        a_neg = token_activations(model, neg, config.sites, batch_size=config.batch_size)
        record = {
            "description": description,
            "n_positive": len(pos),
            "n_negative": len(neg),
            "positive_sample": _sample(pos),
            "negative_sample": _sample(neg),
        }
        return fit_supervised(a_pos, a_neg, config, info, record)


__all__ = [
    "DETECTOR_KINDS",
    "POOLINGS",
    "Detector",
    "DetectorConfig",
    "MahalanobisDetector",
    "MeanDifferenceDetector",
    "ProbeDetector",
    "fit_anomaly",
    "fit_supervised",
    "ledoit_wolf",
    "pool",
    "shrunk_covariance",
    "train_detector",
]
