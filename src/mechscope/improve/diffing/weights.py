"""Weight view of a model diff: how much each component's parameters moved.

Every parameter is split into components on mechscope's grid: the embeddings, each attention head (its
query rows, output columns and -- when it owns them -- key/value rows; grouped-query key/value heads are
their own ``kv_head`` components), the rest of each attention module (output bias), each MLP, each norm,
the final norm and the unembedding. The split is a partition: the squared change summed over components
equals the squared change summed over parameters. A component's relative change is
``||W_tuned - W_base|| / ||W_base||`` over all its entries (Frobenius).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

MATRICES = ("W_Q", "W_K", "W_V", "W_O")


@dataclass
class WeightDiff:
    """Squared norms per component: of the change (``delta_sq``) and of the base weights (``base_sq``),
    in component order; ``heads [layer, head, matrix]``: each head's relative change of W_Q/W_K/W_V/W_O
    (key/value heads shown on every query head they serve)."""

    components: list[str]
    delta_sq: Float[Tensor, " component"]
    base_sq: Float[Tensor, " component"]
    heads: Float[Tensor, "layer head matrix"]

    def relative(self) -> Float[Tensor, " component"]:
        return self.delta_sq.sqrt() / self.base_sq.sqrt().clamp_min(1e-12)


class _Tally:
    def __init__(self) -> None:
        self.delta: dict[str, float] = {}
        self.base: dict[str, float] = {}

    def add(self, component: str, tuned: Tensor, base: Tensor) -> None:
        t, b = tuned.detach().double().cpu(), base.detach().double().cpu()
        self.delta[component] = self.delta.get(component, 0.0) + float((t - b).pow(2).sum())
        self.base[component] = self.base.get(component, 0.0) + float(b.pow(2).sum())


def _head_parts(base: HookedModel, tuned: HookedModel, layer: int, tally: _Tally) -> Tensor:
    """Tally one layer's heads; returns the per-head relative change ``[head, matrix]``."""
    d = base.dims
    qb, kb, vb, bqb, bkb, bvb = base.weights.qkv(layer)
    qt, kt, vt, bqt, bkt, bvt = tuned.weights.qkv(layer)
    ob, ot = base.weights.W_O_layer(layer), tuned.weights.W_O_layer(layer)
    own_kv = d.n_kv_heads == d.n_heads
    group = d.n_heads // d.n_kv_heads
    rel = torch.zeros(d.n_heads, len(MATRICES), dtype=torch.float64)

    def ratio(t: Tensor, b: Tensor) -> float:
        return float((t - b).double().norm() / b.double().norm().clamp_min(1e-12))

    for h in range(d.n_heads):
        name = f"blocks.{layer}.attn.head.{h}"
        tally.add(name, qt[h], qb[h])
        tally.add(name, bqt[h], bqb[h])
        tally.add(name, ot[h], ob[h])
        g = h // group
        rel[h] = torch.tensor([ratio(qt[h], qb[h]), ratio(kt[g], kb[g]), ratio(vt[g], vb[g]), ratio(ot[h], ob[h])])
    for g in range(d.n_kv_heads):
        name = f"blocks.{layer}.attn.head.{g}" if own_kv else f"blocks.{layer}.attn.kv_head.{g}"
        for t, b in ((kt[g], kb[g]), (vt[g], vb[g]), (bkt[g], bkb[g]), (bvt[g], bvb[g])):
            tally.add(name, t, b)
    return rel


def _layer_component(model: HookedModel, layer: int, path: str) -> str:
    """The component of a layer parameter at `path` (relative to the layer), other than head weights."""
    a = model.adapter
    named = [(a.mlp, "mlp"), (a.ln1, "ln1"), (a.ln2, "ln2"), (a.post_attn_norm, "ln_attn_out")]
    named += [(a.post_mlp_norm, "ln_mlp_out"), (a.attn, "attn")]
    for module, label in named:
        if module is not None and (path == module or path.startswith(module + ".")):
            return f"blocks.{layer}.{label}"
    return f"blocks.{layer}.{path.rsplit('.', 1)[0]}"


def _global_component(model: HookedModel, name: str) -> str:
    a = model.adapter
    for module, label in ((a.embed, "embed"), (a.pos_embed, "pos_embed"), (a.final_norm, "ln_final")):
        if module is not None and name.startswith(module + "."):
            return label
    if name.startswith(a.unembed + "."):
        return "unembed"
    return name.rsplit(".", 1)[0]


def _head_owned(model: HookedModel, layer: int) -> set[str]:
    """Layer-relative parameter names the head split accounts for (q/k/v weights and biases, W_O)."""
    a = model.adapter
    owned = {f"{a.q_proj}.weight", f"{a.q_proj}.bias", f"{a.o_proj}.weight"}
    for proj in (a.k_proj, a.v_proj):
        if proj is not None:
            owned |= {f"{proj}.weight", f"{proj}.bias"}
    return owned


def weight_diff(base: HookedModel, tuned: HookedModel) -> WeightDiff:
    """The change of every component's weights between two models of one architecture (checked by the caller)."""
    tally = _Tally()
    heads = torch.stack([_head_parts(base, tuned, layer, tally) for layer in range(base.dims.n_layers)])
    prefix = base.adapter.layers + "."
    owned = {layer: _head_owned(base, layer) for layer in range(base.dims.n_layers)}
    tuned_params = dict(tuned.hf_model.named_parameters())
    for name, p_base in base.hf_model.named_parameters():
        p_tuned = tuned_params[name]
        if name.startswith(prefix):
            layer_str, path = name[len(prefix) :].split(".", 1)
            layer = int(layer_str)
            if path in owned[layer]:
                continue
            component = _layer_component(base, layer, path)
        else:
            component = _global_component(base, name)
        tally.add(component, p_tuned, p_base)
    components = list(tally.delta)
    return WeightDiff(
        components=components,
        delta_sq=torch.tensor([tally.delta[c] for c in components], dtype=torch.float64),
        base_sq=torch.tensor([tally.base[c] for c in components], dtype=torch.float64),
        heads=heads,
    )


__all__ = ["MATRICES", "WeightDiff", "weight_diff"]
