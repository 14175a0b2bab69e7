"""Opt-in LayerNorm folding: move pre-norm weights into the linear layers that read them.

After folding, every pre-norm (``ln1``, ``ln2``, the final norm) only normalises, and ``W_Q``, ``W_in``,
``W_U``... include its elementwise weight (and LayerNorm bias, as a bias of the reader). The model
computes the same function (to float rounding); weight views then read directly in normalised space,
which is what direct-path analyses (QK/OV circuits, DLA on weights) want. Norms applied to a block's
*output* (Gemma 2/3, OLMo 2 post-norms) have no linear reader and are left as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


@torch.no_grad()
def _fold_into(reader: Any, weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool) -> None:
    """reader(x * weight + bias) == reader'(x), in place."""
    w = reader.weight
    if bias is not None and bool(bias.abs().sum() > 0):
        extra = (bias.to(w.dtype) @ w) if conv1d else (w @ bias.to(w.dtype))
        if getattr(reader, "bias", None) is None:
            reader.bias = nn.Parameter(extra.clone())
        else:
            reader.bias.add_(extra)
    if conv1d:
        w.mul_(weight.to(w.dtype)[:, None])
    else:
        w.mul_(weight.to(w.dtype)[None, :])


@torch.no_grad()
def _reset_norm(norm: Any, offset: float) -> None:
    norm.weight.fill_(1.0 - offset)
    if getattr(norm, "bias", None) is not None:
        norm.bias.zero_()


def _readers(model: HookedModel, layer: int, which: str) -> list[Any]:
    a = model.adapter
    if which == "ln1":
        paths = [p for p in (a.q_proj, a.k_proj, a.v_proj) if p is not None]
    else:
        paths = [p for p in dict.fromkeys((a.mlp_in, a.mlp_up)) if p is not None]
    return [model.layer_module(layer, p) for p in paths]


@torch.no_grad()
def fold_layer_norm(model: HookedModel) -> HookedModel:
    """Fold every pre-norm's weight into its readers, in place; returns the model for chaining."""
    a = model.adapter
    offset = a.norm.weight_offset
    for layer in range(model.dims.n_layers):
        for which, path in (("ln1", a.ln1), ("ln2", a.ln2)):
            if path is None:
                continue
            norm = model.layer_module(layer, path)
            weight = norm.weight.detach().float() + offset
            bias = getattr(norm, "bias", None)
            for reader in _readers(model, layer, which):
                _fold_into(reader, weight, bias.detach() if bias is not None else None, a.conv1d)
            _reset_norm(norm, offset)
    final = model.module(a.final_norm)
    head = model.module(a.unembed)
    embed = model.module(a.embed)
    if head.weight is embed.weight:  # untie, or folding would also rescale the embeddings
        head.weight = nn.Parameter(embed.weight.detach().clone())
        model.config.tie_word_embeddings = False
    bias = getattr(final, "bias", None)
    _fold_into(head, final.weight.detach().float() + offset, bias.detach() if bias is not None else None, False)
    _reset_norm(final, offset)
    return model
