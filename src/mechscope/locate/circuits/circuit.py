"""Results of circuit discovery: per-edge scores and circuits (a kept subset of edges)."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.locate.circuits.graph import Graph, node_of
from mechscope.results import Result


def graph_of(result: Result) -> Graph:
    """The graph a circuit result was computed on (from its recorded signature)."""
    sig = result.config.get("graph")
    if not isinstance(sig, dict):
        raise ConfigError(f"{type(result).__name__} has no recorded graph signature in its config")
    return Graph(
        n_layers=int(sig["n_layers"]),
        n_heads=int(sig["n_heads"]),
        n_kv_heads=int(sig["n_kv_heads"]),
        parallel=bool(sig["parallel"]),
        family=str(sig.get("family", "")),
    )


def _edge_matrix(graph: Graph, values: Tensor) -> Any:
    """A plotly heatmap of edge values laid out [upstream, receiver] (non-edges blank)."""
    import plotly.graph_objects as go

    dense = graph.dense(values.detach().float(), fill=float("nan"))
    return go.Heatmap(
        z=[[None if v != v else v for v in row] for row in dense.tolist()],
        y=[n.name for n in graph.upstream],
        x=[n.name for n in graph.receivers],
        colorscale="RdBu",
        zmid=0,
    )


class EdgeScores(Result):
    """``scores [edge]``: the estimated change of the metric when each edge alone is ablated (EAP,
    EAP-IG); ``metric`` (0-d): the metric of the full model on the clean prompts."""

    method = "edge_scores"

    def default_tensor(self) -> str:
        return "scores"

    @property
    def graph(self) -> Graph:
        return graph_of(self)

    @property
    def edge_names(self) -> list[str]:
        return self.labels["edge"]

    def ranking(self) -> Tensor:
        """Edge indices by decreasing |score|."""
        return self["scores"].abs().argsort(descending=True, stable=True)

    def top(self, k: int) -> Circuit:
        """The circuit of the `k` edges with the largest |score|."""
        n = self["scores"].shape[0]
        if not 0 <= k <= n:
            raise ConfigError(f"k must lie in [0, {n}] (the number of edges); got {k}")
        kept = torch.zeros(n, dtype=torch.bool)
        kept[self.ranking()[:k]] = True
        return Circuit.from_mask(self.graph, kept, scores=self["scores"], config={**self.config, "top_k": k})

    def plot(self, name: str | None = None, *, reduce: Any = ("batch",), title: str | None = None) -> Any:
        """Edge scores as an upstream x receiver heatmap."""
        import plotly.graph_objects as go

        fig = go.Figure(_edge_matrix(self.graph, self[name or "scores"]))
        fig.update_layout(
            title=title or f"{self.config.get('method', 'edge attribution')}: estimated effect of ablating each edge",
            xaxis_title="receiver",
            yaxis_title="upstream node",
        )
        fig.update_yaxes(autorange="reversed")
        return fig


class Circuit(Result):
    """``kept [edge]`` (bool): the edges in the circuit; ``scores [edge]``: the scores it was chosen by
    (zeros when none)."""

    method = "circuit"

    def default_tensor(self) -> str:
        return "kept"

    @classmethod
    def from_mask(
        cls,
        graph: Graph,
        kept: Bool[Tensor, " n_edges"],
        *,
        scores: Float[Tensor, " n_edges"] | None = None,
        config: dict[str, Any] | None = None,
    ) -> Circuit:
        if kept.shape != (graph.n_edges,):
            raise ConfigError(f"kept must be a [n_edges]=({graph.n_edges},) vector; got {tuple(kept.shape)}")
        values = torch.zeros(graph.n_edges) if scores is None else scores.detach().float().cpu()
        return cls(
            tensors={"kept": kept.detach().bool().cpu(), "scores": values},
            axes={"kept": ("edge",), "scores": ("edge",)},
            labels={"edge": graph.edge_names},
            config={**(config or {}), "graph": graph.signature()},
        )

    @classmethod
    def from_edges(cls, graph: Graph, names: list[str] | tuple[str, ...], **kwargs: Any) -> Circuit:
        return cls.from_mask(graph, graph.edges_mask(names), **kwargs)

    @property
    def graph(self) -> Graph:
        return graph_of(self)

    @property
    def mask(self) -> Bool[Tensor, " n_edges"]:
        return self["kept"].bool()

    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    @property
    def edges(self) -> list[str]:
        names = self.labels["edge"]
        return [names[i] for i in self.mask.nonzero().flatten().tolist()]

    def nodes(self) -> list[str]:
        """Upstream and receiver node names touched by a kept edge (receivers of heads folded into the head)."""
        seen: dict[str, None] = {}
        for edge in self.edges:
            for part in edge.split("->"):
                seen[node_of(part)] = None
        return list(seen)

    def plot(self, name: str | None = None, *, reduce: Any = ("batch",), title: str | None = None) -> Any:
        """The circuit as an interactive node-link figure (see :func:`circuit_figure`)."""
        from mechscope.locate.circuits.figure import circuit_figure

        return circuit_figure(self, title=title)


__all__ = ["Circuit", "EdgeScores", "graph_of"]
