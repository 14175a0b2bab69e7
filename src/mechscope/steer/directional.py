"""Directional ablation and weight orthogonalisation (Arditi et al. 2024, "Refusal in language
models is mediated by a single direction"), for one direction or a low-rank subspace.

A :class:`~mechscope.direction.Direction` holds an orthonormal basis ``B`` [k, d_model]; ``k = 1`` is
Arditi's single direction ``r``. Some models spread a behaviour over a few directions (refusal "concept
cones", Wollschläger et al. 2025); for them ``k > 1`` projects out the span of several candidates.

- :func:`directional_ablation`: while active, every residual-stream site (``hook_resid_pre``,
  ``hook_resid_mid`` where it exists, ``hook_resid_post`` of every layer) is replaced by
  ``x - (x B^T) B`` (``x - (x . r) r`` for one direction), at every position.
- :func:`orthogonalize`: the permanent version. Every matrix that writes to the residual stream (the
  token and position embeddings, each attention output projection and each MLP output projection,
  and their biases) is replaced by its projection ``(I - B^T B) W``. The residual stream is the sum
  of those writes, so it has no component in the span of ``B`` anywhere, and the model computes exactly what
  the hooked ablation computes -- as a plain ``transformers`` model that ``save_pretrained`` writes.
  Tied embeddings are untied first (the unembedding must stay unchanged). Families with a norm
  after the attention/MLP output (Gemma 2/3, OLMo 2) cannot be orthogonalised exactly and raise.

Choosing the direction (:func:`~mechscope.steer.selection.select_direction`) lives in
:mod:`mechscope.steer.selection`; both are exported by :mod:`mechscope.steer`.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.direction import Direction, orthonormal_basis, unit_direction
from mechscope.errors import ConfigError, ShapeError
from mechscope.model import offload
from mechscope.model.hooks import HookContext, HookFn
from mechscope.model.layouts import Orientation
from mechscope.sites import Site
from mechscope.steer.intervention import Intervention, require_hooked

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

RESID_KINDS: tuple[str, ...] = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


def _as_basis(model: HookedModel, direction: Direction | Tensor) -> Float[Tensor, "k d_model"]:
    if isinstance(direction, Direction):
        direction.check_model(model)
    return orthonormal_basis(direction, model.dims.d_model)


class DirectionalAblation(Intervention):
    """Project a direction (or subspace) out of the residual stream at every layer and position."""

    kind = "directional_ablation"

    def __init__(self, model: HookedModel, direction: Direction | Tensor) -> None:
        super().__init__(model)
        self.basis = _as_basis(self.model, direction)
        self.sites = [s for s in self.model.sites(list(RESID_KINDS))]

    def hook_plan(self) -> dict[Site, list[HookFn]]:
        basis = self.basis

        def project_out(act: Tensor, _ctx: HookContext) -> Tensor:
            b = basis.to(act.device, act.dtype)
            return act - (act @ b.T) @ b

        return {site: [project_out] for site in self.sites}

    def describe(self) -> str:
        what = "directional ablation" if self.basis.shape[0] == 1 else f"rank-{self.basis.shape[0]} subspace ablation"
        return f"{what} at every residual site"


def directional_ablation(model: HookedModel, direction: Direction | Tensor) -> DirectionalAblation:
    """``with directional_ablation(model, r): ...`` -- the residual stream is kept orthogonal to `r`
    (a [d_model] direction, a [k, d_model] set of directions, or a :class:`Direction`)."""
    return DirectionalAblation(model, direction)


# Weight orthogonalisation ---------------------------------------------------------------------------------
def _project_rows(weight: Tensor, basis: Tensor) -> Tensor:
    """``W - (W B^T) B`` for a weight whose last axis is d_model (embeddings, biases)."""
    w = weight.float()
    return (w - (w @ basis.T) @ basis).to(weight.dtype)


def _orthogonalize_writer(module: nn.Module, r: Tensor, orientation: Orientation, where: str) -> None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise ConfigError(f"cannot orthogonalise {where}: it has no weight matrix ({type(module).__name__})")
    d = r.shape[-1]
    if orientation.out_in(weight).shape[0] != d:
        stored = "[in, out]" if orientation.conv1d else "[out, in]"
        raise ShapeError(f"{where}: expected a weight writing d_model={d} (stored {stored}); got {tuple(weight.shape)}")
    weight.copy_(orientation.project_out_of_outputs(weight, r))
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        bias.copy_(_project_rows(bias, r))


def orthogonalize(model: HookedModel, direction: Direction | Tensor, *, inplace: bool = False) -> HookedModel:
    """A model whose weights never write along `direction` or in its subspace (a copy unless ``inplace``).

    Its logits equal those of ``with directional_ablation(model, direction)`` on the original, and
    ``result.hf_model.save_pretrained(folder)`` writes a model that plain transformers loads.
    """
    from mechscope.model.hooked import HookedModel

    model = require_hooked(model)
    offload.require_resident(model.hf_model, "orthogonalise the weights")
    r = _as_basis(model, direction)
    a = model.adapter
    if a.post_attn_norm is not None or a.post_mlp_norm is not None:
        raise ConfigError(
            f"{a.family} applies a norm to the attention/MLP output before the residual add, so no weight change "
            "reproduces directional ablation exactly; use directional_ablation(...) (hooks) instead"
        )
    if model.hooks_active:
        raise ConfigError("leave every active hook/intervention block before orthogonalising (hooks would be copied)")
    hf = model.hf_model if inplace else copy.deepcopy(model.hf_model)
    r = r.to(model.device)
    with torch.no_grad():
        embed, unembed = hf.get_input_embeddings(), hf.get_output_embeddings()
        if unembed is not None and unembed.weight is embed.weight:
            unembed.weight = nn.Parameter(embed.weight.detach().clone())
            hf.config.tie_word_embeddings = False
            text_config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else None
            if text_config is not None:
                text_config.tie_word_embeddings = False
        embed.weight.copy_(_project_rows(embed.weight, r))
        if a.pos_embed is not None:
            pos = hf.get_submodule(a.pos_embed)
            pos.weight.copy_(_project_rows(pos.weight, r))
        layers = hf.get_submodule(a.layers)
        for i in range(model.dims.n_layers):
            for path in (a.o_proj, a.mlp_down):
                _orthogonalize_writer(layers[i].get_submodule(path), r, a.orientation, f"layer {i} {path}")
    if inplace:
        model.layout.forget_modules()
        return model
    return HookedModel(hf, model.tokenizer, attention_sites=model.attention_base is not None)


__all__ = [
    "RESID_KINDS",
    "Direction",
    "DirectionalAblation",
    "directional_ablation",
    "orthogonalize",
    "orthonormal_basis",
    "unit_direction",
]
