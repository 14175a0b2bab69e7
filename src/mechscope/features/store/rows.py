"""Token rows and the activations of one site over them (in memory): the small-scale path, and the
forward loop the sharded store reuses.

Texts are tokenised, joined with end-of-text into one stream and cut into rows of ``seq_len`` tokens (no
padding, so every activation is a real token's), the way SAE training pipelines pack text; each row starts
with the tokenizer's BOS where it puts one before text (Gemma, Llama), as the model was trained. The first
position of every row is left out by default: it sees no context and its residual norm is an outlier in
most models (the attention sink), which would dominate the reconstruction loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError
from mechscope.model.tokens import packed_rows
from mechscope.sites import Site, SiteLike

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


def per_token_site(model: HookedModel, site: SiteLike) -> Site:
    """`site` of `model`, checked to hold one vector per token (axes batch, pos, d): what SAEs read."""
    chosen = model.site(site)
    if chosen.axes[:2] != ("batch", "pos") or len(chosen.axes) != 3:
        raise ShapeError(
            f"expected a site with one vector per token (axes batch, pos, d), got {chosen.name} with axes {chosen.axes}"
        )
    return chosen


def token_rows(model: HookedModel, texts: Sequence[str], seq_len: int) -> Int[Tensor, "rows seq_len"]:
    """``[rows, seq_len]`` token ids of `texts`: :func:`~mechscope.model.tokens.packed_rows` (each row starts with
    the tokenizer's BOS where it adds one to text)."""
    if isinstance(texts, str) or not texts:
        raise ConfigError(f"expected a non-empty list of texts, got {type(texts).__name__} of length {len(texts)}")
    if seq_len < 2:
        raise ConfigError(f"expected seq_len >= 2, got {seq_len}")
    rows = [torch.tensor(row) for row in packed_rows(model.tokenizer, texts, seq_len)]
    if not rows:
        total = sum(len(ids) + 1 for ids in model.tokenizer(list(texts), add_special_tokens=False)["input_ids"])
        raise ConfigError(f"expected at least {seq_len} tokens of text, got {total}")
    return torch.stack(rows)


@torch.no_grad()
def collect_activations(
    model: HookedModel,
    site: SiteLike,
    texts: Sequence[str],
    *,
    seq_len: int = 64,
    batch_size: int = 32,
    max_tokens: int | None = None,
    skip_first: bool = True,
) -> Float[Tensor, "tokens d"]:
    """Activations of `site` at every token of `texts` (packed as above), ``[tokens, d]`` on the CPU.

    The site must have one vector per token (residual stream, MLP or attention output, MLP hidden units);
    per-head sites would first need their heads flattened, which is not done here.
    """
    per_token_site(model, site)  # the site first: a wrong site is the clearer error
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1 (a token budget) or None; got {max_tokens}")
    rows = token_rows(model, texts, seq_len)
    per_row = seq_len - int(skip_first)
    if max_tokens is not None:
        rows = rows[: max(1, -(-max_tokens // per_row))]
    acts = row_activations(model, site, rows, batch_size=batch_size, skip_first=skip_first)
    acts = acts.reshape(-1, acts.shape[-1])
    return acts if max_tokens is None else acts[:max_tokens]


@torch.no_grad()
def row_activations(
    model: HookedModel, site: SiteLike, rows: Tensor, *, batch_size: int = 32, skip_first: bool = True
) -> Float[Tensor, "rows pos d"]:
    """Activations of `site` for token `rows` ``[rows, seq_len]`` (position 0 dropped with `skip_first`),
    fp32 on the CPU; the forward pass stops after the site's layer."""
    chosen = per_token_site(model, site)
    stop = None if chosen.layer is None or chosen.layer + 1 >= model.dims.n_layers else chosen.layer + 1
    device = next(model.hf_model.parameters()).device
    out: list[Tensor] = []
    for start in range(0, rows.shape[0], batch_size):
        _, cache = model.run_with_cache(rows[start : start + batch_size].to(device), [chosen], stop_at_layer=stop)
        out.append(cache[chosen.name][:, int(skip_first) :].float().cpu())
    return torch.cat(out)


__all__ = ["collect_activations", "per_token_site", "row_activations", "token_rows"]
