"""Faithfulness: how much of the model's behaviour a circuit keeps when everything else is ablated.

``faithfulness = (m(circuit) - m(empty)) / (m(full) - m(empty))`` where ``m(circuit)`` is the metric with
every edge outside the circuit ablated, ``m(full)`` the model's own metric and ``m(empty)`` the metric with
every edge ablated (Wang et al. 2023; Hanna et al. 2024). A curve over circuit sizes, taking edges in the
order of their attribution scores, shows how many edges the behaviour needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.locate.circuits.ablation import Metric, ablation_values, metric_rows, tokens_pair
from mechscope.locate.circuits.circuit import Circuit, EdgeScores
from mechscope.locate.circuits.forward import graph_forward
from mechscope.locate.circuits.graph import Graph
from mechscope.locate.metrics import kl_to_reference, last_positions
from mechscope.results import Result

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs


class CircuitEvaluator:
    """Runs the graph forward on fixed prompts and ablation values for any edge mask.

    With a `metric`, ``metric(mask)`` is its batch mean; :meth:`damage` is the KL divergence of the
    circuit's next-token distribution from the full model's at each row's last token (no metric) or
    the absolute change of the metric (with one).
    """

    def __init__(
        self,
        model: HookedModel,
        clean: Inputs,
        corrupt: Inputs | None,
        metric: Metric | None,
        *,
        ablation: str = "resample",
        graph: Graph | None = None,
    ) -> None:
        self.model, self.metric_fn, self.ablation = model, metric, ablation
        self.graph = graph or Graph.from_model(model)
        self.graph.check_model(model)
        self.tokens, corrupt_t = tokens_pair(model, clean, corrupt, ablation)
        self.logits, _, self.ablated = ablation_values(model, self.graph, self.tokens, corrupt_t, ablation)
        self.last = last_positions(self.tokens["attention_mask"])
        self.full_metric = self._metric(self.logits) if metric is not None else 0.0
        self.forwards = 0

    def _metric(self, logits: Tensor) -> float:
        assert self.metric_fn is not None
        return float(metric_rows(self.metric_fn, logits, self.tokens["attention_mask"]).float().mean())

    @torch.no_grad()
    def run(self, mask: Bool[Tensor, " n_edges"]) -> Tensor:
        self.forwards += 1
        return graph_forward(self.model, self.graph, self.tokens, mask.float(), ablated=self.ablated)

    def metric(self, mask: Bool[Tensor, " n_edges"]) -> float:
        if self.metric_fn is None:
            raise ConfigError("this evaluator has no metric; pass metric= to evaluate circuits by a metric")
        return self._metric(self.run(mask))

    def damage(self, mask: Bool[Tensor, " n_edges"]) -> float:
        logits = self.run(mask)
        if self.metric_fn is None:
            return float(kl_to_reference(logits, self.logits, position=self.last).mean())
        return abs(self._metric(logits) - self.full_metric)


class Faithfulness(Result):
    """0-d tensors ``circuit``, ``full``, ``empty`` (metric means) and ``faithfulness``; ``n_edges``."""

    method = "circuit_faithfulness"

    def default_tensor(self) -> str:
        return "faithfulness"

    @property
    def value(self) -> float:
        return float(self["faithfulness"])


class FaithfulnessCurve(Result):
    """``n_edges [point]``, ``metric [point]`` and ``faithfulness [point]`` over circuit sizes taken in
    score order; ``full`` and ``empty`` (0-d) the metric of the model and of the fully ablated graph."""

    method = "faithfulness_curve"

    def default_tensor(self) -> str:
        return "faithfulness"

    def plot(self, name: str | None = None, *, reduce: Any = ("batch",), title: str | None = None) -> Any:
        import plotly.graph_objects as go

        fig = go.Figure(
            go.Scatter(x=self["n_edges"].tolist(), y=self[name or "faithfulness"].tolist(), mode="lines+markers")
        )
        fig.update_layout(
            title=title or "faithfulness vs circuit size",
            xaxis_title="edges kept (by |score|)",
            yaxis_title=name or "faithfulness",
        )
        fig.update_xaxes(type="log" if int(self["n_edges"].max()) > 100 else "linear")
        return fig


def _ratio(value: float, full: float, empty: float) -> float:
    gap = full - empty
    if gap == 0:
        raise ConfigError(
            f"faithfulness is undefined: the full model and the fully ablated graph give the same metric ({full}); "
            "choose a metric or ablation under which the behaviour differs"
        )
    return (value - empty) / gap


def faithfulness(
    model: HookedModel,
    circuit: Circuit,
    clean: Inputs,
    corrupt: Inputs | None,
    metric: Metric,
    *,
    ablation: str = "resample",
    evaluator: CircuitEvaluator | None = None,
) -> Faithfulness:
    """The circuit's metric with its complement ablated, against the full model and the empty graph."""
    ev = evaluator or CircuitEvaluator(model, clean, corrupt, metric, ablation=ablation, graph=circuit.graph)
    mask = circuit.mask
    if mask.shape != (ev.graph.n_edges,):
        raise ConfigError(f"circuit has {mask.shape[0]} edges; this model's graph has {ev.graph.n_edges}")
    full = ev.metric(torch.ones_like(mask))
    empty = ev.metric(torch.zeros_like(mask))
    value = ev.metric(mask)
    t = lambda x: torch.tensor(float(x))  # noqa: E731
    return Faithfulness(
        tensors={
            "circuit": t(value),
            "full": t(full),
            "empty": t(empty),
            "faithfulness": t(_ratio(value, full, empty)),
            "n_edges": t(circuit.n_edges),
        },
        axes={k: () for k in ("circuit", "full", "empty", "faithfulness", "n_edges")},
        config={"ablation": ev.ablation, "graph": ev.graph.signature()},
    )


