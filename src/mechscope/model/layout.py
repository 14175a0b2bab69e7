"""The layout of one loaded model: the HF model, its adapter and sizes, and where every module is.

Hooks (:mod:`mechscope.model.hooks`) and weight views (:mod:`mechscope.model.weights`) take this small
object instead of the :class:`~mechscope.model.hooked.HookedModel` that owns it, so the model core
reads one way: ``HookedModel`` -> ``ModelLayout`` <- hooks, weights (no call back into the model).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.errors import ShapeError, SiteError
from mechscope.model.adapters import Adapter
from mechscope.model.dims import ModelDims
from mechscope.model.layouts import HeadSizes
from mechscope.model.weights import WeightViews


class ModelLayout:
    """Module lookups (cached) and head-level arithmetic for one HF model and its adapter."""

    def __init__(self, hf_model: Any, adapter: Adapter, dims: ModelDims) -> None:
        self.hf_model: Any = hf_model
        self.adapter = adapter
        self.dims = dims
        self.heads = HeadSizes(dims.n_heads, dims.n_kv_heads, dims.d_head)
        self._module_cache: dict[str, nn.Module] = {}
        self.weights = WeightViews(self)

    def module(self, path: str) -> Any:
        """The HF submodule at a dotted path (cached). Typed Any: HF modules carry dynamic attributes."""
        found = self._module_cache.get(path)
        if found is None:
            found = self.hf_model.get_submodule(path)
            self._module_cache[path] = found
        return found

    def forget_modules(self) -> None:
        """Drop cached lookups (after modules were replaced in place, e.g. by orthogonalisation)."""
        self._module_cache.clear()

    def layer(self, index: int) -> Any:
        layers = self.module(self.adapter.layers)
        if not 0 <= index < self.dims.n_layers:
            raise SiteError(f"layer {index} does not exist; this model has layers 0..{self.dims.n_layers - 1}")
        return layers[index]  # type: ignore[index,no-any-return]

    def layer_module(self, index: int, path: str) -> Any:
        return self.module(f"{self.adapter.layers}.{index}.{path}")

    def head_results(
        self,
        z: Float[Tensor, "batch pos n_heads_x_d_head"] | Float[Tensor, "batch pos n_heads d_head"],
        layer: int,
        W_O: Float[Tensor, "n_heads d_head d_model"] | None = None,
    ) -> Float[Tensor, "batch pos n_heads d_model"]:
        """Per-head attention outputs in d_model: ``z[h] @ W_O[h]`` (bias not included).

        `W_O` defaults to the layer's current weights; pass a copy taken earlier to reproduce what a
        forward computed before the weights changed (the activation cache does)."""
        d = self.dims
        if z.ndim == 3:  # flattened heads; decided by rank, since n_heads * d_head == d_head with one head
            z = z.reshape(*z.shape[:-1], d.n_heads, d.d_head)
        if z.ndim != 4 or tuple(z.shape[-2:]) != (d.n_heads, d.d_head):
            raise ShapeError(
                f"z must be [batch, pos, {d.n_heads}, {d.d_head}] or [batch, pos, {d.n_heads * d.d_head}]; "
                f"got {tuple(z.shape)}"
            )
        weight = self.weights.W_O_layer(layer) if W_O is None else W_O
        return torch.einsum("bphk,hkd->bphd", z, weight.to(z.device, z.dtype))  # caches may sit elsewhere


__all__ = ["ModelLayout"]
