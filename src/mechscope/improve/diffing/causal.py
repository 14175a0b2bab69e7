"""Causal view of a model diff: cross-model patching.

The *receiver* model runs the prompts; one component's activation is replaced by the *donor* model's
activation at the same tokens (every position), and a metric of the receiver's logits is recorded. A
component whose patch moves the metric from the receiver's value to the donor's carries the behaviour
change. Cells: the embeddings (the residual entering layer 0), each attention head's output
(``attn.hook_result``, its ``z @ W_O``) and each MLP (``hook_mlp_out``). The runs go through the batched
patching engine (:mod:`mechscope.locate._engine`) with the donor's cached activations as the patch
source; a patch that writes the values already there (identical models, or an unchanged component with
unchanged inputs) is skipped and gives the receiver's metric exactly.

The default metric is ``KL(donor || receiver)`` averaged over real positions, so the effect is the
fraction of the two models' divergence that patching the component closes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.locate._engine import Variant, metric_value, run_batched
from mechscope.metrics import Metric, kl_div
from mechscope.model.partial import base_run
from mechscope.sites import Site

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


@dataclass
class CausalDiff:
    """``metric [component]`` with each component patched from the donor; the receiver's and the donor's
    unpatched metrics; ``effect`` = (patched - receiver) / (donor - receiver), 0 when they are equal."""

    components: list[str]
    metric: Float[Tensor, " component"]
    receiver: float
    donor: float

    @property
    def effect(self) -> Float[Tensor, " component"]:
        gap = self.donor - self.receiver
        if gap == 0:
            return torch.zeros_like(self.metric)
        return (self.metric - self.receiver) / gap


def kl_to_donor(donor_logits: Tensor, mask: Tensor) -> Metric:
    """``KL(donor || logits)`` per row, averaged over that row's real positions (:func:`mechscope.metrics.kl_div`)."""

    def metric(logits: Tensor) -> Tensor:
        return kl_div(logits, donor_logits, attention_mask=mask, reduction="row")

    return metric


def _cells(model: HookedModel, shapes: dict[Site, torch.Size], device: torch.device) -> list[tuple[str, Variant]]:
    out: list[tuple[str, Variant]] = []
    embed = Site("hook_resid_pre", 0)
    out.append(("embed", Variant({embed: torch.ones(1, *shapes[embed][1:], dtype=torch.bool, device=device)})))
    for layer in range(model.dims.n_layers):
        z = Site("attn.hook_result", layer)
        for h in range(model.dims.n_heads):
            mask = torch.zeros(1, *shapes[z][1:], dtype=torch.bool, device=device)
            mask[:, :, h] = True
            out.append((f"blocks.{layer}.attn.head.{h}", Variant({z: mask})))
        mlp = Site("hook_mlp_out", layer)
        out.append(
            (f"blocks.{layer}.mlp", Variant({mlp: torch.ones(1, *shapes[mlp][1:], dtype=torch.bool, device=device)}))
        )
    return out


def cross_model_patch(
    receiver: HookedModel,
    donor: HookedModel,
    tokens: dict[str, Tensor],
    metric: Metric | None = None,
    *,
    chunk_size: int = 32,
    progress: bool = False,
) -> CausalDiff:
    """Patch each component of `receiver` with `donor`'s activation on the same `tokens`.

    Both models are checked by the caller (same architecture and vocabulary); `metric` maps logits
    ``[batch, pos, d_vocab]`` to a scalar or ``[batch]`` (default: KL to the donor, see the module doc).
    """
    n = receiver.dims.n_layers
    sites = [Site("hook_resid_pre", 0)]
    sites += [Site(kind, layer) for layer in range(n) for kind in ("attn.hook_result", "hook_mlp_out")]
    base = base_run(receiver, tokens, sites)
    source = base_run(donor, {k: v.to(donor.device) for k, v in tokens.items()}, sites)
    fn = metric or kl_to_donor(source.logits, tokens["attention_mask"])
    sources = {s: source.cache[s.name].to(base.logits.device) for s in sites}
    base_acts = {s: base.cache[s.name] for s in sites}
    cells = _cells(receiver, {s: base.cache[s.name].shape for s in sites}, base.logits.device)
    values = run_batched(
        receiver,
        base,
        sources,
        [v for _, v in cells],
        fn,
        base_acts=base_acts,
        chunk_size=chunk_size,
        progress=progress,
    )
    return CausalDiff(
        components=[name for name, _ in cells],
        metric=values.double().cpu(),
        receiver=float(metric_value(fn, base.logits, base.batch)),
        donor=float(metric_value(fn, source.logits.to(base.logits.device), base.batch)),
    )


__all__ = ["CausalDiff", "cross_model_patch", "kl_to_donor"]
