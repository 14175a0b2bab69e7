"""Detectors of behaviour from activations: probes, mean-difference directions and an anomaly detector,
their calibration to a target false-positive rate, and their evaluation (AUROC, recall at low FPR, ECE,
bootstrap intervals, held-out and shifted splits). :mod:`mechscope.improve.monitor` runs them during
generation."""

from __future__ import annotations

from mechscope.improve.detect.activations import Example, TokenActivations, token_activations
from mechscope.improve.detect.calibration import calibrate, controls_needed
from mechscope.improve.detect.detectors import (
    DETECTOR_KINDS,
    POOLINGS,
    Detector,
    DetectorConfig,
    MahalanobisDetector,
    MeanDifferenceDetector,
    ProbeDetector,
    fit_anomaly,
    fit_supervised,
    ledoit_wolf,
    pool,
    train_detector,
)
from mechscope.improve.detect.evaluation import DetectionReport, evaluate_detector
from mechscope.improve.detect.metrics import (
    auroc,
    bootstrap_interval,
    expected_calibration_error,
    recall_at_fpr,
    roc_curve,
    threshold_at_fpr,
)

__all__ = [
    "DETECTOR_KINDS",
    "POOLINGS",
    "DetectionReport",
    "Detector",
    "DetectorConfig",
    "Example",
    "MahalanobisDetector",
    "MeanDifferenceDetector",
    "ProbeDetector",
    "TokenActivations",
    "auroc",
    "bootstrap_interval",
    "calibrate",
    "controls_needed",
    "evaluate_detector",
    "expected_calibration_error",
    "fit_anomaly",
    "fit_supervised",
    "ledoit_wolf",
    "pool",
    "recall_at_fpr",
    "roc_curve",
    "threshold_at_fpr",
    "token_activations",
    "train_detector",
]
