"""Inputs, metrics and ablation values shared by the circuit methods.

Ablations say what an upstream node's output becomes on a removed edge: ``resample`` its output on the
corrupted prompt of the same row (the counterfactual run), ``mean`` its output averaged over the batch of
reference prompts (the corrupted ones when given, else the clean ones) at each position, ``zero`` zero.

The mean at a position is over the rows whose token there is text, accumulated in fp32. A row's BOS keeps
its own output: it is the same in every prompt (the BOS attends only to itself), and with left padding it
sits at a different position in each row, where averaging it in would swamp the text tokens (Gemma's BOS
residual is 14x a text token's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.locate.circuits.forward import node_outputs
from mechscope.locate.circuits.graph import Graph
from mechscope.locate.patching import PromptMismatchError
from mechscope.metrics import Metric, score_rows
from mechscope.model.tokens import text_mask

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs

ABLATIONS = ("resample", "mean", "zero")


def check_ablation(ablation: str) -> None:
    if ablation not in ABLATIONS:
        raise ConfigError(f"ablation must be one of {ABLATIONS}; got {ablation!r}")


def tokens_pair(
    model: HookedModel, clean: Inputs, corrupt: Inputs | None, ablation: str
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Tokenised clean and corrupted prompts, checked to align position by position."""
    check_ablation(ablation)
    a = model.prepare_inputs(clean)
    if corrupt is None:
        if ablation == "resample":
            raise ConfigError("resample ablation needs corrupted prompts (corrupt=...); or use 'mean' or 'zero'")
        return a, None
    b = model.prepare_inputs(corrupt)
    if a["input_ids"].shape != b["input_ids"].shape:
        raise PromptMismatchError(
            f"clean and corrupt prompts must have the same [batch, pos] token shape so edges align position by "
            f"position; got clean {tuple(a['input_ids'].shape)} and corrupt {tuple(b['input_ids'].shape)}"
        )
    if not torch.equal(a["attention_mask"], b["attention_mask"]):
        raise PromptMismatchError("clean and corrupt prompts must have the same attention mask (same padding)")
    return a, b


def metric_rows(metric: Metric, logits: Tensor, attention_mask: Tensor | None = None) -> Float[Tensor, " batch"]:
    """`metric(logits)` as one value per row (a scalar is broadcast), each row scored at its last real
    token of `attention_mask` (:func:`mechscope.metrics.score_rows`), with a clear error otherwise."""
    return score_rows(metric, logits, attention_mask)


def ablation_values(
    model: HookedModel,
    graph: Graph,
    clean: dict[str, Tensor],
    corrupt: dict[str, Tensor] | None,
    ablation: str,
) -> tuple[Tensor, Tensor, Float[Tensor, "batch_or_1 pos n_upstream d_model"]]:
    """(clean logits, clean node outputs, ablated node outputs)."""
    check_ablation(ablation)
    logits, outs = node_outputs(model, graph, clean)
    if ablation == "zero":
        return logits, outs, torch.zeros_like(outs[:1])
    if ablation == "resample":
        assert corrupt is not None
        return logits, outs, node_outputs(model, graph, corrupt)[1]
    source = corrupt or clean
    ref = outs if corrupt is None else node_outputs(model, graph, corrupt)[1]
    text = text_mask(model.tokenizer, source["input_ids"], source["attention_mask"]).to(ref.device)
    weights = text.float()[:, :, None, None]
    mean = ((ref.float() * weights).sum(0, keepdim=True) / weights.sum(0, keepdim=True).clamp_min(1)).to(ref.dtype)
    prefix = (source["attention_mask"].to(ref.device).bool() & ~text.bool())[:, :, None, None]  # each row's BOS
    if not bool(prefix.any()):
        return logits, outs, mean
    return logits, outs, torch.where(prefix, ref, mean)


__all__ = ["ABLATIONS", "Metric", "ablation_values", "check_ablation", "metric_rows", "tokens_pair"]
