"""Output view of a model diff: how far the two models' next-token distributions are, position by position."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.metrics import kl_div

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


def kl_by_position(base: HookedModel, tuned: HookedModel, tokens: dict[str, Tensor]) -> Float[Tensor, "batch pos"]:
    """``KL(base || tuned)`` of the next-token distributions at every position (0 at padding)."""
    with torch.no_grad():
        base_logits = base.forward(tokens)
        tuned_logits = tuned.forward({k: v.to(tuned.device) for k, v in tokens.items()}).to(base_logits.device)
    return kl_div(tuned_logits, base_logits, attention_mask=tokens["attention_mask"].to(base_logits.device))


__all__ = ["kl_by_position"]
