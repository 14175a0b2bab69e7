"""BatchTopK (Bussmann et al. 2024): while training, keep the ``k x batch`` largest pre-activations of
the whole batch (so a token may use more or fewer than ``k`` features); at inference a single threshold
replaces the batch selection -- a JumpReLU whose threshold is the running mean of the smallest value the
batch selection kept. Saved to SAELens's format as a JumpReLU with that threshold."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.features.architectures.base import Architecture, SparseCode, extra_tensor, register_architecture
from mechscope.features.architectures.sparse_grad import select

if TYPE_CHECKING:
    from mechscope.features.sae import SAEConfig, SparseAutoencoder

#: Weight of the newest batch in the threshold's running mean.
MOMENTUM = 0.01
#: Candidates searched per token, as a multiple of the mean number of entries a token keeps (k).
CANDIDATES = 4


@register_architecture
class BatchTopK(Architecture):
    name = "batchtopk"
    saelens = "jumprelu"
    uses_k = True
    extra: ClassVar[dict[str, bool]] = {"threshold": False}

    def init_extra(self, config: SAEConfig) -> dict[str, Tensor]:
        return {"threshold": torch.zeros(config.d_sae)}

    def encode(self, sae: SparseAutoencoder, pre: Tensor) -> Tensor:
        return pre * (pre > extra_tensor(sae, "threshold"))

    def train_encode(self, sae: SparseAutoencoder, pre: Tensor, train: Any) -> Tensor | SparseCode:
        """The batch's ``k x tokens`` largest activations as a :class:`SparseCode` whose rows are padded
        to the busiest token's count with zero values (index 0): the decode reads only kept rows."""
        assert sae.config.k is not None
        tokens = pre.shape[0]
        token, feature = batch_top(torch.relu(pre.detach()), sae.config.k * tokens)
        counts = torch.bincount(token, minlength=tokens)
        first_of_token = (counts.cumsum(0) - counts)[token]
        slot = torch.arange(token.numel(), device=token.device) - first_of_token  # position in its token's row
        width = max(1, int(counts.max()))
        where = token * width + slot
        values = torch.relu(select(pre, token, feature))  # gradient back to pre: sparse
        padded = values.new_zeros(tokens * width).index_put((where,), values)
        indices = torch.zeros(tokens * width, dtype=torch.long, device=token.device).index_put_((where,), feature)
        return SparseCode(padded.view(tokens, width), indices.view(tokens, width))

    @torch.no_grad()
    def after_step(self, sae: SparseAutoencoder, pre: Tensor, f: Tensor | SparseCode, train: Any) -> None:
        kept = f.values if isinstance(f, SparseCode) else f  # the trainer passes a sparse code's values
        kept = kept[kept > 0]
        if kept.numel():
            low = kept.min()
            threshold = extra_tensor(sae, "threshold")
            fresh = bool(torch.all(threshold == 0))
            threshold.copy_(low.expand_as(threshold) if fresh else threshold.lerp(low, MOMENTUM))


def batch_top(acts: Float[Tensor, "tokens d_sae"], n: int) -> tuple[Tensor, Tensor]:
    """``(token, feature)`` of the `n` largest entries of `acts` (non-negative), sorted by token, then feature.

    A top-`n` over the whole ``[tokens, d_sae]`` batch is a partial sort of millions of entries (most of a
    training step on a CPU). Each token can only contribute its own largest entries, so the search runs over
    every token's top ``m = CANDIDATES x n / tokens`` first; that is exact unless some token had all ``m`` of
    its candidates selected (it might have more above the cut), and then the whole batch is searched.
    """
    tokens, d_sae = acts.shape
    n = min(n, acts.numel())
    m = min(d_sae, -(-CANDIDATES * n // tokens))
    if m < d_sae:
        cand = acts.topk(m, dim=-1, sorted=False)
        chosen = cand.values.flatten().topk(n, sorted=False).indices
        taken = torch.bincount(torch.div(chosen, m, rounding_mode="floor"), minlength=tokens)
        if int(taken.max()) < m:  # every token kept something back: nothing outside the candidates is higher
            token = torch.div(chosen, m, rounding_mode="floor")
            feature = cand.indices.flatten()[chosen]
            order = torch.argsort(token * d_sae + feature)
            return token[order], feature[order]
    kept = acts.flatten().topk(n, sorted=False).indices.sort().values
    return torch.div(kept, d_sae, rounding_mode="floor"), kept % d_sae
