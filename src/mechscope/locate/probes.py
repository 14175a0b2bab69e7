"""Probes: linear, logistic and mass-mean (difference-of-means) classifiers on activations, per layer.

``train_probes`` reads one site kind (default the residual stream after each layer) at one position
per example (default each row's last real token), fits one probe per layer, and reports held-out
accuracy (a random split or an explicit test set), k-fold cross-validated accuracy, and a Hewitt &
Liang control task: labels reassigned at random per *control type* (by default every example is its
own type, so nothing generalises; pass e.g. the entity of each example as its type). Selectivity =
task accuracy - control accuracy on the held-out set; a probe that only memorises has none.

The learned direction of each layer is kept in activation space: features are centred and scaled by
one global factor for fitting (which keeps the L2 penalty isotropic) and the scaling is undone, so
:meth:`ProbeResult.direction` returns a unit ``d_model`` vector that steering can add to the site.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.direction import Direction
from mechscope.errors import ConfigError, ShapeError, renamed_keywords
from mechscope.locate.metrics import last_positions
from mechscope.results import ModelMismatchError, Result
from mechscope.sites import Site

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs

PROBE_KINDS = ("logistic", "linear", "mass_mean")


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """Options of :func:`train_probes` / :func:`fit_probe`.

    Attributes:
        kind: ``"logistic"`` (L2-regularised, LBFGS), ``"linear"`` (ridge regression on +-1 targets,
            closed form) or ``"mass_mean"`` (difference of class means, threshold at the midpoint).
        l2: regularisation strength (logistic and linear).
        test_fraction: held-out fraction when no explicit test set is given.
        folds: cross-validation folds (0 or 1: no cross-validation).
        control: also fit the control task and report selectivity.
        seed: seed of the split, the folds and the control labels.
        max_iter: LBFGS iterations (logistic).
    """

    kind: Literal["logistic", "linear", "mass_mean"] = "logistic"
    l2: float = 1e-2
    test_fraction: float = 0.25
    folds: int = 5
    control: bool = True
    seed: int = 0
    max_iter: int = 100

    def __post_init__(self) -> None:
        if self.kind not in PROBE_KINDS:
            raise ConfigError(f"kind must be one of {PROBE_KINDS}; got {self.kind!r}")
        if not 0 <= self.l2 < float("inf"):
            raise ConfigError(f"l2 must be >= 0; got {self.l2}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1); got {self.test_fraction}")
        if self.folds < 0 or self.folds == 1:
            raise ConfigError(f"folds must be 0 (none) or >= 2; got {self.folds}")
        if self.max_iter < 1:
            raise ConfigError(f"max_iter must be >= 1; got {self.max_iter}")


@dataclass
class Probe:
    """A fitted binary probe in activation space: ``score(x) = x @ weight + bias``, class 1 if > 0."""

    weight: Float[Tensor, " d_model"]
    bias: float

    def scores(self, x: Float[Tensor, "n d_model"]) -> Float[Tensor, " n"]:
        return x.float() @ self.weight + self.bias

    def predict(self, x: Float[Tensor, "n d_model"]) -> Int[Tensor, " n"]:
        return (self.scores(x) > 0).long()

    def accuracy(self, x: Float[Tensor, "n d_model"], y: Int[Tensor, " n"]) -> float:
        return float((self.predict(x) == y).float().mean()) if len(y) else float("nan")


def _check_xy(x: Tensor, y: Tensor) -> Tensor:
    if x.ndim != 2:
        raise ShapeError(f"features must be [n, d_model]; got shape {tuple(x.shape)}")
    y = torch.as_tensor(y)
    if y.shape != (x.shape[0],):
        raise ShapeError(f"labels must be one per example, shape ({x.shape[0]},); got {tuple(y.shape)}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ConfigError(f"labels must be binary 0/1; got values {sorted(set(y.tolist()))[:10]}")
    if y.unique().numel() < 2:
        raise ConfigError("labels must contain both classes (0 and 1) to fit a probe")
    return y.long()


def fit_probe(x: Float[Tensor, "n d_model"], y: Int[Tensor, " n"], config: ProbeConfig | None = None) -> Probe:
    """Fit one binary probe of ``config.kind`` on features `x` and 0/1 labels `y`."""
    cfg = config or ProbeConfig()
    y = _check_xy(x, y)
    x = x.float()
    if cfg.kind == "mass_mean":
        mu1, mu0 = x[y == 1].mean(0), x[y == 0].mean(0)
        w = mu1 - mu0
        return Probe(w, float(-(w @ (mu1 + mu0) / 2)))
    mu = x.mean(0)
    # one scale for all features: conditioning without distorting the geometry of the L2 penalty
    sigma = (x - mu).pow(2).mean().sqrt().clamp_min(1e-6)
    z = (x - mu) / sigma
    target = y.float()
    if cfg.kind == "linear":
        t = 2 * target - 1
        a = z.T @ z + cfg.l2 * len(z) * torch.eye(z.shape[1])
        w_std = torch.linalg.solve(a, z.T @ (t - t.mean()))
        b_std = float(t.mean())
    else:
        w_param = torch.zeros(z.shape[1], requires_grad=True)
        b_param = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([w_param, b_param], max_iter=cfg.max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w_param + b_param, target)
            loss = loss + cfg.l2 * (w_param @ w_param) / 2
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        w_std, b_std = w_param.detach(), float(b_param.detach())
    w = w_std / sigma
    return Probe(w, b_std - float(mu @ w))


def _folds(n: int, k: int, seed: int) -> list[Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [order[i::k] for i in range(k)]


def cross_validate(x: Tensor, y: Tensor, config: ProbeConfig | None = None) -> list[float]:
    """Held-out accuracy of each of ``config.folds`` folds (each fold tested on a probe fit on the rest)."""
    cfg = config or ProbeConfig()
    y = _check_xy(x, y)
    if cfg.folds < 2:
        raise ConfigError(f"cross-validation needs folds >= 2; got {cfg.folds}")
    if cfg.folds > len(y):
        raise ConfigError(f"folds ({cfg.folds}) must not exceed the number of examples ({len(y)})")
    scores = []
    for fold in _folds(len(y), cfg.folds, cfg.seed):
        train = torch.ones(len(y), dtype=torch.bool)
        train[fold] = False
        if y[train].unique().numel() < 2:
            continue
        scores.append(fit_probe(x[train], y[train], cfg).accuracy(x[fold], y[fold]))
    return scores


def control_labels(y: Tensor, types: Sequence[Hashable] | None, seed: int) -> Tensor:
    """Hewitt & Liang control task: one random label per type, drawn with the task's class balance."""
    n = len(y)
    types = list(range(n)) if types is None else list(types)
    if len(types) != n:
        raise ShapeError(f"control_types must have one entry per example ({n}); got {len(types)}")
    rng = random.Random(f"mechscope-probe-control:{seed}")
    p1 = float(torch.as_tensor(y).float().mean())
    table: dict[Hashable, int] = {}
    for t in dict.fromkeys(types):
        table[t] = int(rng.random() < p1)
    if len(table) > 1 and len(set(table.values())) < 2:  # degenerate draw: give one type the other class
        first = next(iter(table))
        table[first] = 1 - table[first]
    return torch.tensor([table[t] for t in types])


