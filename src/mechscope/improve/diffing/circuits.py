"""Circuit comparison by edges: the same edge-attribution discovery (EAP or EAP-IG) on two models, and
which edges the second model's circuit gained, lost or re-weighted -- e.g. before and after a fine-tune.

Both models are scored on the same task (clean and corrupted prompts of equal token shape, a metric per
model) over their computational graphs (``locate.circuits.Graph``: input, heads, MLPs, logits). Edges
are matched by name (``a2.h2->logits``), so the comparison is edge for edge where the graphs share edges
(models of one architecture share all of them). The change of an edge is ``score_b - score_a``; each
model's circuit is its `top` edges by ``|score|``, and their overlap is the Jaccard index of the two sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mechscope.errors import ConfigError
from mechscope.results import Result

if TYPE_CHECKING:
    from mechscope.locate.circuits.ablation import Metric
    from mechscope.locate.circuits.circuit import EdgeScores
    from mechscope.model.hooked import HookedModel, Inputs

METHODS = ("eap", "eap-ig")


class CircuitDiff(Result):
    """``score_a`` / ``score_b`` / ``change [edge]``: each shared edge's attribution in model A and B and
    ``score_b - score_a``. ``config``: ``top``, the two circuits (``top_a``, ``top_b``: edge names by
    decreasing ``|score|``), ``gained`` / ``lost`` (in B's circuit and not A's / the reverse), ``jaccard``
    of the two circuits, the ``correlation`` of the scores over every shared edge, the ``names``."""

    method = "circuit_diff"

    def default_tensor(self) -> str:
        return "change"

    @property
    def jaccard(self) -> float:
        return float(self.config["jaccard"])

    def ranking(self, top: int | None = None) -> list[tuple[str, float]]:
        """Edges by decreasing ``|score_b - score_a|`` (the change), with the signed change."""
        change = self["change"]
        order = change.abs().argsort(descending=True, stable=True).tolist()
        ranked = [(self.labels["edge"][i], float(change[i])) for i in order]
        return ranked if top is None else ranked[:top]

    def summary(self, top: int = 5) -> str:
        """A Markdown summary: overlap of the circuits, the most changed edges, gained and lost edges."""
        a, b = self.config["names"]
        lines = [
            f"circuits of {a} and {b} ({self.config['method']}, top {self.config['top']} edges): Jaccard "
            f"{self.jaccard:.3g}, score correlation {self.config['correlation']:.3g}",
            "- most changed: " + ", ".join(f"`{e}` {v:+.3g}" for e, v in self.ranking(top)),
            f"- gained by {b}: " + (", ".join(f"`{e}`" for e in self.config["gained"][:top]) or "none"),
            f"- lost by {b}: " + (", ".join(f"`{e}`" for e in self.config["lost"][:top]) or "none"),
        ]
        return "\n".join(lines)

    def plot(self, name: str | None = None, *, reduce: Sequence[str] = ("batch",), title: str | None = None) -> Any:
        """Each shared edge's score in A against B (circuit edges marked), and the most changed edges."""
        if name is not None:
            return super().plot(name, reduce=reduce, title=title)
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        a, b = self.config["names"]
        edges = self.labels["edge"]
        in_circuit = set(self.config["top_a"]) | set(self.config["top_b"])
        marked = [i for i, e in enumerate(edges) if e in in_circuit]
        fig = make_subplots(rows=1, cols=2, subplot_titles=[f"edge score: {a} vs {b}", "largest changes"])
        fig.add_trace(
            go.Scattergl(
                x=self["score_a"].tolist(),
                y=self["score_b"].tolist(),
                mode="markers",
                marker={"size": 4, "color": "lightgray"},
                text=edges,
                name="edges",
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=[float(self["score_a"][i]) for i in marked],
                y=[float(self["score_b"][i]) for i in marked],
                mode="markers",
                marker={"size": 7, "color": "crimson"},
                text=[edges[i] for i in marked],
                name="circuit edges",
            ),
            row=1,
            col=1,
        )
        ranked = self.ranking(15)[::-1]
        fig.add_trace(
            go.Bar(x=[v for _, v in ranked], y=[e for e, _ in ranked], orientation="h", name="change"), row=1, col=2
        )
        fig.update_xaxes(title_text=a, row=1, col=1)
        fig.update_yaxes(title_text=b, row=1, col=1)
        fig.update_xaxes(title_text=f"score in {b} - score in {a}", row=1, col=2)
        fig.update_layout(title=title or f"circuit diff: {a} vs {b} (Jaccard {self.jaccard:.2f})")
        return fig


