"""Weight views in mechscope's conventions, read from HF's parameters (never copies of the model).

Shapes (per layer): ``W_Q/W_K/W_V [n_heads, d_model, d_head]`` (GQA key/value heads expanded to the
query heads they serve), ``W_O [n_heads, d_head, d_model]``, ``W_in/W_gate [d_model, d_mlp]``,
``W_out [d_mlp, d_model]``; model-level ``W_E [d_vocab, d_model]``, ``W_pos [n_ctx, d_model]``,
``W_U [d_model, d_vocab]``. Stacked properties add a leading ``n_layers`` axis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.model.layouts import in_out
from mechscope.model.offload import parameter

if TYPE_CHECKING:
    from mechscope.model.layout import ModelLayout


def _bias(module: Any, size: int, like: Tensor) -> Tensor:
    bias = parameter(module, "bias")
    return bias if bias is not None else torch.zeros(size, dtype=like.dtype, device=like.device)


class WeightViews:
    """Per-layer and stacked weight views of one model's layout (detached, read-only)."""

    def __init__(self, layout: ModelLayout) -> None:
        self._m = layout

    # Attention --------------------------------------------------------------------------------------
    def qkv(self, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(W_Q, W_K, W_V, b_Q, b_K, b_V) of one layer, kv heads *not* expanded.

        W_Q: [n_heads, d_model, d_head], W_K/W_V: [n_kv_heads, d_model, d_head], biases [heads, d_head].
        """
        m, a, sizes = self._m, self._m.adapter, self._m.heads
        orient, layout = a.orientation, a.qkv
        mod = m.layer_module(layer, a.q_proj)
        if not layout.fused:
            assert a.k_proj is not None and a.v_proj is not None
            mods = [mod, m.layer_module(layer, a.k_proj), m.layer_module(layer, a.v_proj)]
            ws = [orient.in_out(parameter(x)) for x in mods]
            bs = [_bias(x, w.shape[1], w) for x, w in zip(mods, ws)]
        else:
            w = orient.in_out(parameter(mod))
            ws, bs = layout.split(w, _bias(mod, w.shape[1], w), sizes)
        heads = [sizes.n_heads, sizes.n_kv_heads, sizes.n_kv_heads]
        dh = sizes.d_head
        w_out = [x.reshape(x.shape[0], h, dh).permute(1, 0, 2).detach() for x, h in zip(ws, heads)]
        b_out = [x.reshape(h, dh).detach() for x, h in zip(bs, heads)]
        return w_out[0], w_out[1], w_out[2], b_out[0], b_out[1], b_out[2]

    def _expand(self, x: Tensor) -> Tensor:
        groups = self._m.dims.n_heads // self._m.dims.n_kv_heads
        return x.repeat_interleave(groups, dim=0) if groups > 1 else x

    def W_Q_layer(self, layer: int) -> Float[Tensor, "n_heads d_model d_head"]:
        return self.qkv(layer)[0]

    def W_K_layer(self, layer: int) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._expand(self.qkv(layer)[1])

    def W_V_layer(self, layer: int) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._expand(self.qkv(layer)[2])

    def W_O_layer(self, layer: int) -> Float[Tensor, "n_heads d_head d_model"]:
        m, d = self._m, self._m.dims
        w = m.adapter.orientation.in_out(parameter(m.layer_module(layer, m.adapter.o_proj)))
        return w.reshape(d.n_heads, d.d_head, d.d_model).detach()

    def b_O_layer(self, layer: int) -> Float[Tensor, " d_model"]:
        m = self._m
        mod = m.layer_module(layer, m.adapter.o_proj)
        return _bias(mod, m.dims.d_model, parameter(mod)).detach()

    # MLP --------------------------------------------------------------------------------------------
    def mlp(self, layer: int) -> dict[str, Tensor | None]:
        """W_in, W_gate (None if not gated), W_out, b_in, b_gate, b_out of one layer."""
        m, a, d = self._m, self._m.adapter, self._m.dims
        orient, kind = a.orientation, a.mlp_kind
        first = m.layer_module(layer, a.mlp_in)
        down = m.layer_module(layer, a.mlp_down)
        w_first = orient.in_out(parameter(first))
        b_first = _bias(first, w_first.shape[1], w_first)
        w_out = orient.in_out(parameter(down))
        b_out = _bias(down, d.d_model, w_out)
        if not kind.gated:
            w_in, b_in, w_gate, b_gate = w_first, b_first, None, None
        elif kind.fused:
            w_gate, w_in, b_gate, b_in = kind.split_fused(w_first, b_first, d.d_mlp)
        else:
            assert a.mlp_up is not None
            up = m.layer_module(layer, a.mlp_up)
            w_in = orient.in_out(parameter(up))
            b_in = _bias(up, d.d_mlp, w_in)
            w_gate, b_gate = w_first, b_first
        out = {"W_in": w_in, "W_gate": w_gate, "W_out": w_out, "b_in": b_in, "b_gate": b_gate, "b_out": b_out}
        return {k: (v.detach() if v is not None else None) for k, v in out.items()}

    # Stacked views ------------------------------------------------------------------------------------
    def _stack(self, fn: str) -> Tensor:
        return torch.stack([getattr(self, fn)(layer) for layer in range(self._m.dims.n_layers)])

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("W_Q_layer")

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("W_K_layer")

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("W_V_layer")

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        return self._stack("W_O_layer")

    @property
    def b_Q(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return torch.stack([self.qkv(i)[3] for i in range(self._m.dims.n_layers)])

    @property
    def b_K(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return torch.stack([self._expand(self.qkv(i)[4]) for i in range(self._m.dims.n_layers)])

    @property
    def b_V(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return torch.stack([self._expand(self.qkv(i)[5]) for i in range(self._m.dims.n_layers)])

    @property
    def b_O(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack("b_O_layer")

    def _mlp_stack(self, key: str) -> Tensor:
        parts = [self.mlp(i)[key] for i in range(self._m.dims.n_layers)]
        if any(p is None for p in parts):
            raise AttributeError(f"{key} does not exist: the {self._m.dims.family} MLP is not gated")
        return torch.stack([p for p in parts if p is not None])

    @property
    def W_in(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._mlp_stack("W_in")

    @property
    def W_gate(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._mlp_stack("W_gate")

    @property
    def W_out(self) -> Float[Tensor, "n_layers d_mlp d_model"]:
        return self._mlp_stack("W_out")

    @property
    def b_in(self) -> Float[Tensor, "n_layers d_mlp"]:
        return self._mlp_stack("b_in")

    @property
    def b_out(self) -> Float[Tensor, "n_layers d_model"]:
        return self._mlp_stack("b_out")

    # Embeddings ---------------------------------------------------------------------------------------
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """Token embedding rows as they enter the residual stream (Gemma's sqrt(d_model) scale included)."""
        emb = self._m.module(self._m.adapter.embed)
        scale = getattr(emb, "embed_scale", None)
        w = parameter(emb).detach()
        return w * scale.to(w.dtype) if isinstance(scale, Tensor) else (w * scale if scale else w)

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        if self._m.adapter.pos_embed is None:
            raise AttributeError(f"W_pos does not exist: {self._m.dims.family} has no learned position embedding")
        return parameter(self._m.module(self._m.adapter.pos_embed)).detach()

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return parameter(self._m.module(self._m.adapter.unembed)).detach().T

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        head = self._m.module(self._m.adapter.unembed)
        return _bias(head, self._m.dims.d_vocab, parameter(head)).detach()


__all__ = ["WeightViews", "in_out"]
