"""Output view of a model diff: how far the two models' next-token distributions are, position by position."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


def kl_by_position(base: HookedModel, tuned: HookedModel, tokens: dict[str, Tensor]) -> Float[Tensor, "batch pos"]:
    """``KL(base || tuned)`` of the next-token distributions at every position (0 at padding)."""
    with torch.no_grad():
        lp_b = base.forward(tokens).float().log_softmax(-1)
        lp_t = tuned.forward({k: v.to(tuned.device) for k, v in tokens.items()}).float().log_softmax(-1)
    kl = (lp_b.exp() * (lp_b - lp_t.to(lp_b.device))).sum(-1).clamp_min(0.0)
    return kl * tokens["attention_mask"].to(kl.device)


__all__ = ["kl_by_position"]
