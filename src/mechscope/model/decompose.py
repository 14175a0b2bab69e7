"""Residual-stream decomposition and direct logit attribution, exact to HF's numerics.

The residual stream before layer L is the sum of the embeddings and every earlier attention and MLP
output; attention outputs split further into per-head terms plus the output bias. Norms are made
linear by *freezing their scale* at the value the full residual gives them (the standard trick), so
components of a normalised stream still sum exactly to what the model computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.metrics import last_positions
from mechscope.sites import Site

if TYPE_CHECKING:
    from mechscope.model.cache import ActivationCache
    from mechscope.model.hooked import HookedModel, Inputs


@dataclass
class Components:
    """Labelled residual-stream components: ``values [component, batch, pos, d_model]``."""

    values: Float[Tensor, "component batch pos d_model"]
    labels: list[str]

    def total(self) -> Float[Tensor, "batch pos d_model"]:
        return self.values.sum(0)

    def __len__(self) -> int:
        return len(self.labels)


def _norm_parts(model: HookedModel, norm: Any) -> tuple[Tensor, Tensor | None, float]:
    """(effective weight, bias or None, eps) of an HF norm module."""
    eps: Any = getattr(norm, "eps", None)
    if eps is None:
        eps = getattr(norm, "variance_epsilon", 1e-6)
    weight = norm.weight.detach().float() + model.adapter.norm.weight_offset
    bias = getattr(norm, "bias", None)
    return weight, (bias.detach().float() if bias is not None else None), float(eps)


def frozen_norm(
    model: HookedModel, norm: Any, full: Tensor, parts: Tensor, *, center: bool | None = None
) -> tuple[Tensor, Tensor | None]:
    """Apply `norm` to each of `parts` [..., *full.shape] with the scale that `full` gets.

    Returns (normalised parts, the norm's bias or None). ``sum(parts) == full`` implies
    ``sum(result) + bias == norm(full)`` up to float rounding.
    """
    weight, bias, eps = _norm_parts(model, norm)
    layernorm = model.adapter.norm.kind == "layernorm" if center is None else center
    f = full.float()
    p = parts.float()
    if layernorm:
        scale = torch.rsqrt(f.var(-1, keepdim=True, unbiased=False) + eps)
        p = p - p.mean(-1, keepdim=True)
    else:
        scale = torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)
    out = (p * scale * weight).to(full.dtype)
    return out, (bias.to(full.dtype) if bias is not None else None)


def required_sites(model: HookedModel, layer: int | None = None, *, heads: bool = True) -> list[Site]:
    """Sites a decomposition of the residual before `layer` (None: the final residual) needs."""
    n = model.dims.n_layers if layer is None else layer
    sites = [Site("hook_embed")]
    if model.adapter.pos_embed is not None:
        sites.append(Site("hook_pos_embed"))
    for i in range(n):
        sites.append(Site("attn.hook_z" if heads else "hook_attn_out", i))
        sites.append(Site("hook_mlp_out", i))
    sites.append(Site("hook_resid_post", model.dims.n_layers - 1) if layer is None else Site("hook_resid_pre", layer))
    return sites


def decompose_resid(
    model: HookedModel, cache: ActivationCache, *, layer: int | None = None, heads: bool = True
) -> Components:
    """Components of the residual stream before `layer` (None: after the last layer).

    With ``heads=True`` each attention layer contributes one term per head plus its output bias
    (for families with a norm after attention, per-head terms pass through it with frozen scale).
    """
    n = model.dims.n_layers if layer is None else layer
    if not 0 <= n <= model.dims.n_layers:
        raise ConfigError(f"layer must be in 0..{model.dims.n_layers}; got {layer}")
    values: list[Tensor] = [cache["hook_embed"]]
    labels = ["embed"]
    if model.adapter.pos_embed is not None:
        values.append(cache["hook_pos_embed"])
        labels.append("pos_embed")
    for i in range(n):
        if heads:
            per_head, bias = head_terms(model, i, cache[Site("attn.hook_z", i)])
            values.extend(per_head.unbind(-2))
            labels.extend(f"L{i}H{h}" for h in range(model.dims.n_heads))
            values.append(bias)
            labels.append(f"L{i} attn bias")
        else:
            values.append(cache[Site("hook_attn_out", i)])
            labels.append(f"L{i} attn")
        values.append(cache[Site("hook_mlp_out", i)])
        labels.append(f"L{i} mlp")
    ref = values[0]
    return Components(torch.stack([v.expand_as(ref) for v in values]), labels)


def head_terms(
    model: HookedModel, layer: int, z: Float[Tensor, "batch pos n_heads d_head"]
) -> tuple[Float[Tensor, "batch pos n_heads d_model"], Float[Tensor, "batch pos d_model"]]:
    """What each head of `layer` and the output bias add to the residual stream, given the heads' `z`.

    Without a post-attention norm these are ``z_h @ W_O[h]`` and ``b_O``. With one (Gemma 2/3) they pass
    through it with the scale the whole attention output gets (:func:`frozen_norm`), so they still sum to
    what the layer adds: each head's share of the normalised output.
    """
    result = model.head_results(z, layer)
    b_o = model.weights.b_O_layer(layer).to(result.dtype)
    bias = b_o.expand(*result.shape[:2], -1)
    post = model.adapter.post_attn_norm
    if post is None:
        return result, bias
    full = result.sum(-2) + b_o
    parts = torch.cat([result, bias[..., None, :]], dim=-2).movedim(-2, 0)
    normed, norm_bias = frozen_norm(model, model.layer_module(layer, post), full, parts)
    if norm_bias is not None:  # pragma: no cover - no supported family has a biased post-norm
        raise ConfigError("decomposition through a post-attention norm with a bias is not supported")
    return normed[:-1].movedim(0, -2), normed[-1]


def accumulated_resid(model: HookedModel, cache: ActivationCache) -> Components:
    """The residual stream before every layer and after the last: ``[n_layers + 1, batch, pos, d_model]``."""
    values = [cache[Site("hook_resid_pre", i)] for i in range(model.dims.n_layers)]
    values.append(cache[Site("hook_resid_post", model.dims.n_layers - 1)])
    labels = [f"resid_pre {i}" for i in range(model.dims.n_layers)] + ["final"]
    return Components(torch.stack(values), labels)


def apply_final_norm(model: HookedModel, components: Components, final_resid: Tensor) -> Components:
    """Pass components through the final norm with the scale the full final residual gets.

    When the components sum to `final_resid`, the results (plus a ``"final norm bias"`` component for
    LayerNorm families) sum to ``ln_final.hook_normalized``.
    """
    normed, bias = frozen_norm(model, model.module(model.adapter.final_norm), final_resid, components.values)
    if bias is None:
        return Components(normed, list(components.labels))
    bias_term = bias.expand_as(final_resid)[None]
    return Components(torch.cat([normed, bias_term]), [*components.labels, "final norm bias"])


@dataclass
class LogitAttribution:
    """Direct logit attribution: ``values [component, batch]`` sum to the logit (difference)."""

    values: Float[Tensor, "component batch"]
    labels: list[str]
    logit: Float[Tensor, " batch"]

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The k components with the largest mean attribution."""
        mean = self.values.mean(-1)
        order = mean.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(mean[i])) for i in order]