class ProbeResult(Result):
    """Per-layer probe results: accuracies ``[layer]``, ``directions [layer, d_model]`` (unit) and
    ``weights``/``bias`` (the raw probe). Use :meth:`direction` to hand a direction to steering."""

    method = "probes"

    def default_tensor(self) -> str:
        return "test_accuracy"

    def best_layer(self, metric: str = "test_accuracy") -> int:
        """The layer index (into the result's layer axis) with the highest `metric`."""
        return int(self[metric].nan_to_num(-1.0).argmax())

    def direction(self, layer: int) -> Float[Tensor, " d_model"]:
        """The unit direction of the probe at `layer` (a model layer index), pointing to class 1."""
        layers = self.config["layers"]
        if layer not in layers:
            raise ConfigError(f"no probe at layer {layer}; probed layers are {layers}")
        return self["directions"][layers.index(layer)].clone()

    def to_direction(self, model: Any, layer: int) -> Direction:
        """The probe direction of `layer` as a :class:`~mechscope.direction.Direction` for `model` (checked against
        the fingerprint the probes were trained on), recording where and how it was found."""
        meta = self.direction_metadata(layer)
        trained_on = meta.pop("model_fingerprint")
        if trained_on is not None and trained_on != model.fingerprint():
            raise ModelMismatchError(
                f"these probes were trained on model {trained_on}; the given model is {model.fingerprint()}"
            )
        kind = self.config["site_kind"]
        return Direction.from_tensor(model, self.direction(layer), layer=layer, method="probe", **meta, site_kind=kind)

    def direction_metadata(self, layer: int) -> dict[str, Any]:
        """Where and how the direction of `layer` was found (site, position, probe kind, accuracy)."""
        i = self.config["layers"].index(layer) if layer in self.config["layers"] else None
        if i is None:
            raise ConfigError(f"no probe at layer {layer}; probed layers are {self.config['layers']}")
        return {
            "site": Site(self.config["site_kind"], layer).name,
            "position": self.config["position"],
            "kind": self.config["kind"],
            "test_accuracy": float(self["test_accuracy"][i]),
            "positive_label": self.config.get("positive_label"),
            "model_fingerprint": self.config.get("model_fingerprint"),
        }


