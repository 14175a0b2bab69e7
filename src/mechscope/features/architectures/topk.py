"""TopK (Gao et al. 2024): keep the ``k`` largest pre-activations of each token (then ReLU): sparsity
set exactly, no penalty to tune. Training decodes sparsely (only the ``k`` active decoder rows of each
token are read, through ``embedding_bag``) and passes the encoder a sparse gradient
(:mod:`~mechscope.features.architectures.sparse_grad`), which is most of its speed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechscope.features.architectures.base import Architecture, SparseCode, register_architecture
from mechscope.features.architectures.sparse_grad import select_rows

if TYPE_CHECKING:
    from mechscope.features.sae import SparseAutoencoder


@register_architecture
class TopK(Architecture):
    name = "topk"
    saelens = "topk"
    uses_k = True

    def encode(self, sae: SparseAutoencoder, pre: Tensor) -> Tensor:
        code = self.train_encode(sae, pre, None)
        assert isinstance(code, SparseCode)
        return code.dense(pre.shape[-1])

    def train_encode(self, sae: SparseAutoencoder, pre: Tensor, train: Any) -> Tensor | SparseCode:
        assert sae.config.k is not None
        indices = pre.detach().topk(sae.config.k, dim=-1, sorted=False).indices
        return SparseCode(torch.relu(select_rows(pre, indices)), indices)  # gradient back to pre: sparse
