"""How a family stores its weights: small objects that split, fuse and index heads, so no caller branches on strings.

An adapter (a data table) names its layouts; these objects carry the behaviour:

- :class:`QKVLayout` -- where queries, keys and values of each head live: three projections
  (``separate``), one fused projection ``[q | k | v]`` (``gpt2_fused``, ``concat_fused``) or one with heads
  interleaved ``[h0: q k v, h1: q k v, ...]`` (``neox_interleaved``). It splits fused weights, fuses
  per-head activations back into the module's output, and gives the output indices one head owns.
- :class:`MLPLayout` -- ``plain`` (one input projection), ``gated`` (gate and up projections) or
  ``gated_fused`` (``[gate | up]`` in one projection): which slice of the fused output is each site.
- :class:`Orientation` -- ``nn.Linear`` stores ``[out, in]``, GPT-2's ``Conv1D`` stores ``[in, out]``;
  every caller reads and writes weights through one of these instead of testing a flag.

New layouts register under a new name (:func:`register_qkv_layout`, :func:`register_mlp_layout`);
registering a taken name is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import AdapterError


@dataclass(frozen=True)
class HeadSizes:
    n_heads: int
    n_kv_heads: int
    d_head: int

    @property
    def widths(self) -> tuple[int, int, int]:
        """Output widths of the q, k and v parts."""
        return self.n_heads * self.d_head, self.n_kv_heads * self.d_head, self.n_kv_heads * self.d_head


# Orientation ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Orientation:
    """How a projection's weight is stored: ``conv1d`` ``[in, out]`` or Linear ``[out, in]``."""

    conv1d: bool

    def in_out(self, weight: Tensor) -> Float[Tensor, "d_in d_out"]:
        """The weight as ``[in, out]`` (a view)."""
        return weight if self.conv1d else weight.T

    def out_in(self, weight: Tensor) -> Float[Tensor, "d_out d_in"]:
        """The weight as ``[out, in]`` (a view)."""
        return weight.T if self.conv1d else weight

    def stored_from_out_in(self, matrix: Tensor) -> Tensor:
        """An ``[out, in]`` matrix in this storage orientation (e.g. an update to add to the weight)."""
        return matrix.T if self.conv1d else matrix

    def axis(self, which: str) -> int:
        """The stored axis that indexes the projection's inputs (``"in"``) or outputs (``"out"``)."""
        if which not in ("in", "out"):
            raise AdapterError(f"axis must be 'in' or 'out'; got {which!r}")
        return (0 if which == "in" else 1) if self.conv1d else (1 if which == "in" else 0)

    def project_out_of_outputs(self, weight: Tensor, basis: Float[Tensor, "k d_out"]) -> Tensor:
        """The weight with its outputs made orthogonal to the rows of `basis` (``(I - B^T B) W`` on the output
        side), computed in float32 and returned in the weight's dtype and orientation."""
        w = weight.float()
        if self.conv1d:  # [in, out]: project each row
            return (w - (w @ basis.T) @ basis).to(weight.dtype)
        return (w - basis.T @ (basis @ w)).to(weight.dtype)  # [out, in]: project each column


def in_out(module: Any, conv1d: bool) -> Tensor:
    """`module`'s weight as ``[in, out]``."""
    return Orientation(conv1d).in_out(module.weight)


