"""What an explainer and a scorer see of a feature: held-out splits of its top-activating contexts and
random contexts where it does not fire, from token rows of a corpus."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.features.sae import SparseAutoencoder
from mechscope.features.store import row_activations

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


@dataclass(frozen=True)
class Context:
    """A window of tokens ending at the token of interest, with the feature's activation at each."""

    tokens: list[str]
    acts: list[float]
    next_token: str = ""

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def activation(self) -> float:
        return self.acts[-1] if self.acts else 0.0


@dataclass(frozen=True)
class FeatureExamples:
    """``explain``: top contexts the explainer reads; ``held_out``: other top contexts, and ``negatives``:
    random contexts where the feature is silent, both for scoring only."""

    feature: int
    explain: list[Context]
    held_out: list[Context] = field(default_factory=list)
    negatives: list[Context] = field(default_factory=list)
    #: Tokens the decoder direction promotes through the unembedding (the direct path), when known.
    promoted: list[str] = field(default_factory=list)


@torch.no_grad()
def feature_examples(
    model: HookedModel,
    sae: SparseAutoencoder,
    rows: Tensor,
    features: list[int],
    *,
    n_explain: int = 10,
    n_held_out: int = 10,
    n_negative: int = 20,
    context: int = 12,
    seed: int = 0,
) -> list[FeatureExamples]:
    """Examples of `features` over token `rows` ``[rows, seq_len]``: the ``2 n`` strongest activations
    alternate between the explain and held-out sets; negatives are uniform among silent tokens."""
    if rows.ndim != 2:
        raise ConfigError(f"expected token rows [rows, seq_len], got {tuple(rows.shape)}")
    acts = row_activations(model, sae.config.site, rows)  # [rows, seq_len - 1, d]
    f = sae.encode(acts)[..., features]  # [rows, pos, n]
    tok = model.tokenizer
    gen = torch.Generator().manual_seed(seed)
    per_row = f.shape[1]
    out = []
    w_u = model.weights.W_U.float().cpu() if sae.config.width_out == model.dims.d_model else None

    def window(flat: int, column: Tensor) -> Context:
        row, pos = flat // per_row, flat % per_row + 1
        lo = max(1, pos - context)
        ids = rows[row, lo : pos + 1].tolist()
        nxt = tok.decode([int(rows[row, pos + 1])]) if pos + 1 < rows.shape[1] else ""
        values = column.view(-1, per_row)[row, lo - 1 : pos].tolist()
        return Context([tok.decode([t]) for t in ids], values, nxt)

    for i, feature in enumerate(features):
        column = f[..., i].reshape(-1)
        top = column.topk(min(column.numel(), n_explain + n_held_out))
        strong = [int(j) for v, j in zip(top.values, top.indices, strict=True) if v > 0]
        silent = (column <= 0).nonzero().squeeze(-1)
        pick = silent[torch.randperm(silent.numel(), generator=gen)[:n_negative]].tolist()
        promoted = []
        if w_u is not None:
            logits = sae.W_dec.detach()[feature].float() @ w_u
            promoted = [tok.decode([int(t)]) for t in logits.topk(10).indices]
        out.append(
            FeatureExamples(
                feature=feature,
                explain=[window(j, column) for j in strong[0::2]],
                held_out=[window(j, column) for j in strong[1::2]],
                negatives=[window(j, column) for j in pick],
                promoted=promoted,
            )
        )
    return out


__all__ = ["Context", "FeatureExamples", "feature_examples"]
