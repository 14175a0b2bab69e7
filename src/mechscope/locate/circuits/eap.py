"""Edge attribution patching (EAP) and EAP with integrated gradients (EAP-IG).

EAP (Syed et al. 2023) estimates, for every edge u -> r at once, the change of the metric when the edge
is ablated, to first order: ``(ablated_u - out_u) . d metric / d input_r`` summed over positions and
averaged over rows. It needs the clean and ablation node outputs and one backward pass: the gradient is
taken with respect to the edge mask of the graph forward (see :mod:`.forward`), which is exactly that
dot product for every edge.

EAP-IG (Hanna et al. 2024, "Have Faith in Faithfulness") averages the gradient over `steps` runs whose
input embeddings are interpolated from the ablated input (the corrupted prompt's embeddings for
resample ablation) to the clean ones, which corrects EAP where the metric saturates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.locate._reads import read_plan, spread, unembedding_only
from mechscope.locate.circuits.ablation import (
    ABLATIONS,
    Metric,
    ablation_values,
    check_ablation,
    metric_rows,
    tokens_pair,
)
from mechscope.locate.circuits.circuit import EdgeScores
from mechscope.locate.circuits.forward import graph_forward
from mechscope.locate.circuits.graph import Graph

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs


@dataclass(frozen=True, kw_only=True)
class EAPConfig:
    """Options of :func:`eap` / :func:`eap_ig`.

    Attributes:
        ablation: what a removed edge carries (``resample``, ``mean``, ``zero``).
        steps: integration steps of EAP-IG (1 gives EAP; Hanna et al. use 5).
        batch_size: rows per backward pass (None: all rows at once). The metric still sees the whole
            batch (it may hold per-row targets): the logits of every chunk are computed first without
            gradients, the metric's gradient is taken on all of them, and each chunk is then re-run and
            back-propagated with its slice of that gradient. Costs one extra forward per chunk.
    """

    ablation: str = "resample"
    steps: int = 5
    batch_size: int | None = None

    def __post_init__(self) -> None:
        check_ablation(self.ablation)
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1; got {self.steps}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 or None; got {self.batch_size}")


def _attribute(
    model: HookedModel,
    clean: Inputs,
    corrupt: Inputs | None,
    metric: Metric,
    config: EAPConfig,
    *,
    integrated: bool,
    graph: Graph | None,
    progress: bool = False,
) -> EdgeScores:
    graph = graph or Graph.from_model(model)
    graph.check_model(model)
    clean_t, corrupt_t = tokens_pair(model, clean, corrupt, config.ablation)
    logits, outs, ablated = ablation_values(model, graph, clean_t, corrupt_t, config.ablation)
    batch = logits.shape[0]
    with torch.no_grad():
        full_metric = metric_rows(metric, logits, clean_t["attention_mask"]).float().mean()
    read, n_pos = read_plan(metric, logits, clean_t["attention_mask"]).positions, int(logits.shape[1])
    step_alphas = [(k + 1) / config.steps for k in range(config.steps)] if integrated else [1.0]
    delta = (outs - ablated).detach()
    size = min(config.batch_size or batch, batch)
    chunks = [slice(start, min(start + size, batch)) for start in range(0, batch, size)]

    def rows(value: Tensor | None, sl: slice) -> Tensor | None:
        return None if value is None else (value[sl] if value.shape[0] > 1 else value)

    grad_sum = torch.zeros(graph.valid.shape, dtype=torch.float32, device=model.device)
    from mechscope.locate._engine import progress_bar

    for alpha in progress_bar(step_alphas, progress and len(step_alphas) > 1, "EAP-IG steps"):
        override = None
        if integrated and alpha != 1.0:
            base_in = ablated[:, :, 0]
            override = (base_in + alpha * (outs[:, :, 0] - base_in)).expand_as(outs[:, :, 0])

        def run(sl: slice, mask: Tensor, override: Tensor | None = override) -> Tensor:
            tokens = {k: v[sl] for k, v in clean_t.items()}
            with unembedding_only(model, read):  # only the logits the metric reads
                kept = graph_forward(
                    model, graph, tokens, mask, fixed_delta=delta[sl], input_override=rows(override, sl)
                )
            return spread(kept, read, n_pos)

        mask = torch.ones(graph.valid.shape, device=model.device, dtype=model.dtype, requires_grad=True)
        if len(chunks) == 1:
            value = metric_rows(metric, run(chunks[0], mask), clean_t["attention_mask"]).sum() / batch
            (grad,) = torch.autograd.grad(value, mask)
            grad_sum += grad.float()
            continue
        with torch.no_grad():
            full = torch.cat([run(sl, mask.detach()) for sl in chunks])
        full.requires_grad_(True)
        (d_logits,) = torch.autograd.grad(metric_rows(metric, full, clean_t["attention_mask"]).sum() / batch, full)
        for sl in chunks:
            (grad,) = torch.autograd.grad(run(sl, mask), mask, grad_outputs=d_logits[sl])
            grad_sum += grad.float()
    scores = -graph.flat(grad_sum / len(step_alphas)).cpu()
    method = "eap-ig" if integrated else "eap"
    cfg = {**asdict(config), "method": method, "graph": graph.signature(), "n_prompts": batch}
    cfg["dtype"] = str(model.dtype).removeprefix("torch.")
    if not integrated:
        cfg.pop("steps")
    return EdgeScores(
        tensors={"scores": scores, "metric": full_metric.cpu()},
        axes={"scores": ("edge",), "metric": ()},
        labels={"edge": graph.edge_names},
        config=cfg,
    )


def eap(
    model: HookedModel,
    clean: Inputs,
    corrupt: Inputs | None,
    metric: Metric,
    *,
    ablation: str = "resample",
    batch_size: int | None = None,
    graph: Graph | None = None,
) -> EdgeScores:
    """Edge attribution patching: every edge's first-order ablation effect on `metric`.

    Args:
        clean, corrupt: prompts of equal token shape (corrupt may be None for mean/zero ablation).
        metric: logits ``[batch, pos, d_vocab]`` -> ``[batch]`` or a scalar (e.g. a logit difference).
        ablation: one of ``resample`` (corrupted outputs), ``mean``, ``zero``.
        batch_size: rows per backward pass, to bound memory (see :class:`EAPConfig`).
    """
    config = EAPConfig(ablation=ablation, steps=1, batch_size=batch_size)
    return _attribute(model, clean, corrupt, metric, config, integrated=False, graph=graph)


def eap_ig(
    model: HookedModel,
    clean: Inputs,
    corrupt: Inputs | None,
    metric: Metric,
    *,
    steps: int = 5,
    ablation: str = "resample",
    batch_size: int | None = None,
    graph: Graph | None = None,
    progress: bool = False,
) -> EdgeScores:
    """EAP with integrated gradients over the input embeddings (`steps` interpolation points;
    `progress`: a bar over them)."""
    config = EAPConfig(ablation=ablation, steps=steps, batch_size=batch_size)
    return _attribute(model, clean, corrupt, metric, config, integrated=True, graph=graph, progress=progress)


__all__ = ["ABLATIONS", "EAPConfig", "eap", "eap_ig"]