def default_sizes(n_edges: int) -> list[int]:
    """0, 1, 2, 5, 10, 20, 50, ... up to and including `n_edges`."""
    sizes, base = [0], 1
    while base < n_edges:
        sizes += [s for s in (base, 2 * base, 5 * base) if s < n_edges]
        base *= 10
    return [*sorted(set(sizes)), n_edges]


def faithfulness_curve(
    model: HookedModel,
    scores: EdgeScores,
    clean: Inputs,
    corrupt: Inputs | None,
    metric: Metric,
    *,
    sizes: Sequence[int] | None = None,
    ablation: str = "resample",
) -> FaithfulnessCurve:
    """Faithfulness of the top-k circuits by |score| for each k in `sizes`."""
    graph = scores.graph
    ev = CircuitEvaluator(model, clean, corrupt, metric, ablation=ablation, graph=graph)
    ks = list(sizes) if sizes is not None else default_sizes(graph.n_edges)
    bad = [k for k in ks if not 0 <= k <= graph.n_edges]
    if bad:
        raise ConfigError(f"sizes must lie in [0, {graph.n_edges}]; got {bad}")
    order = scores.ranking()
    full = ev.metric(torch.ones(graph.n_edges, dtype=torch.bool))
    empty = ev.metric(torch.zeros(graph.n_edges, dtype=torch.bool))
    values = []
    for k in ks:
        mask = torch.zeros(graph.n_edges, dtype=torch.bool)
        mask[order[:k]] = True
        values.append(ev.metric(mask))
    metric_t = torch.tensor(values)
    return FaithfulnessCurve(
        tensors={
            "n_edges": torch.tensor(ks, dtype=torch.int64),
            "metric": metric_t,
            "faithfulness": torch.tensor([_ratio(v, full, empty) for v in values]),
            "full": torch.tensor(full),
            "empty": torch.tensor(empty),
        },
        axes={"n_edges": ("point",), "metric": ("point",), "faithfulness": ("point",), "full": (), "empty": ()},
        config={"ablation": ablation, "graph": graph.signature(), "scores_method": scores.config.get("method")},
    )


__all__ = [
    "CircuitEvaluator",
    "Faithfulness",
    "FaithfulnessCurve",
    "default_sizes",
    "faithfulness",
    "faithfulness_curve",
]
