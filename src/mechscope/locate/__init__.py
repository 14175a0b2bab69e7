"""Localisation methods: verbs that return labelled, savable, plottable results.

Vocabulary projection (logit lens, tuned lens), probes, attention-head detectors, direct attribution
and integrated gradients, activation / path patching, causal tracing, attribution patching (AtP, AtP*)
and circuit discovery (:mod:`mechscope.locate.circuits`: EAP, EAP-IG, ACDC, faithfulness).
"""

from __future__ import annotations

from mechscope.locate import circuits, metrics
from mechscope.locate.attribution import (
    AttributionResult,
    GradientAttribution,
    IGConfig,
    gradient_x_input,
    integrated_gradients,
    logit_attribution,
    logit_metric,
)
from mechscope.locate.attribution_patching import AtPComparison, AtPConfig, AtPResult, atp_vs_exact, attribution_patch
from mechscope.locate.causal_tracing import TracingConfig, TracingResult, TracingSummary, causal_trace, trace_facts
from mechscope.locate.circuits import (
    ACDCConfig,
    Circuit,
    EAPConfig,
    EdgeScores,
    Graph,
    acdc,
    eap,
    eap_ig,
    faithfulness,
    faithfulness_curve,
)
from mechscope.locate.directions import logit_direction
from mechscope.locate.heads import (
    HeadDetectorConfig,
    HeadScores,
    PatternResult,
    ablate_heads,
    attention_patterns,
    detect_heads,
    in_context_gain,
)
from mechscope.locate.lens import LensResult, logit_lens
from mechscope.locate.patching import MetricError, PatchResult, PromptMismatchError, activation_patch
from mechscope.locate.path_patching import PathPatchResult, Receiver, path_patch
from mechscope.locate.probes import ProbeConfig, ProbeResult, fit_probe, train_probes
from mechscope.locate.tuned_lens import (
    LensComparison,
    TunedLens,
    TunedLensConfig,
    TunedLensResult,
    compare_lenses,
    train_tuned_lens,
    tuned_lens,
)
from mechscope.results import Result

__all__ = [
    "ACDCConfig",
    "AtPComparison",
    "AtPConfig",
    "AtPResult",
    "AttributionResult",
    "Circuit",
    "EAPConfig",
    "EdgeScores",
    "GradientAttribution",
    "Graph",
    "HeadDetectorConfig",
    "HeadScores",
    "IGConfig",
    "LensComparison",
    "LensResult",
    "MetricError",
    "PatchResult",
    "PathPatchResult",
    "PatternResult",
    "ProbeConfig",
    "ProbeResult",
    "PromptMismatchError",
    "Receiver",
    "Result",
    "TracingConfig",
    "TracingResult",
    "TracingSummary",
    "TunedLens",
    "TunedLensConfig",
    "TunedLensResult",
    "ablate_heads",
    "acdc",
    "activation_patch",
    "atp_vs_exact",
    "attention_patterns",
    "attribution_patch",
    "causal_trace",
    "circuits",
    "compare_lenses",
    "detect_heads",
    "eap",
    "eap_ig",
    "faithfulness",
    "faithfulness_curve",
    "fit_probe",
    "gradient_x_input",
    "in_context_gain",
    "integrated_gradients",
    "logit_attribution",
    "logit_direction",
    "logit_lens",
    "logit_metric",
    "metrics",
    "path_patch",
    "trace_facts",
    "train_probes",
    "train_tuned_lens",
    "tuned_lens",
]
