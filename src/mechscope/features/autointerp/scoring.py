"""Scoring descriptions: detection (does the description tell activating from silent contexts?) and
causal scoring (does clamping the feature up make the tokens the description predicts more likely?).

- :func:`detection_score`: a judge rates each held-out activating context and each silent one given the
  description; the score is the AUROC of those ratings (0.5: chance, 1: perfect). Judges: the baseline
  :class:`KeywordJudge` (does the marked token, or the context, contain the description's keywords?) or
  :class:`ChatJudge` (a completer answers yes/no).
- :func:`causal_score`: on random contexts, the feature is clamped to ``value`` at every position but
  each row's first (the BOS prefix, at least one: the attention sink, where the SAE was never trained) --
  its reconstruction error kept, so only this feature's contribution changes; the score is the mean change
  in log-probability of the predicted next tokens minus the mean change over the whole vocabulary (nats),
  over the clamped positions.
  The same measure for a random other feature with the same predictions is the control: a description
  whose predicted effect is real scores well above its control.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.features.autointerp.examples import Context
from mechscope.features.autointerp.explainers import Explanation, token_key
from mechscope.features.evals import default_unspliced, feature_hooks, first_columns, leaving
from mechscope.features.sae import SparseAutoencoder
from mechscope.model.hooks import HookFn
from mechscope.sites import SiteLike

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

#: A judge rates how well a context matches a description (higher: more likely the feature fires).
Judge = Callable[[Explanation, Context], float]


@dataclass(frozen=True)
class KeywordJudge:
    """1 when the context's last token is one of the keywords, 0.5 when another of its tokens is, else 0."""

    def __call__(self, explanation: Explanation, context: Context) -> float:
        keys = {token_key(k) for k in explanation.keywords if k}
        if not keys:
            return 0.0
        if context.tokens and token_key(context.tokens[-1]) in keys:
            return 1.0
        return 0.5 if any(token_key(t) in keys for t in context.tokens) else 0.0


@dataclass(frozen=True)
class ChatJudge:
    """A completer answers whether the marked token matches the description (1 for yes, 0 otherwise)."""

    complete: Callable[[str], str]

    def __call__(self, explanation: Explanation, context: Context) -> float:
        prompt = (
            f"A feature of a language model is described as: {explanation.text}\n"
            f"Text: {''.join(context.tokens[:-1])}<<{context.tokens[-1]}>>\n"
            "Is the feature active on the token marked << >>? Answer yes or no.\nAnswer:"
        )
        return 1.0 if self.complete(prompt).strip().lower().startswith("yes") else 0.0


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    if not positive or not negative:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def detection_score(
    explanation: Explanation, positives: Sequence[Context], negatives: Sequence[Context], judge: Judge
) -> float:
    """AUROC of the judge's ratings of held-out activating vs silent contexts."""
    return auroc([judge(explanation, c) for c in positives], [judge(explanation, c) for c in negatives])


def _token_ids(model: HookedModel, words: Sequence[str]) -> list[int]:
    tok = model.tokenizer
    ids: set[int] = set()
    for word in words:
        for variant in (word, " " + word.strip()) if word.strip() else (word,):
            encoded = tok(variant, add_special_tokens=False)["input_ids"]
            if encoded:
                ids.add(int(encoded[0]))
    return sorted(ids)


@torch.no_grad()
def causal_score(
    model: HookedModel,
    sae: SparseAutoencoder,
    feature: int,
    predicted: Sequence[str],
    rows: Tensor,
    *,
    value: float,
    batch_size: int = 16,
    unspliced: int | None = None,
) -> float:
    """Mean log-probability change of the `predicted` tokens minus the vocabulary's mean change when
    `feature` is clamped to `value` on `rows` (see the module docstring); NaN when nothing is predicted."""
    if not 0 <= feature < sae.config.d_sae:
        raise ConfigError(f"expected a feature in [0, {sae.config.d_sae}), got {feature}")
    ids = _token_ids(model, predicted)
    if not ids:
        return float("nan")

    def edit(f: Tensor, activation: Tensor, x: Tensor) -> Tensor:
        delta = (value - f[..., feature])[..., None] * sae.W_dec[feature]
        return activation + delta.to(activation.dtype)

    kept = default_unspliced(model, unspliced)
    if kept >= rows.shape[1]:
        raise ConfigError(f"unspliced={kept} leaves no position of the {rows.shape[1]}-token rows to clamp")
    hooks: dict[SiteLike, HookFn] = {
        site: leaving(fn, first_columns(kept)) for site, fn in feature_hooks(model, sae, edit).items()
    }
    device = next(model.hf_model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, rows.shape[0], batch_size):
        batch = rows[start : start + batch_size].to(device)
        clean = torch.log_softmax(model(batch).float()[:, kept:], -1)
        with model.hooks(hooks):
            steered = torch.log_softmax(model(batch).float()[:, kept:], -1)
        change = steered - clean  # [batch, pos, vocab] at the clamped positions
        total += float((change[..., ids].mean(-1) - change.mean(-1)).sum())
        count += change.shape[0] * change.shape[1]
    return total / count


__all__ = ["ChatJudge", "Judge", "KeywordJudge", "auroc", "causal_score", "detection_score"]
