"""How good an SAE is: reconstruction and sparsity on activations, and the model's loss with it spliced in.

- ``fvu``: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``
  (``explained_variance`` = 1 - fvu).
- ``l0``: mean number of active features per token; ``dead_fraction``: features that never fire on
  the given activations.
- ``loss_recovered`` (:func:`downstream_loss`): next-token cross-entropy with the site replaced by its
  reconstruction, placed between the clean loss (1) and the loss with the site zero-ablated (0):
  ``(ce_zero - ce_spliced) / (ce_zero - ce_clean)``. A reconstruction can score well on FVU and still
  lose what later layers read; this is the measure that sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError
from mechscope.features.sae import SparseAutoencoder
from mechscope.features.store import token_rows
from mechscope.model.hooks import HookContext, HookFn
from mechscope.model.tokens import special_prefix
from mechscope.sites import Site

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel


@torch.no_grad()
def reconstruction_metrics(
    sae: SparseAutoencoder,
    activations: Float[Tensor, "tokens d_in"],
    targets: Float[Tensor, "tokens d_out"] | None = None,
    batch_size: int = 4096,
) -> dict[str, float]:
    """``fvu``, ``explained_variance``, ``mse`` (per token, summed over dimensions), ``l0``, ``dead_fraction``.

    A transcoder is scored against `targets`, its out-site's activations at the same tokens.
    """
    if activations.ndim != 2:
        raise ShapeError(f"expected activations of shape [tokens, d_in], got {tuple(activations.shape)}")
    if sae.config.transcoder != (targets is not None):
        raise ShapeError("a transcoder is scored against targets (its out-site's activations), an SAE without")
    x_all = activations.float()
    y_all = x_all if targets is None else targets.float()
    if not bool(torch.isfinite(x_all).all()) or not bool(torch.isfinite(y_all).all()):
        raise ConfigError(f"activations to score must be finite; got NaN or inf among {tuple(x_all.shape)}")
    if y_all.shape != (x_all.shape[0], sae.config.width_out):
        expected = (x_all.shape[0], sae.config.width_out)
        raise ShapeError(f"expected targets of shape {list(expected)}, got {tuple(y_all.shape)}")
    mean = y_all.mean(0)
    sq_err = total_var = l0 = 0.0
    fired = torch.zeros(sae.config.d_sae, dtype=torch.bool)
    for start in range(0, x_all.shape[0], batch_size):
        x, y = x_all[start : start + batch_size], y_all[start : start + batch_size]
        recon, f = sae(x)
        sq_err += float((recon - y).pow(2).sum())
        total_var += float((y - mean).pow(2).sum())
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(0)
    n = x_all.shape[0]
    fvu = sq_err / max(total_var, 1e-12)
    return {
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "mse": sq_err / n,
        "l0": l0 / n,
        "dead_fraction": float((~fired).float().mean()),
    }


#: activation [batch, pos, d] -> [batch, pos] bool of the positions a hook leaves as they are (None: none)
Skip = Callable[[Tensor], "Tensor | None"]


def default_unspliced(model: HookedModel, unspliced: int | None = None) -> int:
    """How many leading positions of each row an SAE is not applied at: `unspliced`, checked, or by default
    the tokenizer's BOS prefix and at least position 0 -- what an activation store leaves out
    (``skip_first``), so an SAE from one is applied only where it was trained. Position 0 is the attention
    sink every later token reads, with or without a BOS (Gemma's BOS residual is 14x a text token's norm;
    SmolLM2, which adds no BOS, uses its first token the same way)."""
    if unspliced is None:
        return max(len(special_prefix(model.tokenizer)), 1)
    if isinstance(unspliced, bool) or not isinstance(unspliced, int) or unspliced < 0:
        raise ConfigError(f"unspliced must be a number of leading positions >= 0 (or None); got {unspliced!r}")
    return unspliced


def first_columns(count: int) -> Skip:
    """Skip the first `count` positions of every row (rows without padding, such as :func:`token_rows`')."""

    def skip(activation: Tensor) -> Tensor:
        mask = torch.zeros(activation.shape[:2], dtype=torch.bool, device=activation.device)
        mask[:, :count] = True
        return mask

    return skip


def leaving(fn: HookFn, skip: Skip) -> HookFn:
    """`fn` with the positions ``skip(activation)`` names left as they were (a hook that returns None, such
    as a transcoder's capture, stays one)."""

    def hook(activation: Tensor, ctx: HookContext) -> Tensor | None:
        new = fn(activation, ctx)
        mask = None if new is None else skip(activation)
        if new is None or mask is None:
            return new
        if mask.shape != activation.shape[:2]:
            raise ShapeError(
                f"positions to leave have shape {tuple(mask.shape)}; {ctx.name} has {tuple(activation.shape[:2])}"
            )
        return torch.where(mask.to(activation.device)[..., None], activation, new)

    return hook


def feature_hooks(
    model: HookedModel, sae: SparseAutoencoder, edit: Callable[[Tensor, Tensor, Tensor], Tensor]
) -> dict[Site, HookFn]:
    """Hooks that rewrite the reconstructed site from the SAE's features: ``edit(features, activation, x)``
    returns the new activation of the reconstructed site, given the features of the read site and its
    activation `x` (which a skip-transcoder's reconstruction needs).

    An SAE reads and writes one site; a transcoder reads ``config.site`` and writes ``config.out_site``
    in the same forward pass (its input is captured first)."""
    config = sae.config
    if not config.site:
        raise ShapeError("the SAE names no site; build it with SAEConfig(site=...)")
    sae.check_model(model)
    read = model.site(config.site)
    if not config.transcoder:
        return {read: lambda activation, _ctx: edit(sae.encode(activation), activation, activation)}
    write = model.site(config.out_site)
    captured: dict[str, Tensor] = {}

    def capture(activation: Tensor, _ctx: HookContext) -> None:
        captured["x"] = activation

    def rewrite(activation: Tensor, _ctx: HookContext) -> Tensor:
        if "x" not in captured:
            raise ShapeError(f"{read.name} did not run before {write.name}; a transcoder reads it first")
        x = captured.pop("x")
        return edit(sae.encode(x), activation, x)

    return {read: capture, write: rewrite}  # type: ignore[dict-item]


def splice_hooks(model: HookedModel, sae: SparseAutoencoder, *, keep_error: bool = False) -> dict[Site, HookFn]:
    """Hooks replacing the reconstructed site by the SAE's reconstruction (plus the reconstruction error
    when `keep_error`, which makes the splice an exact identity that features can then be edited inside)."""

    def edit(features: Tensor, activation: Tensor, x: Tensor) -> Tensor:
        recon = sae.decode(features, x).to(activation.dtype)
        return recon + (activation - recon) if keep_error else recon

    return feature_hooks(model, sae, edit)


@torch.no_grad()
def downstream_loss(
    model: HookedModel,
    sae: SparseAutoencoder,
    texts: Sequence[str],
    *,
    seq_len: int = 64,
    batch_size: int = 16,
    max_rows: int | None = 64,
    unspliced: int | None = None,
) -> dict[str, float]:
    """Mean next-token loss clean, with the SAE spliced in, and with its reconstructed site zero-ablated
    (``config.site``, or a transcoder's ``config.out_site``).

    The first `unspliced` positions of each row are left as they are in both runs (:func:`default_unspliced`:
    by default the BOS prefix, at least position 0, the positions a store never trains on). Pass
    ``unspliced=0`` for an SAE trained on every position. Rows start as :func:`token_rows` makes them (with
    the BOS where the tokenizer adds one).
    """
    written = model.site(sae.config.out_site or sae.config.site) if sae.config.site else None
    if written is None:
        raise ShapeError("the SAE names no site; build it with SAEConfig(site=...)")
    kept = default_unspliced(model, unspliced)
    rows = token_rows(model, texts, seq_len)[:max_rows]
    device = next(model.hf_model.parameters()).device
    if kept >= rows.shape[1]:
        raise ConfigError(f"unspliced={kept} leaves no position of the {rows.shape[1]}-token rows to splice")

    def zero(activation: Tensor, _ctx: HookContext) -> Tensor:
        return torch.zeros_like(activation)

    def text_only(hooks: dict[Site, HookFn]) -> dict[Site, HookFn]:
        return {site: leaving(fn, first_columns(kept)) for site, fn in hooks.items()}

    def mean_loss(hooks: dict) -> float:
        total = count = 0.0
        with model.hooks(hooks):
            for start in range(0, rows.shape[0], batch_size):
                ids = rows[start : start + batch_size].to(device)
                logits = model(ids).float()
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                )
                total += float(loss)
                count += ids[:, 1:].numel()
        return total / count

    clean = mean_loss({})
    spliced = mean_loss(text_only(splice_hooks(model, sae)))
    zeroed = mean_loss(text_only({written: zero}))
    return {
        "ce_clean": clean,
        "ce_spliced": spliced,
        "ce_zero_ablated": zeroed,
        "loss_recovered": (zeroed - spliced) / (zeroed - clean) if zeroed != clean else float("nan"),
        "unspliced": float(kept),
    }


__all__ = [
    "Skip",
    "default_unspliced",
    "downstream_loss",
    "feature_hooks",
    "first_columns",
    "leaving",
    "reconstruction_metrics",
    "splice_hooks",
]
