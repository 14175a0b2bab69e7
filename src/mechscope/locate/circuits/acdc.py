"""ACDC: automatic circuit discovery by greedy edge pruning (Conmy et al. 2023).

Receivers are visited from the logits backwards (reverse topological order). A receiver whose node no
longer feeds anything kept loses all its incoming edges at once (they cannot matter). Otherwise each
incoming edge is tentatively ablated; the removal is kept when the damage (KL divergence from the full
model's next-token distribution, or the absolute change of a given metric) grows by less than
`threshold`. With `max_damage` a removal is also refused when the circuit's damage would exceed it, so
the returned circuit provably stays within that bound on the prompts used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from mechscope.errors import ConfigError
from mechscope.locate.circuits.ablation import Metric, check_ablation
from mechscope.locate.circuits.circuit import Circuit
from mechscope.locate.circuits.faithfulness import CircuitEvaluator
from mechscope.locate.circuits.graph import Graph

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs


@dataclass(frozen=True, kw_only=True)
class ACDCConfig:
    """Options of :func:`acdc`.

    Attributes:
        threshold: an edge is removed when removing it increases the damage by less than this (tau).
        ablation: what removed edges carry (``resample``, ``mean``, ``zero``).
        max_damage: optional hard bound on the final circuit's damage.
        progress: show a progress bar over receivers.
    """

    threshold: float
    ablation: str = "resample"
    max_damage: float | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        check_ablation(self.ablation)
        if not self.threshold >= 0:
            raise ConfigError(f"threshold must be >= 0; got {self.threshold}")
        if self.max_damage is not None and not self.max_damage >= 0:
            raise ConfigError(f"max_damage must be >= 0 or None; got {self.max_damage}")


def _feeds(graph: Graph, kept: torch.Tensor, receiver: int) -> bool:
    """Whether the node behind `receiver` has a kept outgoing edge (logits always counts)."""
    node = graph.receivers[receiver]
    if node.kind == "logits":
        return True
    dense = graph.dense(kept.float(), fill=0.0)
    assert node.layer is not None
    if node.kind == "mlp":
        return bool(dense[graph.mlp_index(node.layer)].any())
    heads = graph.head_slice(node.layer)
    if node.kind == "q":
        assert node.head is not None
        return bool(dense[heads.start + node.head].any())
    group = graph.n_heads // graph.n_kv_heads  # key/value head g serves query heads g*group .. (g+1)*group-1
    assert node.head is not None
    first = heads.start + node.head * group
    return bool(dense[first : first + group].any())


def acdc(
    model: HookedModel,
    clean: Inputs,
    corrupt: Inputs | None,
    metric: Metric | None = None,
    *,
    threshold: float,
    ablation: str = "resample",
    max_damage: float | None = None,
    progress: bool = False,
    graph: Graph | None = None,
) -> Circuit:
    """Prune the model's graph to the edges whose ablation changes the output by `threshold` or more.

    Args:
        metric: None to measure damage by KL divergence from the full model at each row's last token,
            or a metric (logits -> ``[batch]``/scalar) whose absolute change is the damage.
    Returns a :class:`Circuit`; its ``scores`` hold each edge's damage increase when it was tested.
    """
    config = ACDCConfig(threshold=threshold, ablation=ablation, max_damage=max_damage, progress=progress)
    ev = CircuitEvaluator(model, clean, corrupt, metric, ablation=config.ablation, graph=graph)
    graph = ev.graph
    kept = torch.ones(graph.n_edges, dtype=torch.bool)
    scores = torch.zeros(graph.n_edges)
    _, edge_recv = graph.edge_index
    current = ev.damage(kept)
    order = list(range(len(graph.receivers)))[::-1]
    from tqdm.auto import tqdm

    for receiver in tqdm(order, desc="ACDC", disable=not config.progress):
        incoming = (edge_recv == receiver).nonzero().flatten().tolist()[::-1]
        if not _feeds(graph, kept, receiver):
            kept[incoming] = False
            continue
        for edge in incoming:
            kept[edge] = False
            trial = ev.damage(kept)
            increase = trial - current
            scores[edge] = increase
            within = config.max_damage is None or trial <= config.max_damage
            if increase < config.threshold and within:
                current = trial
            else:
                kept[edge] = True
    cfg = {**asdict(config), "method": "acdc", "metric": "kl" if metric is None else "metric", "damage": current}
    cfg["forwards"] = ev.forwards
    return Circuit.from_mask(graph, kept, scores=scores, config=cfg)


__all__ = ["ACDCConfig", "acdc"]
