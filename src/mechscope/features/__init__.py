"""Sparse dictionary features: a sharded activation store, sparse autoencoders and transcoders of several
architectures (a registry), their training (streamed, checkpointed), evaluation, SAELens-format interop,
feature cards, automated descriptions with detection and causal scores, and a dashboard page. The
interventions that read or write features (splicing, clamping) live in :mod:`mechscope.steer.clamp`."""

from mechscope.features.architectures import architectures, get_architecture, register_architecture
from mechscope.features.cards import FeatureCard, FeatureCards, feature_cards, load_cards, save_cards
from mechscope.features.evals import downstream_loss, reconstruction_metrics
from mechscope.features.loading import load_sae
from mechscope.features.sae import SAEConfig, SparseAutoencoder
from mechscope.features.saelens import load_saelens, save_saelens
from mechscope.features.store import ActivationStore, collect_activations, collect_store
from mechscope.features.train import SAETrainConfig, train_sae

__all__ = [
    "ActivationStore",
    "FeatureCard",
    "FeatureCards",
    "SAEConfig",
    "SAETrainConfig",
    "SparseAutoencoder",
    "architectures",
    "collect_activations",
    "collect_store",
    "downstream_loss",
    "feature_cards",
    "get_architecture",
    "load_cards",
    "load_sae",
    "load_saelens",
    "reconstruction_metrics",
    "register_architecture",
    "save_cards",
    "save_saelens",
    "train_sae",
]
