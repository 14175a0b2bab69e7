"""Evaluate a detector on held-out data and on a shifted distribution, with bootstrap intervals.

:func:`evaluate_detector` scores positive (should alert) and negative examples and reports, per split,
AUROC, recall at 1 % and 5 % false-positive rate (thresholds read from that split's negatives), the
expected calibration error of the detector's probabilities (probes; NaN for detectors without
probabilities), and -- for a calibrated detector -- the false-positive rate and recall at its own
threshold. Each value comes with a stratified-bootstrap 95 % interval. A *shifted* split (other
templates, other topics) shows how the detector generalises beyond the distribution it was fitted on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.improve.detect.activations import Example, check_examples
from mechscope.improve.detect.detectors import Detector
from mechscope.improve.detect.metrics import (
    auroc,
    bootstrap_interval,
    expected_calibration_error,
    recall_at_fpr,
    roc_curve,
)
from mechscope.results import Result

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

STATS = ("value", "low", "high")


class DetectionReport(Result):
    """Detection metrics per split: ``metrics [split, metric, stat]`` (stat: value, low, high of a 95 %
    bootstrap interval) and the raw scores ``scores.<split>.positive|negative`` for ROC and histograms."""

    method = "detection"

    def default_tensor(self) -> str:
        return "metrics"

    @property
    def splits(self) -> list[str]:
        return list(self.labels["split"])

    def value(self, metric: str, split: str = "held_out", stat: str = "value") -> float:
        """One number, e.g. ``report.value("auroc")`` or ``report.value("auroc", "shifted", "low")``."""
        for axis, name in (("split", split), ("metric", metric), ("stat", stat)):
            if name not in self.labels[axis]:
                raise KeyError(f"no {axis} {name!r}; this report has {self.labels[axis]}")
        i, j, k = (self.labels[a].index(n) for a, n in (("split", split), ("metric", metric), ("stat", stat)))
        return float(self["metrics"][i, j, k])

    def scores(self, split: str, cls: str) -> Tensor:
        return self[f"scores.{split}.{cls}"]

    def table(self) -> str:
        """A Markdown table: one row per split, each metric as ``value [low, high]``."""
        metrics = self.labels["metric"]
        head = "| split | n+ / n- | " + " | ".join(metrics) + " |"
        lines = [head, "|" + "---|" * (len(metrics) + 2)]
        for split in self.splits:
            n = f"{len(self.scores(split, 'positive'))} / {len(self.scores(split, 'negative'))}"
            cells = []
            for m in metrics:
                v, lo, hi = (self.value(m, split, s) for s in STATS)
                cells.append("n/a" if math.isnan(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]")
            lines.append(f"| {split} | {n} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, name: str | None = None, *, reduce: Sequence[str] = (), title: str | None = None) -> Any:
        """ROC curves (left) and score histograms per split and class (right)."""
        if name is not None and name != "metrics":
            return super().plot(name, reduce=reduce, title=title)
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("ROC", "scores"))
        for split in self.splits:
            pos, neg = self.scores(split, "positive"), self.scores(split, "negative")
            fpr, tpr, _ = roc_curve(pos, neg)
            auc = self.value("auroc", split)
            fig.add_trace(
                go.Scatter(x=fpr.tolist(), y=tpr.tolist(), mode="lines", name=f"{split} (AUROC {auc:.3f})"), 1, 1
            )
            for cls, values in (("positive", pos), ("negative", neg)):
                fig.add_trace(go.Histogram(x=values.tolist(), name=f"{split} {cls}", opacity=0.6), 1, 2)
        threshold = self.config.get("threshold")
        if threshold is not None:
            fig.add_vline(x=threshold, line_dash="dash", annotation_text="threshold", row=1, col=2)
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot"}, name="chance"), 1, 1)
        fig.update_layout(barmode="overlay", title=title or f"detector: {self.config.get('detector', '')}", height=420)
        fig.update_xaxes(title_text="false-positive rate", row=1, col=1)
        fig.update_yaxes(title_text="true-positive rate", row=1, col=1)
        fig.update_xaxes(title_text="score", row=1, col=2)
        return fig


def _metric_fns(detector: Detector) -> dict[str, Any]:
    fns: dict[str, Any] = {
        "auroc": auroc,
        "recall_at_1pct_fpr": lambda p, n: recall_at_fpr(p, n, 0.01),
        "recall_at_5pct_fpr": lambda p, n: recall_at_fpr(p, n, 0.05),
    }

    def ece(p: Tensor, n: Tensor) -> float:
        probs = detector.probability(torch.cat([p, n]))
        if probs is None:
            return math.nan
        labels = torch.cat([torch.ones(len(p)), torch.zeros(len(n))])
        return expected_calibration_error(probs, labels)

    fns["ece"] = ece
    if detector.threshold is not None:
        t = detector.threshold
        fns["fpr_at_threshold"] = lambda p, n: float((n > t).double().mean())
        fns["recall_at_threshold"] = lambda p, n: float((p > t).double().mean())
    return fns


def evaluate_detector(
    detector: Detector,
    model: HookedModel,
    positive: Sequence[Example],
    negative: Sequence[Example],
    *,
    shifted: tuple[Sequence[Example], Sequence[Example]] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
) -> DetectionReport:
    """AUROC, recall at 1 % / 5 % FPR, ECE (and threshold rates) with bootstrap 95 % intervals.

    `positive` / `negative` are the held-out split; `shifted` an optional (positive, negative) pair from
    another distribution.
    """
    if not isinstance(detector, Detector):
        raise ConfigError(f"expected a mechscope Detector; got {type(detector).__name__}")
    splits: dict[str, tuple[list[Example], list[Example]]] = {
        "held_out": (check_examples(positive, "positive"), check_examples(negative, "negative"))
    }
    if shifted is not None:
        if not isinstance(shifted, (tuple, list)) or len(shifted) != 2:
            raise ConfigError("shifted must be a (positive, negative) pair of example lists")
        splits["shifted"] = (
            check_examples(shifted[0], "shifted positive"),
            check_examples(shifted[1], "shifted negative"),
        )
    fns = _metric_fns(detector)
    values = torch.full((len(splits), len(fns), len(STATS)), math.nan, dtype=torch.float64)
    tensors: dict[str, Tensor] = {}
    axes: dict[str, tuple[str, ...]] = {}
    with torch.no_grad():
        for i, (split, (pos_ex, neg_ex)) in enumerate(splits.items()):
            pos = detector.score(model, pos_ex, batch_size=batch_size).double().cpu()
            neg = detector.score(model, neg_ex, batch_size=batch_size).double().cpu()
            tensors[f"scores.{split}.positive"], tensors[f"scores.{split}.negative"] = pos, neg
            axes[f"scores.{split}.positive"] = ("positive_example",)
            axes[f"scores.{split}.negative"] = ("negative_example",)
            for j, fn in enumerate(fns.values()):
                values[i, j, 0] = fn(pos, neg)
                if not math.isnan(float(values[i, j, 0])):
                    lo, hi = bootstrap_interval(fn, pos, neg, n_boot=n_boot, seed=seed + j)
                    values[i, j, 1], values[i, j, 2] = lo, hi
    tensors["metrics"] = values
    axes["metrics"] = ("split", "metric", "stat")
    return DetectionReport(
        tensors=tensors,
        axes=axes,
        labels={"split": list(splits), "metric": list(fns), "stat": list(STATS)},
        config={
            "detector": detector.describe(),
            "detector_kind": detector.kind,
            "sites": detector.sites,
            "pooling": detector.pooling,
            "threshold": detector.threshold,
            "training": detector.training,
            "n_boot": n_boot,
            "seed": seed,
        },
    )


__all__ = ["DetectionReport", "evaluate_detector"]
