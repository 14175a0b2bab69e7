"""Circuit discovery: the computational graph, EAP / EAP-IG, ACDC, faithfulness and export."""

from __future__ import annotations

from mechscope.locate.circuits.ablation import ABLATIONS
from mechscope.locate.circuits.acdc import ACDCConfig, acdc
from mechscope.locate.circuits.circuit import Circuit, EdgeScores
from mechscope.locate.circuits.eap import EAPConfig, eap, eap_ig
from mechscope.locate.circuits.export import (
    circuit_figure,
    load_circuit_json,
    save_circuit_json,
    write_circuit_html,
)
from mechscope.locate.circuits.faithfulness import (
    CircuitEvaluator,
    Faithfulness,
    FaithfulnessCurve,
    faithfulness,
    faithfulness_curve,
)
from mechscope.locate.circuits.forward import graph_forward, node_outputs
from mechscope.locate.circuits.graph import Graph, GraphError, Node

__all__ = [
    "ABLATIONS",
    "ACDCConfig",
    "Circuit",
    "CircuitEvaluator",
    "EAPConfig",
    "EdgeScores",
    "Faithfulness",
    "FaithfulnessCurve",
    "Graph",
    "GraphError",
    "Node",
    "acdc",
    "circuit_figure",
    "eap",
    "eap_ig",
    "faithfulness",
    "faithfulness_curve",
    "graph_forward",
    "load_circuit_json",
    "node_outputs",
    "save_circuit_json",
    "write_circuit_html",
]
