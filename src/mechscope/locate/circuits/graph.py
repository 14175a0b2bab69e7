"""The computational graph of a residual-stream transformer, as used for circuit discovery.

Upstream nodes write to the residual stream: ``input`` (token + position embeddings, i.e. the input of
layer 0), every attention head ``a{L}.h{H}`` (its ``hook_result``; in families that normalise the attention
output before the residual add, Gemma 2/3, its share of that output at the scale the whole output gets, as
in direct logit attribution) and every MLP ``m{L}`` (what it adds, after any post-norm). Receivers read
from it: each head's query ``a{L}.h{H}.q``, each key/value head's key and value (``a{L}.h{G}.k``/``.v``,
or ``a{L}.kv{G}.k``/``.v`` when grouped-query attention shares them between heads), every MLP ``m{L}``
and ``logits`` (the final norm's input). An edge joins an upstream node to every receiver that comes
after it in the forward pass: attention receivers of layer L read everything before layer L; the MLP of
layer L also reads the heads of layer L in sequential blocks, but not in parallel-attention blocks.

Edges are stored as a boolean ``[n_upstream, n_receivers]`` validity matrix; a circuit or a score is a
vector over the edges in row-major order of that matrix (upstream-major).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechscope.errors import AdapterError, MechscopeError, ShapeError, did_you_mean

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


class GraphError(MechscopeError, KeyError):
    """An unknown node or edge name, or a graph that does not belong to the model it is used with."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Node:
    """One node. `kind`: ``input | head | mlp`` (upstream) or ``q | k | v | mlp | logits`` (receiver)."""

    name: str
    kind: str
    layer: int | None = None
    head: int | None = None


@dataclass(frozen=True)
class ReceiverGroup:
    """Receivers that read the residual stream at one point: the prefix of upstream nodes they can
    read and the slice of receiver indices they occupy."""

    n_upstream: int
    receivers: slice


