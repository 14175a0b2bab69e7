"""Directions read off the unembedding: what direct logit attribution projects the residual stream onto.

DLA scores a component by the dot product of its (final-norm-scaled) output with the unembedding
difference ``W_U[:, target] - W_U[:, baseline]``. :func:`logit_direction` returns that readout direction
as a :class:`~mechscope.direction.Direction`, with the final norm's elementwise weight folded in (the
norm's scale is per token and does not change the direction), so a DLA finding can be handed straight
to steering or ablation: adding it to the last residual stream raises the target's logit over the
baseline's, and ablating it removes what the model can say about that contrast at the read-out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mechscope.direction import Direction
from mechscope.errors import ConfigError

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


def _token_id(model: HookedModel, token: int | str, what: str) -> int:
    if isinstance(token, bool) or not isinstance(token, (int, str)):
        raise ConfigError(f"{what} must be a token id or a single-token string; got {type(token).__name__}")
    index = model.to_single_token(token) if isinstance(token, str) else int(token)
    if not 0 <= index < model.dims.d_vocab:
        raise ConfigError(f"{what} token id {index} is out of range; the vocabulary has {model.dims.d_vocab} tokens")
    return index


def logit_direction(model: HookedModel, target: int | str, baseline: int | str | None = None) -> Direction:
    """The residual direction whose growth raises `target`'s logit (over `baseline`'s, when given).

    ``gamma * (W_U[:, target] - W_U[:, baseline])`` normalised, ``gamma`` the final norm's weight (with the
    family's offset, e.g. Gemma's ``1 + w``); a norm without a weight contributes ones.
    """
    t = _token_id(model, target, "target")
    b = None if baseline is None else _token_id(model, baseline, "baseline")
    if b is not None and b == t:
        raise ConfigError(f"target and baseline are the same token ({t}); their difference is zero")
    w_u = model.weights.W_U.float()
    readout = w_u[:, t] - (w_u[:, b] if b is not None else 0.0)
    norm = model.module(model.adapter.final_norm)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor):
        readout = readout * (weight.detach().float() + model.adapter.norm.weight_offset)
    info = {
        "site": f"blocks.{model.dims.n_layers - 1}.hook_resid_post",
        "method": "dla",
        "target": t,
        "baseline": b,
    }
    return Direction.from_tensor(model, readout.cpu(), **info)


__all__ = ["logit_direction"]
