"""Load an SAE from any file mechscope reads: its own envelope file or a SAELens-format folder."""

from __future__ import annotations

from pathlib import Path

from mechscope.features.sae import SparseAutoencoder
from mechscope.features.saelens import load_saelens


def load_sae(path: str | Path) -> SparseAutoencoder:
    """An SAE from a mechscope file, or from a SAELens-format folder (``cfg.json`` +
    ``sae_weights.safetensors``, see :mod:`mechscope.features.saelens`)."""
    path = Path(path)
    if path.is_dir():
        return load_saelens(path)
    return SparseAutoencoder.load(path)


__all__ = ["load_sae"]
