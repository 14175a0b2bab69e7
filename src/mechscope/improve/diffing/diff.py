"""``diff_models(base, tuned, texts)``: where a fine-tuned model differs from its base, in four views.

Weights (relative change per component), activations (total difference per site and layer, each
component's own change, the logit lens of the difference), causal (cross-model patching of each
component on a metric) and outputs (KL by position). All in one :class:`DiffResult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mechscope.errors import ConfigError
from mechscope.improve.diffing.activations import activation_diff, lens_of_difference
from mechscope.improve.diffing.causal import Metric, cross_model_patch
from mechscope.improve.diffing.kl import kl_by_position
from mechscope.improve.diffing.pair import apply_edit, check_pair, check_texts
from mechscope.improve.diffing.result import DiffResult
from mechscope.improve.diffing.weights import MATRICES, weight_diff
from mechscope.improve.neutral import NEUTRAL_TEXTS

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


@dataclass(frozen=True, kw_only=True)
class DiffConfig:
    """Options of :func:`diff_models`.

    Attributes:
        k: tokens per layer in the lens of the difference.
        lens_read: the lens of the difference averages every real token of the texts (``"all"``) or each
            text's last token (``"last"``: prompts that end where the tuned behaviour shows, e.g. before a
            verdict word).
        causal: run cross-model patching (one batched sweep over the embeddings, every head and every MLP).
        chunk_size: patched copies per forward in that sweep.
        progress: show a progress bar.
    """

    k: int = 10
    lens_read: str = "all"
    causal: bool = True
    chunk_size: int = 32
    progress: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"DiffConfig.k must be a positive int; got {self.k!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ConfigError(f"DiffConfig.chunk_size must be a positive int; got {self.chunk_size!r}")
        if self.lens_read not in ("all", "last"):
            raise ConfigError(f"DiffConfig.lens_read must be 'all' or 'last'; got {self.lens_read!r}")


def diff_models(
    base: HookedModel,
    tuned: Any,
    texts: Sequence[str] = NEUTRAL_TEXTS,
    *,
    prompts: Sequence[str] | None = None,
    metric: Metric | None = None,
    config: DiffConfig | None = None,
) -> DiffResult:
    """Compare `tuned` (a :class:`HookedModel`, or an ``EditRecord`` applied to a copy of `base`) with `base`.

    Args:
        texts: text both models read for the activation, lens and KL views (default: neutral text).
        prompts: prompts for the causal view (default: `texts`); right-padded.
        metric: the causal view's metric of logits ``[batch, pos, d_vocab]`` -> scalar or ``[batch]``,
            e.g. the logit difference of the fine-tuned behaviour (default: KL to the tuned model).
        config: :class:`DiffConfig`.
    """
    cfg = config or DiffConfig()
    if not isinstance(cfg, DiffConfig):
        raise ConfigError(f"config must be a DiffConfig; got {type(cfg).__name__}")
    from mechscope.steer.editing.records import EditRecord

    if isinstance(tuned, EditRecord):
        tuned = apply_edit(base, tuned)
    base, tuned = check_pair(base, tuned)
    tokens = check_texts(base, texts)
    patch_tokens = tokens if prompts is None else check_texts(base, prompts, "prompts")
    if metric is not None and not callable(metric):
        raise ConfigError(f"metric must be a function of logits; got {type(metric).__name__}")
    if cfg.k > base.dims.d_vocab:
        raise ConfigError(f"DiffConfig.k={cfg.k} exceeds the vocabulary ({base.dims.d_vocab} tokens)")
    return _diff(base, tuned, list(texts), tokens, patch_tokens, metric, cfg, prompts is not None)


def _diff(
    base: HookedModel,
    tuned: HookedModel,
    texts: list[str],
    tokens: dict[str, torch.Tensor],
    patch_tokens: dict[str, torch.Tensor],
    metric: Metric | None,
    cfg: DiffConfig,
    own_prompts: bool,
) -> DiffResult:
    # Phase 1: weights.
    w = weight_diff(base, tuned)
    # Phase 2: activations on the texts, and the lens of their mean difference.
    with torch.no_grad():
        acts = activation_diff(base, tuned, tokens, lens_read=cfg.lens_read)
        up_ids, up_scores, down_ids, down_scores = lens_of_difference(base, acts.mean_delta, cfg.k)
        # Phase 3: outputs.
        kl = kl_by_position(base, tuned, tokens)
    d = base.dims
    tensors: dict[str, torch.Tensor] = {
        "weight_rel": w.relative(),
        "weight_abs": w.delta_sq.sqrt(),
        "head_weight_rel": w.heads,
        "act_total": acts.total,
        "local_rel": acts.local,
        "lens_tokens": up_ids,
        "lens_scores": up_scores,
        "lens_down_tokens": down_ids,
        "lens_down_scores": down_scores,
        "kl": kl.double().cpu(),
        "real": tokens["attention_mask"].double().cpu(),
    }
    axes: dict[str, tuple[str, ...]] = {
        "weight_rel": ("w_component",),
        "weight_abs": ("w_component",),
        "head_weight_rel": ("layer", "head", "matrix"),
        "act_total": ("act_kind", "layer"),
        "local_rel": ("a_component",),
        "lens_tokens": ("layer", "k"),
        "lens_scores": ("layer", "k"),
        "lens_down_tokens": ("layer", "k"),
        "lens_down_scores": ("layer", "k"),
        "kl": ("batch", "pos"),
        "real": ("batch", "pos"),
    }
    labels = {
        "w_component": w.components,
        "a_component": acts.components,
        "layer": [str(i) for i in range(d.n_layers)],
        "head": [f"H{h}" for h in range(d.n_heads)],
        "matrix": list(MATRICES),
        "act_kind": acts.kinds,
    }
    # Phase 4: causal, the base model receiving each component from the tuned model.
    causal_info: dict[str, Any] = {}
    if cfg.causal:
        c = cross_model_patch(base, tuned, patch_tokens, metric, chunk_size=cfg.chunk_size, progress=cfg.progress)
        tensors |= {
            "causal_metric": c.metric,
            "causal_effect": c.effect,
            "causal_ref": torch.tensor([c.receiver, c.donor], dtype=torch.float64),
        }
        axes |= {"causal_metric": ("c_component",), "causal_effect": ("c_component",), "causal_ref": ("run",)}
        labels |= {"c_component": c.components, "run": ["base", "tuned"]}
        causal_info = {"causal_metric": "custom" if metric is not None else "kl_to_tuned", "own_prompts": own_prompts}

    def strings(ids: torch.Tensor) -> list[list[str]]:
        return [[base.to_string([int(t)]) for t in row] for row in ids.tolist()]

    config = {
        "n_texts": len(texts),
        "texts": texts,
        "k": cfg.k,
        "lens_read": cfg.lens_read,
        "lens_strings": strings(up_ids),
        "lens_down_strings": strings(down_ids),
        "base_fingerprint": base.fingerprint(),
        "tuned_fingerprint": tuned.fingerprint(),
        "model_type": d.model_type,
        **causal_info,
    }
    return DiffResult(tensors=tensors, axes=axes, labels=labels, config=config)


__all__ = ["DiffConfig", "diff_models"]
