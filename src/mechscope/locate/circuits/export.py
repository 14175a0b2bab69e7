"""Circuits as JSON (for other tools and for reading) and as an interactive node-link figure.

JSON layout (schema 1)::

    {"format": "mechscope.circuit", "schema_version": 1, "graph": {n_layers, n_heads, n_kv_heads,
     parallel, family}, "config": {...}, "nodes": [...], "edges": [{"from", "to", "score"}, ...]}

Only kept edges are written; loading validates the format, the graph signature and every edge name.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import ConfigError
from mechscope.locate.circuits.circuit import Circuit, _node_of
from mechscope.locate.circuits.graph import Graph, GraphError

FORMAT = "mechscope.circuit"
SCHEMA_VERSION = 1
_GRAPH_KEYS = ("n_layers", "n_heads", "n_kv_heads", "parallel")


def circuit_to_dict(circuit: Circuit) -> dict[str, Any]:
    scores = circuit["scores"].tolist()
    names = circuit.labels["edge"]
    kept = circuit.mask.nonzero().flatten().tolist()
    edges = []
    for i in kept:
        src, dst = names[i].split("->")
        edges.append({"from": src, "to": dst, "score": float(scores[i])})
    config = {k: v for k, v in circuit.config.items() if k != "graph"}
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "graph": circuit.graph.signature(),
        "config": config,
        "nodes": circuit.nodes(),
        "edges": edges,
    }


def save_circuit_json(circuit: Circuit, path: str | Path) -> Path:
    """Write the circuit's kept edges (with scores) as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(circuit_to_dict(circuit), fh, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def circuit_from_dict(data: Any, where: str = "circuit") -> Circuit:
    """Rebuild a :class:`Circuit` from :func:`circuit_to_dict` output, validating everything."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{where}: expected a JSON object with format {FORMAT!r}; got {got!r}")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{where}: expected schema_version {SCHEMA_VERSION}; got {data.get('schema_version')!r}")
    sig = data.get("graph")
    if not isinstance(sig, dict) or any(k not in sig for k in _GRAPH_KEYS):
        raise ConfigError(f"{where}: 'graph' must be an object with keys {list(_GRAPH_KEYS)}; got {sig!r}")
    graph = Graph(
        n_layers=int(sig["n_layers"]),
        n_heads=int(sig["n_heads"]),
        n_kv_heads=int(sig["n_kv_heads"]),
        parallel=bool(sig["parallel"]),
        family=str(sig.get("family", "")),
    )
    edges = data.get("edges")
    if not isinstance(edges, list):
        raise ConfigError(f"{where}: 'edges' must be a list of {{from, to, score}} objects")
    kept = torch.zeros(graph.n_edges, dtype=torch.bool)
    scores = torch.zeros(graph.n_edges)
    for item in edges:
        if not isinstance(item, dict) or "from" not in item or "to" not in item:
            raise ConfigError(f"{where}: each edge must be an object with 'from' and 'to'; got {item!r}")
        try:
            index = graph.edge(f"{item['from']}->{item['to']}")
        except GraphError as exc:
            raise GraphError(f"{where}: {exc}") from exc
        kept[index] = True
        scores[index] = float(item.get("score", 0.0))
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    return Circuit.from_mask(graph, kept, scores=scores, config=config)


def load_circuit_json(path: str | Path) -> Circuit:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read circuit JSON {path}: {exc}") from exc
    return circuit_from_dict(data, str(path))


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
        (x0, y0), (x1, y1) = pos[src], pos[_node_of(dst)]
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


__all__ = [
    "circuit_figure",
    "circuit_from_dict",
    "circuit_to_dict",
    "load_circuit_json",
    "save_circuit_json",
    "write_circuit_html",
]
