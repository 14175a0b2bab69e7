"""Model diffing: where a fine-tuned (or edited) model differs from its base -- weights, activations,
the logit lens of the activation difference, cross-model patching and KL by position; and circuits compared
edge by edge (EAP / EAP-IG on both models)."""

from __future__ import annotations

from mechscope.improve.diffing.activations import direction_logits
from mechscope.improve.diffing.causal import CausalDiff, cross_model_patch, kl_to_donor
from mechscope.improve.diffing.circuits import CircuitDiff, circuit_diff, compare_edge_scores
from mechscope.improve.diffing.diff import DiffConfig, diff_models
from mechscope.improve.diffing.kl import kl_by_position
from mechscope.improve.diffing.pair import ModelPairError, apply_edit, check_pair
from mechscope.improve.diffing.result import DiffResult
from mechscope.improve.diffing.weights import WeightDiff, weight_diff

__all__ = [
    "CausalDiff",
    "CircuitDiff",
    "DiffConfig",
    "DiffResult",
    "ModelPairError",
    "WeightDiff",
    "apply_edit",
    "check_pair",
    "circuit_diff",
    "compare_edge_scores",
    "cross_model_patch",
    "diff_models",
    "direction_logits",
    "kl_by_position",
    "kl_to_donor",
    "weight_diff",
]
