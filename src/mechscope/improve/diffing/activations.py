"""Activation views of a model diff, on the same tokens through both models.

- ``total``: at each residual-width site of each layer, the root-mean-square of ``a_tuned - a_base`` over
  real tokens, relative to the RMS of ``a_base``. Upstream changes propagate, so this shows *where the
  difference appears and grows*, not which component made it.
- ``local``: each component's *own* change. The tuned model runs with every layer's inputs (residual
  before each layer, and before each MLP in sequential blocks) replaced by the base model's, so every
  component sees exactly the base run's inputs; the difference of its output from the base run's is due
  to its own weights only (exactly zero for an unchanged component). Components: the embeddings, each
  attention head's result (``z @ W_O``), each MLP and the unembedding (the logits from the base run's
  final residual). Each is an RMS over real tokens relative to the base residual stream entering the
  component's layer (the logits one relative to the base logits).
- ``lens``: the logit lens of the mean activation difference after each layer -- the tokens the
  fine-tune pushes up (and down) there, through the base model's final norm (its scale frozen, as a
  direction) and unembedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.model.hooks import HookFn
from mechscope.model.tokens import text_mask
from mechscope.sites import Site

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

#: Residual-width sites compared by the ``total`` view, per layer (those the model has).
TOTAL_KINDS = ("hook_attn_out", "hook_mlp_out", "hook_resid_post")


def _rms(x: Tensor, mask: Tensor) -> float:
    """Root-mean-square of the vectors of `x` ``[batch, pos, ...]`` at real positions."""
    keep = mask.bool()
    return float(x[keep].double().pow(2).sum(-1).mean().sqrt()) if bool(keep.any()) else 0.0


def _ratio(delta: Tensor, reference: Tensor, mask: Tensor) -> float:
    ref = _rms(reference, mask)
    return _rms(delta, mask) / ref if ref > 0 else 0.0


@dataclass
class ActivationDiff:
    """``total [kind, layer]``, ``local [component]`` (with names), and the per-layer mean differences
    ``mean_delta [layer, d_model]`` after each layer (for the lens)."""

    kinds: list[str]
    total: Float[Tensor, "kind layer"]
    components: list[str]
    local: Float[Tensor, " component"]
    mean_delta: Float[Tensor, "layer d_model"]


def _total_sites(model: HookedModel) -> list[Site]:
    kinds = [k for k in TOTAL_KINDS if Site(k, 0) in set(model.sites())]
    return [Site(k, layer) for k in kinds for layer in range(model.dims.n_layers)]


def _local_run(
    base: HookedModel, tuned: HookedModel, tokens: dict[str, Tensor], base_cache: dict[str, Tensor]
) -> tuple[dict[str, Tensor], Tensor]:
    """The tuned model's component outputs with every layer input taken from the base run."""
    n = base.dims.n_layers
    inputs = [Site("hook_resid_pre", layer) for layer in range(n)]
    if not base.dims.parallel:
        inputs += [Site("hook_resid_mid", layer) for layer in range(n)]
    inputs.append(Site("hook_resid_post", n - 1))

    def replace(site: Site) -> HookFn:
        value = base_cache[site.name]
        return lambda act, _ctx: value.to(act.device, act.dtype)

    outputs = [Site("attn.hook_z", layer) for layer in range(n)] + [Site("hook_mlp_out", layer) for layer in range(n)]
    outputs.append(Site("hook_embed"))
    if base.adapter.pos_embed is not None:
        outputs.append(Site("hook_pos_embed"))
    with tuned.hooks({s: replace(s) for s in inputs}):
        logits, cache = tuned.run_with_cache(tokens, outputs)
    assert logits is not None
    return {s.name: cache[s.name] for s in outputs}, logits


