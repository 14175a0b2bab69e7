"""A circuit as an interactive plotly node-link figure (and a self-contained HTML file of it)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechscope.locate.circuits.graph import Graph, node_of

if TYPE_CHECKING:
    from mechscope.locate.circuits.circuit import Circuit

# Figure -----------------------------------------------------------------------------------------------------
_COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#ff7f0e", "mlp": "#7f7f7f", "logits": "#7f7f7f"}


def _positions(graph: Graph) -> dict[str, tuple[float, float]]:
    """Node name -> (x, y): input at the bottom, heads then MLP per layer, logits on top."""
    mid = (graph.n_heads - 1) / 2
    pos: dict[str, tuple[float, float]] = {"input": (mid, 0.0)}
    group = graph.n_heads // graph.n_kv_heads
    for layer in range(graph.n_layers):
        y = 1.0 + 2 * layer
        for h in range(graph.n_heads):
            pos[f"a{layer}.h{h}"] = (float(h), y)
        if group > 1:
            for g in range(graph.n_kv_heads):
                pos[f"a{layer}.kv{g}"] = (g * group + (group - 1) / 2, y - 0.35)
        pos[f"m{layer}"] = (mid, y + (0.0 if graph.parallel else 1.0))
        if graph.parallel:
            pos[f"m{layer}"] = (graph.n_heads + 0.5, y)
    pos["logits"] = (mid, 2.0 * graph.n_layers + 1)
    return pos


def circuit_figure(circuit: Circuit, *, title: str | None = None, max_width: float = 6.0) -> Any:
    """An interactive plotly node-link drawing of the circuit: edges coloured by the receiving input
    (query blue, key green, value orange, MLP/logits grey), widths by |score|, hover for names."""
    import plotly.graph_objects as go

    graph = circuit.graph
    pos = _positions(graph)
    names, scores = circuit.labels["edge"], circuit["scores"]
    kept = circuit.mask.nonzero().flatten().tolist()
    top = max((abs(float(scores[i])) for i in kept), default=0.0) or 1.0
    fig = go.Figure()
    for i in kept:
        src, dst = names[i].split("->")
        kind = dst.rsplit(".", 1)[-1] if dst.count(".") == 2 else ("logits" if dst == "logits" else "mlp")
        (x0, y0), (x1, y1) = pos[src], pos[node_of(dst)]
        score = float(scores[i])
        width = 0.5 + (max_width - 0.5) * (abs(score) / top if scores.abs().sum() > 0 else 0.5)
        fig.add_trace(
            go.Scatter(
                x=[x0, (x0 + x1) / 2, x1],
                y=[y0, (y0 + y1) / 2 + 0.15 * math.copysign(1, x1 - x0 or 1), y1],
                mode="lines",
                line={"color": _COLOURS.get(kind, "#7f7f7f"), "width": width, "shape": "spline"},
                hoverinfo="text",
                text=f"{names[i]}<br>score {score:.4g}",
                showlegend=False,
            )
        )
    used = set(circuit.nodes())
    xs, ys, labels, colours = [], [], [], []
    for name, (x, y) in pos.items():
        xs.append(x)
        ys.append(y)
        labels.append(name)
        colours.append("#d62728" if name in used else "#dddddd")
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers+text",
            text=labels,
            textposition="top center",
            marker={"size": 12, "color": colours, "line": {"width": 1, "color": "#333"}},
            hoverinfo="text",
            showlegend=False,
        )
    )
    fig.update_layout(
        title=title or f"circuit: {circuit.n_edges} of {graph.n_edges} edges ({graph.family or 'model'})",
        xaxis={"visible": False},
        yaxis={"visible": False},
        plot_bgcolor="white",
        height=max(400, 110 * graph.n_layers + 200),
    )
    return fig


def write_circuit_html(circuit: Circuit, path: str | Path, *, title: str | None = None) -> Path:
    """The circuit figure as one self-contained HTML file (plotly.js embedded, works offline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    circuit_figure(circuit, title=title).write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


__all__ = ["circuit_figure", "write_circuit_html"]
