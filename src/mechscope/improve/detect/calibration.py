"""Calibration: set a detector's alert threshold from control data at a target false-positive rate.

The threshold is the lowest value that at most ``target_fpr`` of the control scores exceed (alerts are
``score > threshold``). Reading a rate of p from n controls needs at least ``ceil(1 / p)`` of them -- with
fewer, even the single highest control is more than a p share -- so smaller control sets are refused with
the count the rate needs. The calibration set's own false-positive rate is at most the target; on new
data from the same distribution it varies with standard error about ``sqrt(p (1 - p) / n)``, recorded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mechscope.errors import ConfigError
from mechscope.improve.detect.activations import Example, check_examples
from mechscope.improve.detect.detectors import Detector
from mechscope.improve.detect.metrics import threshold_at_fpr

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


def controls_needed(target_fpr: float) -> int:
    """The fewest control examples that can express a false-positive rate of `target_fpr`."""
    return math.ceil(1 / target_fpr - 1e-9)


def calibrate(
    detector: Detector,
    model: HookedModel,
    control_texts: Sequence[Example],
    target_fpr: float = 0.01,
    *,
    description: str = "",
    batch_size: int = 16,
) -> Detector:
    """A copy of `detector` whose threshold alerts on at most `target_fpr` of `control_texts` (normal data)."""
    if not isinstance(detector, Detector):
        raise ConfigError(f"expected a mechscope Detector (train_detector(...)); got {type(detector).__name__}")
    if isinstance(target_fpr, bool) or not isinstance(target_fpr, (int, float)) or not 0 < target_fpr < 1:
        raise ConfigError(f"target_fpr must be a number in (0, 1); got {target_fpr!r}")
    controls = check_examples(control_texts, "control_texts")
    need = controls_needed(target_fpr)
    if len(controls) < need:
        raise ConfigError(
            f"calibrating at a false-positive rate of {target_fpr:g} needs at least {need} control examples "
            f"(1 / rate); got {len(controls)}. Pass more controls or a larger target_fpr "
            f"(>= {1 / len(controls):.3g} for {len(controls)} controls)."
        )
    with torch.no_grad():
        scores = detector.score(model, controls, batch_size=batch_size)
    threshold = threshold_at_fpr(scores, target_fpr)
    empirical = float((scores > threshold).double().mean())
    record = {
        "target_fpr": float(target_fpr),
        "n_controls": len(controls),
        "calibration_fpr": empirical,
        "fpr_standard_error": math.sqrt(target_fpr * (1 - target_fpr) / len(controls)),
        "control_score_quantiles": {
            q: float(scores.double().quantile(float(q))) for q in ("0.5", "0.9", "0.99") if len(scores) > 1
        },
        "description": description,
    }
    return detector.with_threshold(threshold, record)


__all__ = ["calibrate", "controls_needed"]
