"""Steer: interventions that change a model's forward pass and artifacts that record them.

Interventions are context managers bound to a :class:`~mechscope.model.hooked.HookedModel`; they
compose by nesting and remove their hooks on exit. Steering vectors and directions save to one
safetensors file each, with the fingerprint of the model they were made on.
"""

from __future__ import annotations

from mechscope.direction import Direction
from mechscope.results import Artifact, ModelMismatchError
from mechscope.steer.ablation import (
    Ablation,
    AblationConfig,
    mean_ablation,
    resample_ablation,
    scaling,
    zero_ablation,
)
from mechscope.steer.clamp import FeatureClamp, SAESplice, clamp_features
from mechscope.steer.directional import DirectionalAblation, directional_ablation, orthogonalize
from mechscope.steer.intervention import Intervention, applied
from mechscope.steer.selection import (
    DirectionSelection,
    DirectionSelectionConfig,
    logodds_bar,
    select_direction,
    token_logodds,
)
from mechscope.steer.vectors import (
    Steering,
    SteeringVector,
    from_direction,
    mean_difference,
    pca_direction,
    read_activations,
    steer,
)

__all__ = [
    "Ablation",
    "AblationConfig",
    "Artifact",
    "Direction",
    "DirectionSelection",
    "DirectionSelectionConfig",
    "DirectionalAblation",
    "FeatureClamp",
    "Intervention",
    "ModelMismatchError",
    "SAESplice",
    "Steering",
    "SteeringVector",
    "applied",
    "clamp_features",
    "directional_ablation",
    "from_direction",
    "logodds_bar",
    "mean_ablation",
    "mean_difference",
    "orthogonalize",
    "pca_direction",
    "read_activations",
    "resample_ablation",
    "scaling",
    "select_direction",
    "steer",
    "token_logodds",
    "zero_ablation",
]