@renamed_keywords(site_kind="kind")
def collect_features(
    model: HookedModel,
    inputs: Inputs,
    *,
    kind: str = "hook_resid_post",
    layers: Sequence[int] | None = None,
    position: int | Sequence[int] | Tensor | None = None,
    batch_size: int = 32,
) -> Float[Tensor, "layer n d"]:
    """Activations of site kind `kind` at each layer, at one position per example: ``[layer, n, d]``
    (``site_kind=`` is the deprecated spelling of `kind`).

    `position` is None (each row's last real token), an int (negative counts from each row's end), or
    one index per example.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive number of prompts; got {batch_size!r}")
    d = model.dims
    chosen = list(range(d.n_layers)) if layers is None else list(layers)
    sites = [model.site(Site(kind, i)) for i in chosen]
    if any(len(s.axes) != 3 for s in sites):
        raise ConfigError(f"probes read [batch, pos, features] sites; {kind} has axes {sites[0].axes}")
    texts_or_ids: Any = inputs
    chunks: list[Any]
    if isinstance(inputs, str):
        texts_or_ids = [inputs]
    if isinstance(texts_or_ids, (list, tuple)):
        n = len(texts_or_ids)
        chunks = [texts_or_ids[i : i + batch_size] for i in range(0, n, batch_size)]
    else:
        full = model.prepare_inputs(inputs)
        n = full["input_ids"].shape[0]
        chunks = [
            {k: v[i : i + batch_size] for k, v in full.items() if k != "position_ids"} for i in range(0, n, batch_size)
        ]
    per_row = None
    if position is not None and not isinstance(position, int):
        per_row = torch.as_tensor(position, dtype=torch.long).reshape(-1)
        if per_row.shape != (n,):
            raise ShapeError(f"position must be an int or one index per example ({n},); got {tuple(per_row.shape)}")
    out: list[Tensor] = []
    start = 0
    for chunk in chunks:
        batch = model.prepare_inputs(chunk)
        _, cache = model.run_with_cache(batch, sites)
        last = last_positions(batch["attention_mask"])
        rows = torch.arange(len(last), device=last.device)
        if per_row is not None:
            pos = per_row[start : start + len(last)].to(last.device)
        elif not isinstance(position, int):
            pos = last
        else:
            pos = last + 1 + position if position < 0 else torch.full_like(last, position)
        if bool(((pos < 0) | (pos > last)).any()):
            raise ShapeError(
                f"probe positions {pos.tolist()} fall outside the rows' real tokens (last {last.tolist()})"
            )
        out.append(torch.stack([cache[s][rows, pos].float().cpu() for s in sites]))
        start += len(last)
    return torch.cat(out, dim=1)


def _labels_tensor(labels: Sequence[Any] | Tensor, n: int, positive: Any) -> tuple[Tensor, Any]:
    values = labels.tolist() if isinstance(labels, Tensor) else list(labels)
    if isinstance(labels, Tensor) and labels.ndim != 1:
        raise ShapeError(f"labels must be one per example, shape ({n},); got {tuple(labels.shape)}")
    if len(values) != n:
        raise ShapeError(f"got {n} examples but {len(values)} labels; expected one label per example")
    classes = sorted(set(values), key=str)
    if len(classes) != 2:
        raise ConfigError(f"probes are binary: labels must take exactly 2 values; got {classes[:10]}")
    pos_label = positive if positive is not None else classes[1]
    if pos_label not in classes:
        raise ConfigError(f"positive label {pos_label!r} is not among the labels {classes}")
    return torch.tensor([int(v == pos_label) for v in values]), pos_label


@renamed_keywords(site_kind="kind")
def train_probes(
    model: HookedModel,
    inputs: Inputs,
    labels: Sequence[Any] | Tensor,
    *,
    kind: str = "hook_resid_post",
    layers: Sequence[int] | None = None,
    position: int | None = None,
    test_inputs: Inputs | None = None,
    test_labels: Sequence[Any] | Tensor | None = None,
    control_types: Sequence[Hashable] | None = None,
    test_control_types: Sequence[Hashable] | None = None,
    positive_label: Any = None,
    config: ProbeConfig | None = None,
    progress: bool = False,
    batch_size: int = 32,
) -> ProbeResult:
    """Fit a probe per layer on binary `labels` and evaluate it (held-out, k-fold, control task).

    `kind` is the site kind read at every layer (``site_kind=`` is its deprecated spelling; the probe's own
    kind is ``config.kind``). Without `test_inputs`, ``config.test_fraction`` of the examples is held out at
    random. Activations are collected `batch_size` prompts per forward (lower it when memory runs out;
    results do not depend on it).
    """
    cfg = config or ProbeConfig()
    d = model.dims
    chosen = list(range(d.n_layers)) if layers is None else list(layers)
    if isinstance(inputs, (list, tuple)) and len(inputs) == 0:
        raise ConfigError("probes need examples; got an empty list of inputs")
    feats = collect_features(model, inputs, kind=kind, layers=chosen, position=position, batch_size=batch_size)
    y, pos_label = _labels_tensor(labels, feats.shape[1], positive_label)
    counts = torch.bincount(y.long(), minlength=2).tolist()
    if test_inputs is None and min(counts) < 2:
        raise ConfigError(
            f"probes need at least 2 examples of each class to hold one out; got {counts[0]} of class 0 and "
            f"{counts[1]} of class 1"
        )
    if (test_inputs is None) != (test_labels is None):
        raise ConfigError("pass test_inputs and test_labels together (or neither for a random split)")
    ctrl_all = control_labels(y, control_types, cfg.seed) if cfg.control else None
    if test_inputs is not None:
        assert test_labels is not None
        test_feats = collect_features(
            model, test_inputs, kind=kind, layers=chosen, position=position, batch_size=batch_size
        )
        y_test, _ = _labels_tensor(test_labels, test_feats.shape[1], pos_label)
        train_feats, y_train = feats, y
        ctrl_train = ctrl_all
        ctrl_test = None
        if cfg.control:
            # test examples of a type seen in training keep that type's control label
            types_train = list(range(len(y))) if control_types is None else list(control_types)
            table = dict(zip(types_train, ctrl_all.tolist())) if ctrl_all is not None else {}
            types_test = (
                [("test", i) for i in range(len(y_test))] if test_control_types is None else list(test_control_types)
            )
            if len(types_test) != len(y_test):
                raise ShapeError(f"test_control_types must have one entry per test example ({len(y_test)})")
            fresh = control_labels(y_test, types_test, cfg.seed + 1)
            ctrl_test = torch.tensor([table.get(t, int(f)) for t, f in zip(types_test, fresh.tolist())])
    else:
        n = len(y)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
        n_test = max(1, round(n * cfg.test_fraction))
        test_idx, train_idx = order[:n_test], order[n_test:]
        train_feats, test_feats = feats[:, train_idx], feats[:, test_idx]
        y_train, y_test = y[train_idx], y[test_idx]
        ctrl_train = ctrl_all[train_idx] if ctrl_all is not None else None
        ctrl_test = ctrl_all[test_idx] if ctrl_all is not None else None
    n_layers = len(chosen)
    stats = {k: torch.full((n_layers,), float("nan")) for k in ("train_accuracy", "test_accuracy")}
    if cfg.folds >= 2:
        stats["cv_accuracy"] = torch.full((n_layers,), float("nan"))
        stats["cv_std"] = torch.full((n_layers,), float("nan"))
    if cfg.control:
        stats["control_accuracy"] = torch.full((n_layers,), float("nan"))
        stats["selectivity"] = torch.full((n_layers,), float("nan"))
    weights = torch.zeros(n_layers, feats.shape[-1])
    bias = torch.zeros(n_layers)
    layer_iter: Any = range(n_layers)
    if progress:
        from tqdm.auto import tqdm

        layer_iter = tqdm(layer_iter, desc="probing layers", unit="layer")
    for i in layer_iter:
        probe = fit_probe(train_feats[i], y_train, cfg)
        weights[i], bias[i] = probe.weight, probe.bias
        stats["train_accuracy"][i] = probe.accuracy(train_feats[i], y_train)
        stats["test_accuracy"][i] = probe.accuracy(test_feats[i], y_test)
        if cfg.folds >= 2:
            cv = torch.tensor(cross_validate(feats[i], y, cfg))
            stats["cv_accuracy"][i] = cv.mean()
            stats["cv_std"][i] = cv.std() if len(cv) > 1 else 0.0
        if cfg.control and ctrl_train is not None and ctrl_test is not None and ctrl_train.unique().numel() == 2:
            control = fit_probe(train_feats[i], ctrl_train, cfg)
            stats["control_accuracy"][i] = control.accuracy(test_feats[i], ctrl_test)
            stats["selectivity"][i] = stats["test_accuracy"][i] - stats["control_accuracy"][i]
    norms = weights.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    tensors = {**stats, "directions": weights / norms, "weights": weights, "bias": bias}
    axes: dict[str, tuple[str, ...]] = {k: ("layer",) for k in stats}
    axes.update({"directions": ("layer", "d_model"), "weights": ("layer", "d_model"), "bias": ("layer",)})
    config_out: dict[str, Any] = {
        "kind": cfg.kind,
        "l2": cfg.l2,
        "folds": cfg.folds,
        "seed": cfg.seed,
        "site_kind": kind,
        "layers": chosen,
        "position": "last" if position is None else position,
        "positive_label": str(pos_label),
        "n_train": len(y_train),
        "n_test": len(y_test),
        "split": "explicit" if test_inputs is not None else f"random {cfg.test_fraction}",
        "model_type": d.model_type,
        "model_fingerprint": model.fingerprint(),
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    labels_out = {"layer": [Site(kind, i).name for i in chosen]}
    return ProbeResult(tensors=tensors, axes=axes, labels=labels_out, config=config_out)


__all__ = [
    "PROBE_KINDS",
    "Probe",
    "ProbeConfig",
    "ProbeResult",
    "collect_features",
    "control_labels",
    "cross_validate",
    "fit_probe",
    "train_probes",
]
