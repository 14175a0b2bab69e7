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
import threading
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


def _causal_bias(q_len: int, k_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask [q_len, k_len]: 0 where a query may attend, the dtype's minimum elsewhere.

    Queries are the last `q_len` of `k_len` positions (generation with a KV cache), as in HF's masks.
    """
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    return torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)


def _additive_bias(
    mask: torch.Tensor | None, q_len: int, k_len: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """HF attention mask as an additive bias: float masks as given, boolean keep-masks and None converted.

    Returns None when nothing is masked (a single query over its whole past), else a tensor broadcastable to
    [batch, heads, q_len, k_len]. Additive masking is what HF's eager attention does, so scores match it.
    """
    if mask is None:
        return None if q_len == 1 else _causal_bias(q_len, k_len, dtype, device)
    mask = mask[:, :, :, :k_len]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask


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

    Same arithmetic as HF's ``eager_attention_forward`` (scale, optional softcap, additive mask, float32
    softmax), written with batched matrix products on [batch * heads] views and in-place elementwise steps:
    on CPU that is about twice as fast as the textbook version, which matters because every run that reads
    or writes attention scores or patterns goes through here.

    query: [batch, n_heads, q_pos, d_head]; key/value: [batch, n_kv_heads, k_pos, d_head].
    Returns ([batch, q_pos, n_heads, d_head], pattern [batch, n_heads, q_pos, k_pos]).
    """
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("attention sinks are not supported by mechscope's eager attention")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    batch, n_heads, q_len, d_head = query.shape
    groups = n_heads // key.shape[1]
    key = _repeat_kv(key, groups)
    value = _repeat_kv(value, groups)
    k_len = key.shape[2]
    queries = query.reshape(batch * n_heads, q_len, d_head)
    keys_t = key.reshape(batch * n_heads, k_len, d_head).transpose(1, 2)
    bias = _additive_bias(attention_mask, q_len, k_len, query.dtype, query.device)
    if softcap is None and bias is not None and bias.dim() == 2:
        # The common causal case: scale, product and mask in one fused call.
        scores = torch.baddbmm(bias, queries, keys_t, alpha=scaling).view(batch, n_heads, q_len, k_len)
    else:
        scores = torch.bmm(queries, keys_t).view(batch, n_heads, q_len, k_len).mul_(scaling)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap  # out of place: tanh's backward needs its output
        if bias is not None:
            scores = scores.add_(bias)
    if handle is not None:
        scores = handle("attn.hook_attn_scores", scores)
    pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if handle is not None:
        pattern = handle("attn.hook_pattern", pattern)
    if dropout > 0.0 and module.training:
        pattern = nn.functional.dropout(pattern, p=dropout, training=True)
    output = torch.bmm(pattern.reshape(batch * n_heads, q_len, k_len), value.reshape(batch * n_heads, k_len, d_head))
    return output.view(batch, n_heads, q_len, d_head).transpose(1, 2).contiguous(), pattern


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
        if not handlers or threading.get_ident() not in handlers["threads"]:  # sessions are thread-local
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
