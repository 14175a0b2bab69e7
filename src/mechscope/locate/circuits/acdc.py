"""ACDC: automatic circuit discovery by greedy edge pruning (Conmy et al. 2023).

Receivers are visited from the logits backwards (reverse topological order). A receiver whose node no
longer feeds anything kept loses all its incoming edges at once (they cannot matter). Otherwise each
incoming edge is tentatively ablated; the removal is kept when the damage (KL divergence from the full
model's next-token distribution, or the absolute change of a given metric) grows by less than
`threshold`. With `max_damage` a removal is also refused when the circuit's damage would exceed it, so
the returned circuit provably stays within that bound on the prompts used.
"""

from __future__ import annotations

import time
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
        max_seconds: refuse up front (with the estimate) when the worst case -- one forward per edge,
            timed on the first forward -- would take longer than this; None runs whatever the size.
    """

    threshold: float
    ablation: str = "resample"
    max_damage: float | None = None
    progress: bool = False
    max_seconds: float | None = 3600.0

    def __post_init__(self) -> None:
        check_ablation(self.ablation)
        if not self.threshold >= 0:
            raise ConfigError(f"threshold must be >= 0; got {self.threshold}")
        if self.max_damage is not None and not self.max_damage >= 0:
            raise ConfigError(f"max_damage must be >= 0 or None; got {self.max_damage}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"max_seconds must be > 0 or None; got {self.max_seconds}")


class TooSlowError(ConfigError):
    """A method whose estimated cost on this model exceeds the time the caller allowed."""


def _human(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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
    max_seconds: float | None = 3600.0,
    graph: Graph | None = None,
) -> Circuit:
    """Prune the model's graph to the edges whose ablation changes the output by `threshold` or more.

    Args:
        metric: None to measure damage by KL divergence from the full model at each row's last token,
            or a metric (logits -> ``[batch]``/scalar) whose absolute change is the damage.
        max_seconds: refuse up front when one forward per edge would take longer (:class:`TooSlowError`,
            with the estimate); None: no limit.
    Returns a :class:`Circuit`; its ``scores`` hold each edge's damage increase when it was tested.
    """
    config = ACDCConfig(
        threshold=threshold, ablation=ablation, max_damage=max_damage, progress=progress, max_seconds=max_seconds
    )
    ev = CircuitEvaluator(model, clean, corrupt, metric, ablation=config.ablation, graph=graph)
    graph = ev.graph
    kept = torch.ones(graph.n_edges, dtype=torch.bool)
    scores = torch.zeros(graph.n_edges)
    _, edge_recv = graph.edge_index
    start = time.perf_counter()
    current = ev.damage(kept)
    estimate = graph.n_edges * (time.perf_counter() - start)
    if config.max_seconds is not None and estimate > config.max_seconds:
        raise TooSlowError(
            f"ACDC tests up to {graph.n_edges} edges of this model's graph, one forward each; one forward took "
            f"{_human(time.perf_counter() - start)} here, so the run may take about {_human(estimate)} (limit "
            f"max_seconds={config.max_seconds:g}). Use EAP or EAP-IG (one backward pass per step, same graph), "
            "fewer or shorter prompts, or max_seconds=None to run it anyway."
        )
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
    cfg["estimated_seconds"] = estimate
    return Circuit.from_mask(graph, kept, scores=scores, config=cfg)


__all__ = ["ACDCConfig", "TooSlowError", "acdc"]