def last_token_mask(mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """A mask of each row's last real token (right padding)."""
    out = torch.zeros_like(mask)
    out[torch.arange(mask.shape[0], device=mask.device), mask.sum(-1) - 1] = 1
    return out


def activation_diff(
    base: HookedModel, tuned: HookedModel, tokens: dict[str, Tensor], *, lens_read: str = "all"
) -> ActivationDiff:
    """Total, local and mean-difference views on right-padded `tokens` (checked by the caller).

    Ratios and the mean difference for the lens are over the texts' tokens (the BOS the tokenizer adds left
    out: Gemma's residual there is 14x a token's) -- every one (``lens_read="all"``) or each text's last
    token (``"last"``, where a prompt's behaviour is decided)."""
    n = base.dims.n_layers
    mask = text_mask(base.tokenizer, tokens["input_ids"], tokens["attention_mask"])  # text tokens: no BOS
    lens_mask = mask if lens_read == "all" else last_token_mask(tokens["attention_mask"])
    total_sites = _total_sites(base)
    z_sites = [Site("attn.hook_z", layer) for layer in range(n)]
    resid = [Site("hook_resid_pre", layer) for layer in range(n)] + [Site("hook_resid_post", n - 1)]
    if not base.dims.parallel:
        resid += [Site("hook_resid_mid", layer) for layer in range(n)]
    embeds = [Site("hook_embed")] + ([Site("hook_pos_embed")] if base.adapter.pos_embed is not None else [])
    wanted = list(dict.fromkeys(total_sites + z_sites + resid + embeds))
    logits_b, cache_b = base.run_with_cache(tokens, wanted)
    _, cache_t = tuned.run_with_cache(tokens, total_sites)
    assert logits_b is not None
    kinds = list(dict.fromkeys(s.kind for s in total_sites))
    total = torch.zeros(len(kinds), n, dtype=torch.float64)
    for site in total_sites:
        a, b = cache_t[site.name].float(), cache_b[site.name].float()
        assert site.layer is not None
        total[kinds.index(site.kind), site.layer] = _ratio(a - b, b, mask)
    mean_delta = torch.stack(
        [
            masked_mean(
                cache_t[Site("hook_resid_post", layer).name] - cache_b[Site("hook_resid_post", layer).name],
                lens_mask,
            )
            for layer in range(n)
        ]
    )
    base_acts = {name: cache_b[name] for name in [s.name for s in wanted]}
    local_t, logits_local = _local_run(base, tuned, tokens, base_acts)
    names: list[str] = []
    values: list[float] = []
    embed_delta = sum(local_t[s.name].float() - base_acts[s.name].float() for s in embeds)
    embed_ref = sum(base_acts[s.name].float() for s in embeds)
    assert isinstance(embed_delta, Tensor) and isinstance(embed_ref, Tensor)
    names.append("embed")
    values.append(_ratio(embed_delta, embed_ref, mask))
    for layer in range(n):
        ref = base_acts[Site("hook_resid_pre", layer).name].float()
        z_b = base_acts[Site("attn.hook_z", layer).name].float()
        z_t = local_t[Site("attn.hook_z", layer).name].float()
        head_delta = tuned.head_results(z_t, layer).float() - base.head_results(z_b, layer).float()
        for h in range(base.dims.n_heads):
            names.append(f"blocks.{layer}.attn.head.{h}")
            values.append(_ratio(head_delta[:, :, h], ref, mask))
        mlp_site = Site("hook_mlp_out", layer).name
        mlp_ref = ref if base.dims.parallel else base_acts[Site("hook_resid_mid", layer).name].float()
        names.append(f"blocks.{layer}.mlp")
        values.append(_ratio(local_t[mlp_site].float() - cache_b[mlp_site].float(), mlp_ref, mask))
    names.append("unembed")
    values.append(_ratio(logits_local.float() - logits_b.float(), logits_b.float(), mask))
    return ActivationDiff(
        kinds=kinds,
        total=total,
        components=names,
        local=torch.tensor(values, dtype=torch.float64),
        mean_delta=mean_delta.float().cpu(),
    )


def masked_mean(x: Float[Tensor, "batch pos d"], mask: Int[Tensor, "batch pos"]) -> Float[Tensor, " d"]:
    """Mean of the vectors of `x` at real positions."""
    keep = mask.to(x.device).bool()
    return x[keep].float().mean(0)


def direction_logits(model: HookedModel, direction: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """What a residual direction adds to the logits through the final norm with its scale frozen (the
    norm's centring for LayerNorm and its weight) and the unembedding matrix -- no biases, so a zero
    direction gives zero logits."""
    norm = model.module(model.adapter.final_norm)
    weight = norm.weight.detach().float() + model.adapter.norm.weight_offset
    d = direction.float().to(weight.device)
    if model.adapter.norm.kind == "layernorm":
        d = d - d.mean(-1, keepdim=True)
    w_u = model.weights.W_U.float()
    return (d * weight) @ w_u


def lens_of_difference(
    model: HookedModel, mean_delta: Float[Tensor, "layer d_model"], k: int
) -> tuple[Int[Tensor, "layer k"], Float[Tensor, "layer k"], Int[Tensor, "layer k"], Float[Tensor, "layer k"]]:
    """Top-k promoted and top-k suppressed tokens (ids, logit scores) of each layer's mean difference."""
    scores = direction_logits(model, mean_delta.to(model.device))
    top = scores.topk(k, dim=-1)
    bottom = (-scores).topk(k, dim=-1)
    return top.indices.cpu(), top.values.cpu(), bottom.indices.cpu(), (-bottom.values).cpu()


__all__ = [
    "TOTAL_KINDS",
    "ActivationDiff",
    "activation_diff",
    "direction_logits",
    "last_token_mask",
    "lens_of_difference",
    "masked_mean",
]