def _top(names: list[str], scores: torch.Tensor, k: int) -> list[str]:
    order = scores.abs().argsort(descending=True, stable=True)[:k].tolist()
    return [names[i] for i in order]


def compare_edge_scores(
    scores_a: EdgeScores, scores_b: EdgeScores, *, top: int = 20, names: tuple[str, str] = ("A", "B")
) -> CircuitDiff:
    """Compare two :class:`~mechscope.locate.circuits.circuit.EdgeScores` edge for edge (shared edge names)."""
    if not isinstance(top, int) or top < 1:
        raise ConfigError(f"top must be a positive int; got {top!r}")
    edges_a, edges_b = list(scores_a.edge_names), list(scores_b.edge_names)
    index_b = {e: i for i, e in enumerate(edges_b)}
    shared = [e for e in edges_a if e in index_b]
    if not shared:
        raise ConfigError(
            f"the two graphs share no edge: A has {len(edges_a)} (e.g. {edges_a[:2]}), B {len(edges_b)} "
            f"(e.g. {edges_b[:2]}); edge comparison needs models with common node names"
        )
    index_a = {e: i for i, e in enumerate(edges_a)}
    a = scores_a["scores"].double()[[index_a[e] for e in shared]]
    b = scores_b["scores"].double()[[index_b[e] for e in shared]]
    top = min(top, len(shared))
    top_a, top_b = _top(shared, a, top), _top(shared, b, top)
    set_a, set_b = set(top_a), set(top_b)
    centred = torch.stack([a - a.mean(), b - b.mean()])
    norms = centred.norm(dim=1)
    correlation = float((centred[0] @ centred[1]) / (norms[0] * norms[1])) if bool((norms > 0).all()) else float("nan")
    method = scores_a.config.get("method", "?")
    if scores_b.config.get("method", "?") != method:
        method = f"{method} / {scores_b.config.get('method', '?')}"
    return CircuitDiff(
        tensors={"score_a": a, "score_b": b, "change": b - a},
        axes={"score_a": ("edge",), "score_b": ("edge",), "change": ("edge",)},
        labels={"edge": shared},
        config={
            "names": list(names),
            "method": method,
            "top": top,
            "top_a": top_a,
            "top_b": top_b,
            "gained": [e for e in top_b if e not in set_a],
            "lost": [e for e in top_a if e not in set_b],
            "jaccard": len(set_a & set_b) / len(set_a | set_b),
            "correlation": correlation,
            "shared_edges": len(shared),
            "edges": [len(edges_a), len(edges_b)],
        },
    )


def circuit_diff(
    model_a: HookedModel,
    model_b: HookedModel,
    clean: Inputs,
    corrupt: Inputs,
    metric_a: Metric,
    metric_b: Metric | None = None,
    *,
    top: int = 20,
    method: str = "eap-ig",
    steps: int = 5,
    names: tuple[str, str] = ("A", "B"),
) -> CircuitDiff:
    """Run the same edge attribution (``"eap"`` or ``"eap-ig"`` with `steps`) on both models for one task
    (clean and corrupted prompts of equal token shape, texts or token ids) and compare the edges
    (`metric_b` defaults to `metric_a`: models sharing a vocabulary)."""
    from mechscope.locate.circuits.eap import eap, eap_ig

    if method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}; got {method!r}")
    if not isinstance(top, int) or top < 1:
        raise ConfigError(f"top must be a positive int; got {top!r}")

    def score(model: HookedModel, metric: Metric) -> EdgeScores:
        if method == "eap":
            return eap(model, clean, corrupt, metric)
        return eap_ig(model, clean, corrupt, metric, steps=steps)

    scores_a = score(model_a, metric_a)
    scores_b = score(model_b, metric_b if metric_b is not None else metric_a)
    return compare_edge_scores(scores_a, scores_b, top=top, names=names)


__all__ = ["METHODS", "CircuitDiff", "circuit_diff", "compare_edge_scores"]
