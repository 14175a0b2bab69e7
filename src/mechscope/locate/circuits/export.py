"""Circuits as JSON (for other tools and for reading); the figure is re-exported from :mod:`.figure`.

JSON layout (schema 1)::

    {"format": "mechscope.circuit", "schema_version": 1, "graph": {n_layers, n_heads, n_kv_heads,
     parallel, family}, "config": {...}, "nodes": [...], "edges": [{"from", "to", "score"}, ...]}

Only kept edges are written; loading validates the format, the graph signature and every edge name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import ConfigError
from mechscope.io import FileSchema, check_header, read_json, register_schema, write_text_atomic
from mechscope.locate.circuits.circuit import Circuit
from mechscope.locate.circuits.figure import circuit_figure, write_circuit_html
from mechscope.locate.circuits.graph import Graph, GraphError

#: Circuits keep their flat JSON layout (read by other tools); the header check is the shared one.
SCHEMA = register_schema(FileSchema("circuit", 1, "circuit JSON"))
FORMAT = SCHEMA.format
SCHEMA_VERSION = SCHEMA.version
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
    return write_text_atomic(path, json.dumps(circuit_to_dict(circuit), indent=1))


def circuit_from_dict(data: Any, where: str = "circuit") -> Circuit:
    """Rebuild a :class:`Circuit` from :func:`circuit_to_dict` output, validating everything."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object with format {FORMAT!r}; got {type(data).__name__}")
    check_header({"format": str(data.get("format")), "schema_version": str(data.get("schema_version"))}, SCHEMA, where)
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
    return circuit_from_dict(read_json(path, "circuit JSON"), str(path))


__all__ = [
    "circuit_figure",
    "circuit_from_dict",
    "circuit_to_dict",
    "load_circuit_json",
    "save_circuit_json",
    "write_circuit_html",
]
