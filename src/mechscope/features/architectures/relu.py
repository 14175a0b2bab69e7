"""ReLU + L1 (Bricken et al. 2023): ``f = relu(pre)``, trained with an L1 penalty on the activations
weighted by the decoder row norms (so it cannot be dodged by shrinking the encoder)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechscope.features.architectures.base import Architecture, SparseCode, register_architecture

if TYPE_CHECKING:
    from mechscope.features.sae import SparseAutoencoder


@register_architecture
class ReLU(Architecture):
    name = "relu"
    saelens = "standard"

    def encode(self, sae: SparseAutoencoder, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def penalty(self, sae: SparseAutoencoder, pre: Tensor, f: Tensor | SparseCode, train: Any) -> Tensor | None:
        assert isinstance(f, Tensor)
        norms = sae.W_dec.norm(dim=-1)
        return train.l1_coefficient * (f * norms).sum(-1).mean() / sae.config.d_in**0.5
