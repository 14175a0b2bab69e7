"""Patching metrics as plain functions of logits: one value per batch row.

A position is an int (the same for every row; negative counts from the end) or a ``[batch]`` tensor
of per-row indices, e.g. :func:`last_positions` of a right-padded attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError

Position = int | Int[Tensor, " batch"]
TokenIds = int | Sequence[int] | Int[Tensor, " batch"]


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ShapeError(f"logits must be [batch, pos, d_vocab]; got {got}")


def last_positions(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Index of each row's last real (mask == 1) token, for right or left padding."""
    if attention_mask.ndim != 2:
        raise ShapeError(f"attention_mask must be [batch, pos]; got {tuple(attention_mask.shape)}")
    idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), idx, -1).amax(-1)


def logits_at(logits: Float[Tensor, "batch pos d_vocab"], position: Position = -1) -> Float[Tensor, "batch d_vocab"]:
    """The logits at `position` of each row."""
    _check_logits(logits)
    batch, n_pos = logits.shape[:2]
    if isinstance(position, int):
        if not -n_pos <= position < n_pos:
            raise ShapeError(f"position {position} is out of range for {n_pos} positions")
        return logits[:, position]
    if position.shape != (batch,):
        raise ShapeError(f"per-row positions must be [batch]=({batch},); got {tuple(position.shape)}")
    return logits[torch.arange(batch, device=logits.device), position.to(logits.device)]


def _token_ids(tokens: TokenIds, batch: int, device: torch.device, what: str) -> Tensor:
    ids = torch.as_tensor(tokens, dtype=torch.long, device=device)
    if ids.ndim == 0:
        return ids.expand(batch)
    if ids.shape != (batch,):
        raise ShapeError(f"{what} token ids must be an int or [batch]=({batch},); got shape {tuple(ids.shape)}")
    return ids


def logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"], correct: TokenIds, incorrect: TokenIds, *, position: Position = -1
) -> Float[Tensor, " batch"]:
    """``logit[correct] - logit[incorrect]`` at `position`, per row."""
    at = logits_at(logits, position)
    rows = torch.arange(at.shape[0], device=at.device)
    good = _token_ids(correct, at.shape[0], at.device, "correct")
    bad = _token_ids(incorrect, at.shape[0], at.device, "incorrect")
    return at[rows, good] - at[rows, bad]


def token_prob(
    logits: Float[Tensor, "batch pos d_vocab"], token: TokenIds, *, position: Position = -1
) -> Float[Tensor, " batch"]:
    """Probability of `token` at `position`, per row."""
    probs = logits_at(logits, position).float().softmax(-1)
    ids = _token_ids(token, probs.shape[0], probs.device, "target")
    return probs[torch.arange(probs.shape[0], device=probs.device), ids]


def kl_to_reference(
    logits: Float[Tensor, "batch pos d_vocab"],
    reference: Float[Tensor, "batch pos d_vocab"],
    *,
    position: Position = -1,
) -> Float[Tensor, " batch"]:
    """``KL(reference || logits)`` of the next-token distributions at `position`, per row."""
    _check_logits(reference)
    if reference.shape != logits.shape:
        raise ShapeError(f"reference logits must match logits {tuple(logits.shape)}; got {tuple(reference.shape)}")
    ref = logits_at(reference, position).float().log_softmax(-1)
    new = logits_at(logits, position).float().log_softmax(-1)
    return (ref.exp() * (ref - new)).sum(-1)


def normalised(value: Tensor | float, clean: Tensor | float, corrupt: Tensor | float) -> Tensor:
    """Map `value` linearly so that `corrupt` -> 0 and `clean` -> 1."""
    value_t, clean_t, corrupt_t = (torch.as_tensor(x, dtype=torch.float32) for x in (value, clean, corrupt))
    gap = clean_t - corrupt_t
    if bool((gap == 0).any()):
        raise ConfigError(f"cannot normalise: clean and corrupt metric values are equal ({clean_t.tolist()})")
    return (value_t - corrupt_t) / gap


__all__ = ["kl_to_reference", "last_positions", "logit_diff", "logits_at", "normalised", "token_prob"]
