"""Sparse dictionary features: sparse autoencoders trained on a model site's activations, their
evaluation (reconstruction, sparsity, dead features, downstream loss) and the interventions that read
or write them (splicing, feature clamping: :mod:`mechscope.steer.clamp`)."""

from mechscope.features.evals import downstream_loss, reconstruction_metrics
from mechscope.features.sae import SAEConfig, SparseAutoencoder
from mechscope.features.store import collect_activations
from mechscope.features.train import SAETrainConfig, train_sae

__all__ = [
    "SAEConfig",
    "SAETrainConfig",
    "SparseAutoencoder",
    "collect_activations",
    "downstream_loss",
    "reconstruction_metrics",
    "train_sae",
]