def direct_logit_attribution(
    model: HookedModel,
    inputs: Inputs,
    target: int | str | Sequence[int | str] | Tensor,
    *,
    baseline: int | str | Sequence[int | str] | Tensor | None = None,
    position: int | Tensor | None = None,
    heads: bool = True,
) -> LogitAttribution:
    """Attribute the logit of `target` (minus `baseline`, if given) at `position` to every component.

    `target`/`baseline` are token ids or single-token strings, one or one per batch row. `position`
    is None (each row's last real token, from the attention mask: a right-padded batch's last column is
    padding in its shorter rows), an index into the position axis, or a [batch] tensor of indices. The
    components (embeddings, heads or attention layers, MLPs, norm and unembedding biases) sum to the
    logit (difference) the model computes, before any final logit soft-capping.
    """
    final_layer = model.dims.n_layers - 1
    inputs = model.prepare_inputs(inputs)
    if position is None:
        position = last_positions(inputs["attention_mask"])
    _, cache = model.run_with_cache(inputs, required_sites(model, None, heads=heads))
    parts = decompose_resid(model, cache, heads=heads)
    final = cache[Site("hook_resid_post", final_layer)]
    normed = apply_final_norm(model, parts, final)
    batch = final.shape[0]
    pos = torch.as_tensor(position, device=final.device).reshape(-1).expand(batch)
    rows = torch.arange(batch, device=final.device)
    at_pos = normed.values[:, rows, pos]  # [component, batch, d_model]
    direction = _unembed_direction(model, target, batch) - (
        _unembed_direction(model, baseline, batch) if baseline is not None else 0
    )
    values = torch.einsum("cbd,db->cb", at_pos, direction.to(at_pos.dtype))
    bias = model.weights.b_U
    bias_term = _token_ids(model, target, batch).to(bias.device)
    b = bias[bias_term]
    if baseline is not None:
        b = b - bias[_token_ids(model, baseline, batch).to(bias.device)]
    labels = list(normed.labels)
    if bool(bias.abs().sum() > 0):
        values = torch.cat([values, b[None].to(values.dtype)])
        labels.append("unembed bias")
    return LogitAttribution(values, labels, values.sum(0))


def _token_ids(model: HookedModel, tokens: int | str | Sequence[int | str] | Tensor, batch: int) -> Tensor:
    items = tokens.reshape(-1).tolist() if isinstance(tokens, Tensor) else tokens
    if isinstance(items, (int, str)):
        items = [items]
    ids = [model.to_single_token(t) if isinstance(t, str) else int(t) for t in items]
    if len(ids) == 1:
        ids = ids * batch
    if len(ids) != batch:
        raise ConfigError(f"expected one token or {batch} tokens (one per batch row); got {len(ids)}")
    bad = sorted({i for i in ids if not 0 <= i < model.dims.d_vocab})
    if bad:
        raise ConfigError(f"token ids must lie in [0, {model.dims.d_vocab}); got {bad[:5]}")
    return torch.tensor(ids)


def _unembed_direction(model: HookedModel, tokens: int | str | Sequence[int | str] | Tensor, batch: int) -> Tensor:
    """Columns of W_U for the given tokens: [d_model, batch]."""
    w_u = model.weights.W_U
    return w_u[:, _token_ids(model, tokens, batch).to(w_u.device)]