# QKV -----------------------------------------------------------------------------------------------------
class QKVLayout:
    """Where each head's queries, keys and values live; subclasses implement one storage layout."""

    name: str = ""
    #: True when one projection computes q, k and v together.
    fused: bool = True

    def split(self, weight: Tensor, bias: Tensor, sizes: HeadSizes) -> tuple[list[Tensor], list[Tensor]]:
        """A fused ``[in, out]`` weight and ``[out]`` bias as ``[W_q, W_k, W_v]`` ``[in, heads * d_head]`` and
        their biases."""
        raise NotImplementedError

    def fuse(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Per-head activations ``[..., heads, d_head]`` back into the fused projection's output ``[..., out]``."""
        raise NotImplementedError

    def head_outputs(self, head: int, sizes: HeadSizes, *, with_kv: bool) -> list[range]:
        """Output indices of the query projection (the fused one when fused) that belong to `head` (and its own
        key and value when `with_kv`, i.e. without grouped-query sharing)."""
        raise NotImplementedError


def _flat(x: Tensor) -> Tensor:
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class SeparateQKV(QKVLayout):
    name, fused = "separate", False

    def split(self, weight: Tensor, bias: Tensor, sizes: HeadSizes) -> tuple[list[Tensor], list[Tensor]]:
        raise AdapterError("the separate q/k/v layout has three projections; there is nothing to split")

    def fuse(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _flat(q)  # the query projection's own output; k and v have their own modules

    def head_outputs(self, head: int, sizes: HeadSizes, *, with_kv: bool) -> list[range]:
        return [range(head * sizes.d_head, (head + 1) * sizes.d_head)]


class ConcatQKV(QKVLayout):
    """``[q | k | v]`` along the output axis (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def split(self, weight: Tensor, bias: Tensor, sizes: HeadSizes) -> tuple[list[Tensor], list[Tensor]]:
        widths = list(sizes.widths)
        return list(weight.split(widths, dim=1)), list(bias.split(widths, dim=0))

    def fuse(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.cat([_flat(q), _flat(k), _flat(v)], dim=-1)

    def head_outputs(self, head: int, sizes: HeadSizes, *, with_kv: bool) -> list[range]:
        dh, nq, nkv = sizes.d_head, sizes.n_heads, sizes.n_kv_heads
        ranges = [range(head * dh, (head + 1) * dh)]
        if with_kv:
            ranges += [range(nq * dh + head * dh, nq * dh + (head + 1) * dh)]
            ranges += [range((nq + nkv) * dh + head * dh, (nq + nkv) * dh + (head + 1) * dh)]
        return ranges


class InterleavedQKV(QKVLayout):
    """GPT-NeoX: per head ``[q, k, v]`` (``[heads, 3, d_head]`` along the output axis)."""

    name = "neox_interleaved"

    def split(self, weight: Tensor, bias: Tensor, sizes: HeadSizes) -> tuple[list[Tensor], list[Tensor]]:
        nq, dh = sizes.n_heads, sizes.d_head
        w3 = weight.reshape(weight.shape[0], nq, 3, dh)
        b3 = bias.reshape(nq, 3, dh)
        return [w3[:, :, i].reshape(weight.shape[0], nq * dh) for i in range(3)], [
            b3[:, i].reshape(nq * dh) for i in range(3)
        ]

    def fuse(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        stacked = torch.stack([q, k, v], dim=-2)  # [..., heads, 3, d_head]
        return stacked.reshape(*stacked.shape[:-3], -1)

    def head_outputs(self, head: int, sizes: HeadSizes, *, with_kv: bool) -> list[range]:
        dh = sizes.d_head
        base = head * 3 * dh
        return [range(base + i * dh, base + (i + 1) * dh) for i in (0, 1, 2)]


# MLP -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MLPLayout:
    """Input projections of an MLP. ``fused_slices``: for a fused ``[gate | up]`` projection, the output slice
    of each site kind (None when each site has its own module)."""

    name: str
    gated: bool
    fused: bool

    def fused_slices(self, d_mlp: int) -> dict[str, slice] | None:
        if not self.fused:
            return None
        return {"mlp.hook_pre": slice(0, d_mlp), "mlp.hook_pre_linear": slice(d_mlp, 2 * d_mlp)}

    def split_fused(self, weight: Tensor, bias: Tensor, d_mlp: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(W_gate, W_in, b_gate, b_in) of a fused ``[in, 2 * d_mlp]`` weight."""
        w_gate, w_in = weight.split(d_mlp, dim=1)
        b_gate, b_in = bias.split(d_mlp, dim=0)
        return w_gate, w_in, b_gate, b_in


# Registries ----------------------------------------------------------------------------------------------
_QKV: dict[str, QKVLayout] = {}
_MLP: dict[str, MLPLayout] = {}


def register_qkv_layout(layout: QKVLayout) -> QKVLayout:
    """Make `layout` available to adapters under ``layout.name`` (a taken name is refused)."""
    if not layout.name or layout.name in _QKV:
        raise AdapterError(f"a qkv layout named {layout.name!r} is already registered (or the name is empty)")
    _QKV[layout.name] = layout
    return layout


def register_mlp_layout(layout: MLPLayout) -> MLPLayout:
    """Make `layout` available to adapters under ``layout.name`` (a taken name is refused)."""
    if not layout.name or layout.name in _MLP:
        raise AdapterError(f"an MLP layout named {layout.name!r} is already registered (or the name is empty)")
    _MLP[layout.name] = layout
    return layout


for _layout in (SeparateQKV(), ConcatQKV("gpt2_fused"), ConcatQKV("concat_fused"), InterleavedQKV()):
    register_qkv_layout(_layout)
for _mlp in (MLPLayout("plain", False, False), MLPLayout("gated", True, False), MLPLayout("gated_fused", True, True)):
    register_mlp_layout(_mlp)


def qkv_layout(name: str) -> QKVLayout:
    if name not in _QKV:
        raise AdapterError(f"qkv_layout must be one of {sorted(_QKV)}; got {name!r}")
    return _QKV[name]


def mlp_layout(name: str) -> MLPLayout:
    if name not in _MLP:
        raise AdapterError(f"mlp_layout must be one of {sorted(_MLP)}; got {name!r}")
    return _MLP[name]


def qkv_layout_names() -> tuple[str, ...]:
    return tuple(_QKV)


def mlp_layout_names() -> tuple[str, ...]:
    return tuple(_MLP)


__all__ = [
    "HeadSizes",
    "MLPLayout",
    "Orientation",
    "QKVLayout",
    "in_out",
    "mlp_layout",
    "mlp_layout_names",
    "qkv_layout",
    "qkv_layout_names",
    "register_mlp_layout",
    "register_qkv_layout",
]
