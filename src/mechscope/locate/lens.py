"""Logit lens: read the residual stream before each layer (and after the last) as next-token logits.

Each residual goes through the model's own final-norm module and unembedding (and, for Gemma-style
models, the final logit soft-capping HF applies), so the last row is exactly the model's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.locate.results import Result
from mechscope.sites import Site

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs


class LensResult(Result):
    """Per-layer lens readout: ``kl [layer, batch, pos]`` (to the final distribution), ``top_tokens``
    and ``top_probs [layer, batch, pos, k]``, and optionally ``logits [layer, batch, pos, d_vocab]``."""

    method = "logit_lens"

    def default_tensor(self) -> str:
        return "kl"


def resid_to_logits(model: HookedModel, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Final norm, unembedding and (when configured) final logit soft-capping, as HF computes them."""
    normed = model.module(model.adapter.final_norm)(resid)
    logits = model.module(model.adapter.unembed)(normed)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits  # type: ignore[no-any-return]


def lens_sites(model: HookedModel) -> list[Site]:
    """The residual stream before every layer, then after the last."""
    n = model.dims.n_layers
    return [Site("hook_resid_pre", i) for i in range(n)] + [Site("hook_resid_post", n - 1)]


def _position_labels(model: HookedModel, input_ids: Tensor, positions: list[int] | None) -> list[str]:
    idx = list(range(input_ids.shape[1])) if positions is None else positions
    if model.tokenizer is None or input_ids.shape[0] != 1:
        return [str(p) for p in idx]
    tokens = model.to_str_tokens(input_ids[0])
    return [f"{p}:{tokens[p]}" for p in idx]


def logit_lens(
    model: HookedModel,
    inputs: Inputs,
    *,
    positions: Sequence[int] | None = None,
    k: int = 5,
    keep_logits: bool = False,
) -> LensResult:
    """Logit lens over every layer at `positions` (default: all). KL is ``KL(final || layer)``."""
    return lens_readout(model, inputs, positions=positions, k=k, keep_logits=keep_logits)


#: A map applied to the residual before layer ``layer`` (``n_layers``: the final residual) before unembedding.
Transform = Callable[[Tensor, int], Tensor]


def lens_readout(
    model: HookedModel,
    inputs: Inputs,
    *,
    transform: Transform | None = None,
    positions: Sequence[int] | None = None,
    k: int = 5,
    keep_logits: bool = False,
    result_type: type[LensResult] = LensResult,
    extra_config: dict[str, Any] | None = None,
) -> LensResult:
    """Read every residual in :func:`lens_sites` as logits, optionally through ``transform(resid, layer)``.

    The logit lens is the identity transform; the tuned lens applies a learnt affine map per layer.
    """
    if k < 1 or k > model.dims.d_vocab:
        raise ConfigError(f"k must be in 1..{model.dims.d_vocab}; got {k}")
    pos = None if positions is None else list(positions)
    batch = model.prepare_inputs(inputs)
    sites = lens_sites(model)
    _, cache = model.run_with_cache(batch, sites, positions=pos)
    with torch.no_grad():
        rows = []
        for layer, site in enumerate(sites):
            resid = cache[site]
            if transform is not None:
                resid = transform(resid, layer)
            rows.append(resid_to_logits(model, resid))
        logits = torch.stack(rows).float()
    logprobs = logits.log_softmax(-1)
    final = logprobs[-1:]
    kl = (final.exp() * (final - logprobs)).sum(-1).clamp_min(0.0)
    top_probs, top_tokens = logprobs.exp().topk(k, dim=-1)
    tensors: dict[str, Tensor] = {"kl": kl, "top_tokens": top_tokens, "top_probs": top_probs}
    axes: dict[str, tuple[str, ...]] = {
        "kl": ("layer", "batch", "pos"),
        "top_tokens": ("layer", "batch", "pos", "k"),
        "top_probs": ("layer", "batch", "pos", "k"),
    }
    if keep_logits:
        tensors["logits"] = logits
        axes["logits"] = ("layer", "batch", "pos", "d_vocab")
    labels = {
        "layer": [f"resid_pre {i}" for i in range(model.dims.n_layers)] + ["final"],
        "pos": _position_labels(model, batch["input_ids"], pos),
    }
    config: dict[str, Any] = {"positions": pos, "k": k, "model_type": model.dims.model_type, **(extra_config or {})}
    return result_type(tensors=tensors, axes=axes, labels=labels, config=config)


__all__ = ["LensResult", "Transform", "lens_readout", "lens_sites", "logit_lens", "resid_to_logits"]
