"""What a feature is: its top-activating contexts, how often it fires and which tokens it promotes.

A :class:`FeatureCard` holds, for one SAE (or transcoder) feature over a text corpus: the fraction of
tokens where it fires, its mean activation when it does, its largest activation, the ``top_k`` contexts
with the largest activations (``context`` tokens before the active one), and -- where the feature writes
into a ``d_model``-wide site -- the tokens its decoder direction most promotes and suppresses through
the unembedding (the direct path only: the final norm's scale is not applied and later layers are
skipped, as in the logit-weight panels of published feature dashboards). Cards save as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechscope.errors import ConfigError
from mechscope.features.sae import SparseAutoencoder
from mechscope.features.store import row_activations, token_rows

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


@dataclass(frozen=True)
class FeatureCard:
    """One feature over a corpus (see the module docstring)."""

    feature: int
    frequency: float
    mean_when_active: float
    max_activation: float
    top_contexts: list[dict[str, Any]] = field(default_factory=list)  # tokens, active (index), activation
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)


def save_cards(cards: Sequence[FeatureCard], path: str | Path) -> Path:
    """Write `cards` as one JSON file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "feature_cards", "cards": [asdict(c) for c in cards]}, indent=1))
    return path


def load_cards(path: str | Path) -> list[FeatureCard]:
    """Cards written by :func:`save_cards`."""
    data = json.loads(Path(path).read_text())
    if data.get("kind") != "feature_cards":
        raise ConfigError(f"expected feature cards (kind 'feature_cards') in {path}, got kind {data.get('kind')!r}")
    out = []
    for card in data["cards"]:
        card["promoted"] = [tuple(p) for p in card["promoted"]]
        card["suppressed"] = [tuple(p) for p in card["suppressed"]]
        out.append(FeatureCard(**card))
    return out


@torch.no_grad()
def feature_cards(
    model: HookedModel,
    sae: SparseAutoencoder,
    texts: Sequence[str],
    features: Sequence[int] | None = None,
    *,
    top_k: int = 5,
    context: int = 8,
    n_logits: int = 8,
    seq_len: int = 64,
    max_rows: int | None = 256,
    batch_size: int = 32,
) -> list[FeatureCard]:
    """Cards of `features` (default: all) of `sae` over `texts` packed into rows (position 0 left out)."""
    d_sae = sae.config.d_sae
    chosen = list(range(d_sae)) if features is None else [int(f) for f in features]
    bad = [f for f in chosen if not 0 <= f < d_sae]
    if not chosen or bad:
        raise ConfigError(f"expected feature indices in [0, {d_sae}), got {bad or 'none'}")
    if top_k < 1 or context < 0 or n_logits < 0:
        raise ConfigError(f"expected top_k >= 1, context >= 0, n_logits >= 0; got {top_k}, {context}, {n_logits}")
    rows = token_rows(model, texts, seq_len)[:max_rows]
    index = torch.tensor(chosen)
    acts = row_activations(model, sae.config.site, rows, batch_size=batch_size)  # [rows, seq_len - 1, d]
    f = sae.encode(acts)[..., index].reshape(-1, len(chosen))  # [tokens, n]; token t: row t // (seq_len - 1)
    count, total = (f > 0).sum(0), f.sum(0)
    top = f.topk(min(top_k, f.shape[0]), dim=0)  # [top_k, n]
    n_tokens = f.shape[0]
    logits = _logit_effects(model, sae, index)
    tok = model.tokenizer
    cards = []
    for i, feature in enumerate(chosen):
        contexts = []
        for value, at in zip(top.values[:, i].tolist(), top.indices[:, i].tolist(), strict=True):
            if value <= 0:
                break
            row, pos = at // (seq_len - 1), at % (seq_len - 1) + 1
            lo = max(0, pos - context)
            tokens = [tok.decode([t]) for t in rows[row, lo : pos + 1].tolist()]
            contexts.append({"tokens": tokens, "active": pos - lo, "activation": value, "row": row, "position": pos})
        promoted = suppressed = []
        if logits is not None and n_logits:
            up, down = logits[i].topk(n_logits), (-logits[i]).topk(n_logits)
            promoted = [(tok.decode([t]), float(v)) for v, t in zip(up.values, up.indices.tolist(), strict=True)]
            suppressed = [(tok.decode([t]), -float(v)) for v, t in zip(down.values, down.indices.tolist(), strict=True)]
        cards.append(
            FeatureCard(
                feature=feature,
                frequency=float(count[i]) / n_tokens,
                mean_when_active=float(total[i] / count[i]) if count[i] else 0.0,
                max_activation=max(0.0, float(top.values[0, i])),
                top_contexts=contexts,
                promoted=promoted,
                suppressed=suppressed,
            )
        )
    return cards


def _logit_effects(model: HookedModel, sae: SparseAutoencoder, index: torch.Tensor) -> torch.Tensor | None:
    """``W_dec[features] @ W_U`` ``[n, d_vocab]`` where the feature writes a d_model-wide site, else None."""
    if sae.config.width_out != model.dims.d_model:
        return None
    w_u = model.weights.W_U.float().cpu()
    return sae.W_dec.detach()[index].float() @ w_u


__all__ = ["FeatureCard", "feature_cards", "load_cards", "save_cards"]
