"""Sparse dictionary features: sparse autoencoders trained on a model site's activations, their
evaluation (reconstruction, sparsity, dead features, downstream loss) and the interventions that read
or write them (splicing, feature clamping: :mod:`mechscope.steer.clamp`)."""

from mechscope.features.cards import FeatureCard, feature_cards, load_cards, save_cards
from mechscope.features.evals import downstream_loss, reconstruction_metrics
from mechscope.features.sae import SAEConfig, SparseAutoencoder
from mechscope.features.store import collect_activations
from mechscope.features.train import SAETrainConfig, train_sae

__all__ = [
    "FeatureCard",
    "SAEConfig",
    "SAETrainConfig",
    "SparseAutoencoder",
    "collect_activations",
    "downstream_loss",
    "feature_cards",
    "load_cards",
    "reconstruction_metrics",
    "save_cards",
    "train_sae",
]
