"""Logit lens: read the residual stream before each layer (and after the last) as next-token logits.

Each residual goes through the model's own final-norm module and unembedding (and, for Gemma-style
models, the final logit soft-capping HF applies), so the last row is exactly the model's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.metrics import kl_div, last_positions
from mechscope.model.tokens import text_mask
from mechscope.results import Result
from mechscope.sites import Site

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs


class LensResult(Result):
    """Per-layer lens readout: ``kl [layer, batch, pos]`` (to the final distribution), ``top_tokens``
    and ``top_probs [layer, batch, pos, k]``, ``attention_mask [batch, pos]`` (1 at real tokens),
    ``text_mask [batch, pos]`` (1 at the text's own tokens: real and not the BOS the tokenizer adds), and
    optionally ``logits [layer, batch, pos, d_vocab]``."""

    method = "logit_lens"

    def default_tensor(self) -> str:
        return "kl"

    def mean_kl(self) -> Float[Tensor, " layer"]:
        """Mean KL per layer over the text's tokens: pads of a mixed-length batch and the BOS a tokenizer adds
        (Gemma's BOS residual is 14x a text token's; no lens reading is wanted there) are left out."""
        kl = self["kl"].float()
        names = [name for name in ("text_mask", "attention_mask") if name in self.tensors]
        if not names:  # results saved before any mask was recorded
            return kl.mean((1, 2))
        mask = self[names[0]].float()
        return (kl * mask).sum((1, 2)) / mask.sum().clamp_min(1.0)


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
    positions: Sequence[int] | Literal["last"] | None = None,
    k: int = 5,
    keep_logits: bool = False,
    batch_size: int | None = None,
) -> LensResult:
    """Logit lens over every layer at `positions` (default: all; ``"last"``: each prompt's last real
    token, one column). KL is ``KL(final || layer)``. `batch_size` runs that many prompts per forward
    (default: all at once); the result does not depend on it."""
    return lens_readout(model, inputs, positions=positions, k=k, keep_logits=keep_logits, batch_size=batch_size)


def _lens_part(
    model: HookedModel,
    batch: dict[str, Tensor],
    rows: slice,
    sites: list[Site],
    pos: list[int] | None,
    last: Tensor | None,
    transform: Transform | None,
    k: int,
    keep_logits: bool,
) -> tuple[Tensor, ...]:
    """``kl``, ``top_probs``, ``top_tokens`` (and ``logits`` when kept) of the prompts in `rows`."""
    part = {name: value[rows] for name, value in batch.items() if name != "position_ids"}
    _, cache = model.run_with_cache(part, sites, positions=pos)
    with torch.no_grad():
        layers = []
        for layer, site in enumerate(sites):
            resid = cache[site]
            if last is not None:  # each row's last real token: [rows, 1, d_model]
                at = last[rows].to(resid.device)
                resid = resid[torch.arange(len(at), device=resid.device), at][:, None]
            if transform is not None:
                resid = transform(resid, layer)
            layers.append(resid_to_logits(model, resid))
        logits = torch.stack(layers).float()
    logprobs = logits.log_softmax(-1)
    kl = kl_div(logits, logits[-1:].expand_as(logits))  # KL(final || layer) per token, pads included
    top_probs, top_tokens = logprobs.exp().topk(k, dim=-1)
    return (kl, top_probs, top_tokens, logits) if keep_logits else (kl, top_probs, top_tokens)


#: A map applied to the residual before layer ``layer`` (``n_layers``: the final residual) before unembedding.
Transform = Callable[[Tensor, int], Tensor]


def lens_readout(
    model: HookedModel,
    inputs: Inputs,
    *,
    transform: Transform | None = None,
    positions: Sequence[int] | Literal["last"] | None = None,
    k: int = 5,
    keep_logits: bool = False,
    result_type: type[LensResult] = LensResult,
    extra_config: dict[str, Any] | None = None,
    batch_size: int | None = None,
) -> LensResult:
    """Read every residual in :func:`lens_sites` as logits, optionally through ``transform(resid, layer)``.

    The logit lens is the identity transform; the tuned lens applies a learnt affine map per layer. Prompts
    are tokenized together (one padding) and run `batch_size` at a time (default: all), so the vocabulary-sized
    logits of only one batch are held at once.
    """
    if k < 1 or k > model.dims.d_vocab:
        raise ConfigError(f"k must be in 1..{model.dims.d_vocab}; got {k}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be a positive number of prompts or None (all at once); got {batch_size!r}")
    batch = model.prepare_inputs(inputs)
    sites = lens_sites(model)
    mask = batch["attention_mask"]
    text = text_mask(model.tokenizer, batch["input_ids"], mask)
    last: Tensor | None = None
    if isinstance(positions, str):
        if positions != "last":
            raise ConfigError(f"positions must be a list of ints, 'last' or None; got {positions!r}")
        last = last_positions(mask)
        pos = None
        mask = text = torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)
    else:
        pos = None if positions is None else list(positions)
        if pos is not None:
            n_pos = int(mask.shape[1])
            if not pos or any(not isinstance(p, int) or not -n_pos <= p < n_pos for p in pos):
                raise ConfigError(f"positions must be a non-empty list of indices in [{-n_pos}, {n_pos}); got {pos}")
            mask, text = mask[:, pos], text[:, pos]
    n = int(batch["input_ids"].shape[0])
    step = n if batch_size is None else batch_size
    parts = [
        _lens_part(model, batch, slice(s, s + step), sites, pos, last, transform, k, keep_logits)
        for s in range(0, n, step)
    ]
    kl, top_probs, top_tokens = (torch.cat([p[i] for p in parts], dim=1) for i in range(3))
    tensors: dict[str, Tensor] = {
        "kl": kl,
        "top_tokens": top_tokens,
        "top_probs": top_probs,
        "attention_mask": mask.detach().cpu().to(torch.int64),
        "text_mask": text.detach().cpu().to(torch.int64),
    }
    axes: dict[str, tuple[str, ...]] = {
        "kl": ("layer", "batch", "pos"),
        "attention_mask": ("batch", "pos"),
        "text_mask": ("batch", "pos"),
        "top_tokens": ("layer", "batch", "pos", "k"),
        "top_probs": ("layer", "batch", "pos", "k"),
    }
    if keep_logits:
        tensors["logits"] = torch.cat([p[3] for p in parts], dim=1)
        axes["logits"] = ("layer", "batch", "pos", "d_vocab")
    labels = {
        "layer": [f"resid_pre {i}" for i in range(model.dims.n_layers)] + ["final"],
        "pos": ["last"] if last is not None else _position_labels(model, batch["input_ids"], pos),
    }
    config: dict[str, Any] = {
        "positions": "last" if last is not None else pos,
        "k": k,
        "model_type": model.dims.model_type,
        "dtype": str(model.dtype).removeprefix("torch."),
        **(extra_config or {}),
    }
    return result_type(tensors=tensors, axes=axes, labels=labels, config=config)


__all__ = ["LensResult", "Transform", "lens_readout", "lens_sites", "logit_lens", "resid_to_logits"]
