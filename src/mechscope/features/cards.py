"""What a feature is: its top-activating contexts, how often it fires and which tokens it promotes.

A :class:`FeatureCard` holds, for one SAE (or transcoder) feature over a text corpus: the fraction of
tokens where it fires, its mean activation when it does, its largest activation, the ``top_k`` contexts
with the largest activations (``context`` tokens before the active one), and -- where the feature writes
into a ``d_model``-wide site -- the tokens its decoder direction most promotes and suppresses through
the unembedding (the direct path only: the final norm's scale is not applied and later layers are
skipped, as in the logit-weight panels of published feature dashboards). :class:`FeatureCards` saves them
as one JSON file in the shared envelope; files of the older layout still load.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechscope.errors import ConfigError
from mechscope.features.sae import SparseAutoencoder
from mechscope.features.store import row_activations, token_rows
from mechscope.io import (
    Envelope,
    FileSchema,
    ModelInfo,
    check_header,
    read_json,
    read_json_envelope,
    register_schema,
    write_json_envelope,
)

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


@dataclass(frozen=True)
class FeatureCard:
    """One feature over a corpus (see the module docstring)."""

    feature: int
    frequency: float
    mean_when_active: float
    max_activation: float
    #: tokens, active (index of the top token), activation, acts (the feature at each token), row, position
    top_contexts: list[dict[str, Any]] = field(default_factory=list)
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    #: Histogram of the non-zero activations: ``edges`` (n + 1) and ``counts`` (n).
    histogram: dict[str, list[float]] = field(default_factory=dict)
    #: Filled by :mod:`mechscope.features.autointerp`: a description and its scores.
    description: str = ""
    scores: dict[str, float] = field(default_factory=dict)


def _cards_v1_to_v2(header: dict[str, str]) -> dict[str, str]:
    """Schema 1 was ``{"kind": "feature_cards", "cards": [...]}`` with no envelope."""
    legacy = json.loads(header["legacy"])
    return {
        "format": header["format"],
        "kind": "feature_cards",
        "body": json.dumps({"cards": legacy["cards"], "site": ""}),
        "model": "null",
    }


CARDS_SCHEMA = register_schema(FileSchema("feature_cards", 2, "feature cards", {1: _cards_v1_to_v2}))


@dataclass
class FeatureCards:
    """Cards of some features of one SAE: a list with the SAE's site and the model they were made on."""

    cards: list[FeatureCard]
    site: str = ""
    model: ModelInfo | None = None

    def __len__(self) -> int:
        return len(self.cards)

    def __iter__(self) -> Iterator[FeatureCard]:
        return iter(self.cards)

    def __getitem__(self, i: int) -> FeatureCard:
        return self.cards[i]

    def by_feature(self) -> dict[int, FeatureCard]:
        return {c.feature: c for c in self.cards}

    def save(self, path: str | Path) -> Path:
        """One JSON file in the shared envelope (family ``feature_cards``)."""
        body = {"cards": [asdict(c) for c in self.cards], "site": self.site}
        return write_json_envelope(path, Envelope("feature_cards", body, model=self.model), CARDS_SCHEMA)

    @classmethod
    def load(cls, path: str | Path) -> FeatureCards:
        """Cards written by :meth:`save` (or by older mechscope's ``save_cards``)."""
        data = read_json(path, CARDS_SCHEMA.what)
        if isinstance(data, dict) and "format" not in data and data.get("kind") == "feature_cards":
            header = {"format": CARDS_SCHEMA.format, "schema_version": "1", "legacy": json.dumps(data)}
            header = check_header(header, CARDS_SCHEMA, str(path))
            envelope = Envelope("feature_cards", json.loads(header["body"]))
        else:
            envelope = read_json_envelope(path, CARDS_SCHEMA)
        try:
            cards = []
            for raw in envelope.body["cards"]:
                raw = dict(raw)
                raw["promoted"] = [tuple(p) for p in raw.get("promoted", [])]
                raw["suppressed"] = [tuple(p) for p in raw.get("suppressed", [])]
                cards.append(FeatureCard(**raw))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: malformed feature cards ({exc!r})") from exc
        return cls(cards, str(envelope.body.get("site", "")), envelope.model)


def save_cards(cards: Sequence[FeatureCard] | FeatureCards, path: str | Path) -> Path:
    """Write `cards` (see :meth:`FeatureCards.save`); returns the path."""
    return (cards if isinstance(cards, FeatureCards) else FeatureCards(list(cards))).save(path)


def load_cards(path: str | Path) -> list[FeatureCard]:
    """The cards of a file written by :func:`save_cards` (see :meth:`FeatureCards.load`)."""
    return FeatureCards.load(path).cards


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
) -> FeatureCards:
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
    f_rows = f.view(rows.shape[0], seq_len - 1, len(chosen))
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
            per_token = [0.0 if p == 0 else float(f_rows[row, p - 1, i]) for p in range(lo, pos + 1)]
            contexts.append(
                {
                    "tokens": tokens,
                    "active": pos - lo,
                    "activation": value,
                    "acts": per_token,
                    "row": row,
                    "position": pos,
                }
            )
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
                histogram=_histogram(f[:, i]),
            )
        )
    return FeatureCards(cards, sae.config.site, ModelInfo.of(model))


def _histogram(values: torch.Tensor, bins: int = 24) -> dict[str, list[float]]:
    """Histogram of the non-zero entries of `values` (empty when the feature never fires)."""
    active = values[values > 0].float()
    if active.numel() == 0:
        return {"edges": [], "counts": []}
    hi = float(active.max())
    counts = torch.histc(active, bins=bins, min=0.0, max=hi)
    return {"edges": torch.linspace(0.0, hi, bins + 1).tolist(), "counts": counts.tolist()}


def _logit_effects(model: HookedModel, sae: SparseAutoencoder, index: torch.Tensor) -> torch.Tensor | None:
    """``W_dec[features] @ W_U`` ``[n, d_vocab]`` where the feature writes a d_model-wide site, else None."""
    if sae.config.width_out != model.dims.d_model:
        return None
    w_u = model.weights.W_U.float().cpu()
    return sae.W_dec.detach()[index].float() @ w_u


__all__ = ["CARDS_SCHEMA", "FeatureCard", "FeatureCards", "feature_cards", "load_cards", "save_cards"]