class Graph:
    """Nodes and edges of one model's computational graph (see the module docstring)."""

    def __init__(
        self, *, n_layers: int, n_heads: int, n_kv_heads: int, parallel: bool, family: str = "", d_model: int = 0
    ) -> None:
        if n_layers < 1 or n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ShapeError(
                f"graph needs n_layers >= 1 and n_heads divisible by n_kv_heads; got n_layers={n_layers}, "
                f"n_heads={n_heads}, n_kv_heads={n_kv_heads}"
            )
        self.n_layers, self.n_heads, self.n_kv_heads = n_layers, n_heads, n_kv_heads
        self.parallel, self.family, self.d_model = parallel, family, d_model
        gqa = n_kv_heads != n_heads
        kv = "kv" if gqa else "h"
        up: list[Node] = [Node("input", "input")]
        recv: list[Node] = []
        for layer in range(n_layers):
            up += [Node(f"a{layer}.h{h}", "head", layer, h) for h in range(n_heads)]
            up.append(Node(f"m{layer}", "mlp", layer))
            recv += [Node(f"a{layer}.h{h}.q", "q", layer, h) for h in range(n_heads)]
            for kind in ("k", "v"):
                recv += [Node(f"a{layer}.{kv}{g}.{kind}", kind, layer, g) for g in range(n_kv_heads)]
            recv.append(Node(f"m{layer}", "mlp", layer))
        recv.append(Node("logits", "logits"))
        self.upstream: tuple[Node, ...] = tuple(up)
        self.receivers: tuple[Node, ...] = tuple(recv)
        valid = torch.zeros(len(up), len(recv), dtype=torch.bool)
        for layer in range(n_layers):
            attn, mlp = self.attn_group(layer), self.mlp_group(layer)
            valid[: attn.n_upstream, attn.receivers] = True
            valid[: mlp.n_upstream, mlp.receivers] = True
        valid[:, -1] = True
        self.valid: Bool[Tensor, "n_upstream n_receivers"] = valid
        self._up_index = {n.name: i for i, n in enumerate(up)}
        self._recv_index = {n.name: i for i, n in enumerate(recv)}

    @classmethod
    def from_model(cls, model: HookedModel) -> Graph:
        """The graph of `model`; :class:`AdapterError` for families whose heads are not additive."""
        a, d = model.adapter, model.dims
        if a.post_attn_norm is not None and bool(model.weights.b_O.any()):
            raise AdapterError(
                f"this {a.family} model has an attention output bias; through the norm after attention "
                f"({a.post_attn_norm}) its share of the output changes from run to run, so head outputs alone "
                "would not add up to what attention writes. Circuit graphs support post-norm models without it "
                "(as Gemma 2 and 3 ship)."
            )
        return cls(
            n_layers=d.n_layers,
            n_heads=d.n_heads,
            n_kv_heads=d.n_kv_heads,
            parallel=d.parallel,
            family=d.family,
            d_model=d.d_model,
        )

    # Structure ----------------------------------------------------------------------------------------
    def _layer_start(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1)

    def attn_group(self, layer: int) -> ReceiverGroup:
        """The q/k/v receivers of `layer` (queries, then keys, then values)."""
        start = layer * (self.n_heads + 2 * self.n_kv_heads + 1)
        return ReceiverGroup(self._layer_start(layer), slice(start, start + self.n_heads + 2 * self.n_kv_heads))

    def mlp_group(self, layer: int) -> ReceiverGroup:
        index = (layer + 1) * (self.n_heads + 2 * self.n_kv_heads + 1) - 1
        n_up = self._layer_start(layer) + (0 if self.parallel else self.n_heads)
        return ReceiverGroup(n_up, slice(index, index + 1))

    def logits_group(self) -> ReceiverGroup:
        return ReceiverGroup(len(self.upstream), slice(len(self.receivers) - 1, len(self.receivers)))

    def head_slice(self, layer: int) -> slice:
        """Upstream indices of the heads of `layer`."""
        start = self._layer_start(layer)
        return slice(start, start + self.n_heads)

    def mlp_index(self, layer: int) -> int:
        return self._layer_start(layer) + self.n_heads

    @cached_property
    def edge_index(self) -> tuple[Tensor, Tensor]:
        """(upstream index, receiver index) of every edge, upstream-major."""
        up, recv = self.valid.nonzero(as_tuple=True)
        return up, recv

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    @cached_property
    def edge_names(self) -> list[str]:
        up, recv = self.edge_index
        return [f"{self.upstream[u].name}->{self.receivers[r].name}" for u, r in zip(up.tolist(), recv.tolist())]

    @cached_property
    def _edge_lookup(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.edge_names)}

    def edge(self, name: str) -> int:
        """Index of the edge ``"<upstream>-><receiver>"``; :class:`GraphError` naming close edges otherwise."""
        found = self._edge_lookup.get(name)
        if found is not None:
            return found
        src, _, dst = name.partition("->")
        if src and src not in self._up_index:
            self.upstream_index(src)
        if dst and dst not in self._recv_index:
            self.receiver_index(dst)
        raise GraphError(
            f"no edge {name!r} in this graph (edges are '<upstream>-><receiver>' with the upstream node before "
            f"the receiver).{did_you_mean(name, self.edge_names)}"
        )

    def upstream_index(self, name: str) -> int:
        if name not in self._up_index:
            raise GraphError(
                f"unknown upstream node {name!r}; upstream nodes are 'input', 'a<L>.h<H>' and 'm<L>' "
                f"(layers 0..{self.n_layers - 1}, heads 0..{self.n_heads - 1}).{did_you_mean(name, self._up_index)}"
            )
        return self._up_index[name]

    def receiver_index(self, name: str) -> int:
        if name not in self._recv_index:
            raise GraphError(
                f"unknown receiver node {name!r}; receivers are 'a<L>.h<H>.q', key/value heads '.k'/'.v', 'm<L>' "
                f"and 'logits'.{did_you_mean(name, self._recv_index)}"
            )
        return self._recv_index[name]

    # Edge vectors <-> dense matrices ----------------------------------------------------------------------
    def dense(self, edges: Tensor, fill: float = 1.0) -> Float[Tensor, "n_upstream n_receivers"]:
        """Scatter an ``[n_edges]`` vector into ``[n_upstream, n_receivers]`` (non-edges get `fill`)."""
        if edges.shape != (self.n_edges,):
            raise ShapeError(f"edge vector must have shape [n_edges]=({self.n_edges},); got {tuple(edges.shape)}")
        out = torch.full(self.valid.shape, fill, dtype=edges.dtype, device=edges.device)
        up, recv = self.edge_index
        return out.index_put((up.to(edges.device), recv.to(edges.device)), edges)

    def flat(self, matrix: Tensor) -> Tensor:
        """The ``[n_edges]`` entries of an ``[n_upstream, n_receivers]`` matrix."""
        if matrix.shape != self.valid.shape:
            raise ShapeError(f"edge matrix must be {tuple(self.valid.shape)}; got {tuple(matrix.shape)}")
        up, recv = self.edge_index
        return matrix[up.to(matrix.device), recv.to(matrix.device)]

    def edges_mask(self, names: list[str] | tuple[str, ...]) -> Bool[Tensor, " n_edges"]:
        """A boolean edge vector keeping exactly the named edges."""
        keep = torch.zeros(self.n_edges, dtype=torch.bool)
        for name in names:
            keep[self.edge(name)] = True
        return keep

    def signature(self) -> dict[str, object]:
        """What identifies this graph's shape (stored in exported circuits and checked on import)."""
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "parallel": self.parallel,
            "family": self.family,
        }

    def check_model(self, model: HookedModel) -> None:
        """Raise :class:`GraphError` when `model` does not have this graph's shape."""
        d = model.dims
        got = (d.n_layers, d.n_heads, d.n_kv_heads, d.parallel)
        want = (self.n_layers, self.n_heads, self.n_kv_heads, self.parallel)
        if got != want:
            raise GraphError(f"graph (n_layers, n_heads, n_kv_heads, parallel)={want} does not match the model's {got}")

    def __repr__(self) -> str:
        return (
            f"Graph({self.family or 'model'}: {len(self.upstream)} upstream nodes, {len(self.receivers)} receivers, "
            f"{self.n_edges} edges{', parallel' if self.parallel else ''})"
        )


def node_of(receiver_or_node: str) -> str:
    """``a1.h2.q`` -> ``a1.h2``; key/value receivers of GQA keep their ``kv`` name; others unchanged."""
    parts = receiver_or_node.split(".")
    return ".".join(parts[:2]) if len(parts) == 3 else receiver_or_node


__all__ = [
    "Graph",
    "GraphError",
    "Node",
    "ReceiverGroup",
    "node_of",
]
