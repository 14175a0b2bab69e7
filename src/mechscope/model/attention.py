"""mechscope's attention function, registered in transformers' attention-function registry.

Sites inside attention (``hook_q/k/v`` after rotary, ``hook_attn_scores``, ``hook_pattern``, ``hook_z``)
are not module boundaries in HF. Every supported family calls the function named by
``config._attn_implementation``; registering ``mechscope_sdpa`` / ``mechscope_eager`` there gives one code
path for all of them. With no attention site hooked it calls the base implementation unchanged (same
kernels, same numerics); with q/k/v/z hooked it still calls the base; only scores/pattern hooks switch
that layer to an eager computation identical to HF's eager attention.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

BASE_IMPLEMENTATIONS = ("sdpa", "eager")
_PREFIX = "mechscope_"

#: Name of the per-module attribute holding the active attention-site handlers.
HANDLERS_ATTR = "_mechscope_attention_handlers"

# A handler receives (kind, activation) and returns the (possibly replaced) activation.
AttentionHandler = Callable[[str, torch.Tensor], torch.Tensor]


def implementation_name(base: str) -> str:
    return _PREFIX + base


def base_of(implementation: str | None) -> str | None:
    """The base implementation behind a mechscope implementation name, else None."""
    if implementation and implementation.startswith(_PREFIX):
        return implementation[len(_PREFIX) :]
    return None


def _family_eager(module: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """The eager attention function of the module's own modeling file (families differ slightly)."""
    modeling = sys.modules[type(module).__module__]
    fn = getattr(modeling, "eager_attention_forward", None)
    if fn is None:  # pragma: no cover - every supported family defines one
        return eager_attention
    return fn  # type: ignore[no-any-return]


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, pos, d_head] -> [batch, kv_heads * groups, pos, d_head]."""
    if groups == 1:
        return states
    batch, kv_heads, pos, d_head = states.shape
    return states[:, :, None].expand(batch, kv_heads, groups, pos, d_head).reshape(batch, -1, pos, d_head)


def _apply_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Apply an HF attention mask: additive float (eager), boolean keep-mask (sdpa) or None (causal)."""
    if mask is None:
        q_len, k_len = scores.shape[-2:]
        if q_len == 1:
            return scores
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
        return scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    mask = mask[:, :, :, : scores.shape[-1]]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    handle: AttentionHandler | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's eager attention, exposing scores (after softcap and mask) and pattern to `handle`.

    query: [batch, n_heads, q_pos, d_head]; key/value: [batch, n_kv_heads, k_pos, d_head].
    Returns ([batch, q_pos, n_heads, d_head], pattern [batch, n_heads, q_pos, k_pos]).
    """
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("attention sinks are not supported by mechscope's eager attention")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    key = _repeat_kv(key, groups)
    value = _repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = _apply_mask(scores, attention_mask)
    if handle is not None:
        scores = handle("attn.hook_attn_scores", scores)
    pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if handle is not None:
        pattern = handle("attn.hook_pattern", pattern)
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    output = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return output, pattern


def _hooked_attention(base: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        handlers: dict[str, Any] | None = module.__dict__.get(HANDLERS_ATTR)
        base_fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
        if base == "sdpa":
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            base_fn = sdpa_attention_forward
        else:
            base_fn = _family_eager(module)
        output: torch.Tensor
        weights: torch.Tensor | None
        if not handlers:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        handle: AttentionHandler = handlers["handle"]
        kinds: frozenset[str] = handlers["kinds"]
        # Sites are [batch, pos, heads, d_head]; HF passes [batch, heads, pos, d_head].
        if "attn.hook_q" in kinds:
            query = handle("attn.hook_q", query.transpose(1, 2)).transpose(1, 2)
        if "attn.hook_k" in kinds:
            key = handle("attn.hook_k", key.transpose(1, 2)).transpose(1, 2)
        if "attn.hook_v" in kinds:
            value = handle("attn.hook_v", value.transpose(1, 2)).transpose(1, 2)
        if "attn.hook_attn_scores" in kinds or "attn.hook_pattern" in kinds:
            output, weights = eager_attention(module, query, key, value, attention_mask, handle=handle, **kwargs)
        else:
            output, weights = base_fn(module, query, key, value, attention_mask, **kwargs)
        if "attn.hook_z" in kinds:
            output = handle("attn.hook_z", output)
        return output, weights

    attention.__name__ = f"mechscope_{base}_attention"
    return attention


def register() -> None:
    """Register mechscope's attention functions and their mask builders (idempotent, additive)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for base in BASE_IMPLEMENTATIONS:
        name = implementation_name(base)
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _hooked_attention(base))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
