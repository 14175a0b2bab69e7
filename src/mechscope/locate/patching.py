"""Activation patching: swap one component's activation between a clean and a corrupted run.

Denoising runs the corrupted prompts and restores one clean activation per cell; noising runs the
clean prompts and inserts one corrupted activation. A cell is (layer, position) for residual,
attention-output and MLP-output sites, and (layer, head) for ``attn.hook_z`` (all positions at once).

Two implementations with identical results: ``loop`` (one patched forward per cell, the reference)
and ``batched`` (many cells per forward: the base prompts repeated once per cell, each copy patched at
its own cell by a mask, in chunks that bound memory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechscope.errors import ConfigError, MechscopeError, ShapeError, SiteError, did_you_mean
from mechscope.locate.metrics import normalised
from mechscope.locate.results import Result
from mechscope.model import hook_fns
from mechscope.model.hooks import HookContext, HookFn
from mechscope.sites import Site, SiteLike

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs

Metric = Callable[[Tensor], Tensor]

#: Short names accepted for the site kinds that can be swept.
KIND_ALIASES: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "heads": "attn.hook_z",
    "z": "attn.hook_z",
}
PATCHABLE_KINDS: tuple[str, ...] = tuple(dict.fromkeys(KIND_ALIASES.values()))
DIRECTIONS = ("denoising", "noising")
METHODS = ("batched", "loop")


class PromptMismatchError(ShapeError):
    """Clean and corrupted prompts whose token shapes differ (patching needs position-aligned runs)."""


class MetricError(MechscopeError, ValueError):
    """A metric that does not return one value (or one per batch row) as a tensor."""


class PatchResult(Result):
    """``metric [layer, pos]`` or ``[layer, head]``: the metric with each cell patched, averaged over the
    batch; ``clean`` and ``corrupt`` (0-d): the unpatched metrics of both runs."""

    method = "activation_patch"

    def default_tensor(self) -> str:
        return "metric"

    def normalised(self) -> Tensor:
        """The patched metric mapped so that the corrupt run is 0 and the clean run is 1."""
        return normalised(self["metric"], self["clean"], self["corrupt"])


@dataclass(frozen=True)
class Cell:
    """One patched component: a layer and either a position or a head (None: all)."""

    layer: int
    pos: int | None = None
    head: int | None = None


def resolve_kind(model: HookedModel, kind: str) -> str:
    """The canonical kind of `kind` (an alias or a canonical kind), checked against this model."""
    canonical = KIND_ALIASES.get(kind, kind)
    if canonical not in PATCHABLE_KINDS:
        options = sorted({*KIND_ALIASES, *PATCHABLE_KINDS})
        raise SiteError(f"cannot sweep site kind {kind!r}; expected one of {options}.{did_you_mean(kind, options)}")
    model.site(Site(canonical, 0))  # raises SiteError when this model lacks the kind
    return canonical


def _tokens(model: HookedModel, inputs: Inputs) -> dict[str, Tensor]:
    batch = model.prepare_inputs(inputs)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _check_pair(clean: dict[str, Tensor], corrupt: dict[str, Tensor]) -> None:
    a, b = clean["input_ids"].shape, corrupt["input_ids"].shape
    if a != b:
        raise PromptMismatchError(
            f"clean and corrupt prompts must have the same [batch, pos] token shape so positions align; "
            f"got clean {tuple(a)} and corrupt {tuple(b)}. Pad or choose prompts of equal token length."
        )
    if not torch.equal(clean["attention_mask"], corrupt["attention_mask"]):
        raise PromptMismatchError("clean and corrupt prompts must have the same attention mask (same padding)")


def _metric_value(metric: Metric, logits: Tensor, batch: int) -> Tensor:
    """The metric averaged over batch rows, after checking it returns a scalar or ``[batch]``."""
    out = metric(logits)
    if not isinstance(out, Tensor):
        raise MetricError(f"metric must return a tensor (a scalar or [batch]=({batch},)); got {type(out).__name__}")
    if out.ndim == 0:
        return out.detach().float()
    if out.shape != (batch,):
        raise MetricError(f"metric must return a scalar or [batch]=({batch},); got shape {tuple(out.shape)}")
    return out.detach().float().mean()


def _cells(
    kind: str, n_layers: int, n_pos: int, n_heads: int, per_head: bool, positions: list[int] | None
) -> list[Cell]:
    if kind == "attn.hook_z" and per_head:
        return [Cell(layer, head=h) for layer in range(n_layers) for h in range(n_heads)]
    pos = list(range(n_pos)) if positions is None else positions
    return [Cell(layer, pos=p) for layer in range(n_layers) for p in pos]


def activation_patch(
    model: HookedModel,
    clean: Inputs,
    corrupt: Inputs,
    sites_kind: str,
    metric: Metric,
    *,
    direction: str = "denoising",
    per_head: bool = True,
    positions: Sequence[int] | None = None,
    method: str = "batched",
    chunk_size: int = 32,
) -> PatchResult:
    """Patch every cell of `sites_kind` and record `metric` (logits -> scalar or ``[batch]``).

    Args:
        sites_kind: ``resid_pre|resid_mid|resid_post|attn_out|mlp_out|heads`` (or canonical kinds).
        direction: ``denoising`` (run corrupt, restore clean) or ``noising`` (run clean, insert corrupt).
        per_head: for heads, sweep (layer, head) over all positions; False sweeps (layer, position).
        positions: positions to sweep (default all; for per-head sweeps, the positions patched).
        method: ``batched`` (many cells per forward) or ``loop`` (one forward per cell).
        chunk_size: cells per forward in the batched method (memory grows with it).
    """
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}; got {method!r}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1; got {chunk_size}")
    kind = resolve_kind(model, sites_kind)
    clean_t, corrupt_t = _tokens(model, clean), _tokens(model, corrupt)
    _check_pair(clean_t, corrupt_t)
    batch, n_pos = clean_t["input_ids"].shape
    pos = None if positions is None else [p % n_pos for p in _checked_positions(positions, n_pos)]
    base, source = (corrupt_t, clean_t) if direction == "denoising" else (clean_t, corrupt_t)
    layers = range(model.dims.n_layers)
    sites = [Site(kind, layer) for layer in layers]
    base_logits, _ = model.run_with_cache(base, sites=[])
    source_logits, source_cache = model.run_with_cache(source, sites=sites)
    assert base_logits is not None and source_logits is not None
    values = {"base": _metric_value(metric, base_logits, batch), "source": _metric_value(metric, source_logits, batch)}
    clean_value, corrupt_value = (
        (values["source"], values["base"]) if direction == "denoising" else (values["base"], values["source"])
    )
    heads_grid = kind == "attn.hook_z" and per_head
    cells = _cells(kind, model.dims.n_layers, n_pos, model.dims.n_heads, per_head, pos)
    sources = {layer: source_cache[Site(kind, layer)] for layer in layers}
    if method == "loop":
        flat = _run_loop(model, base, sources, kind, cells, metric, batch, pos if heads_grid else None)
    else:
        flat = _run_batched(model, base, sources, kind, cells, metric, batch, chunk_size, pos if heads_grid else None)
    n_cols = model.dims.n_heads if heads_grid else len(cells) // model.dims.n_layers
    second = "head" if heads_grid else "pos"
    col_labels = [f"H{h}" for h in range(n_cols)] if heads_grid else [str(c.pos) for c in cells[:n_cols]]
    config: dict[str, Any] = {
        "sites_kind": kind,
        "direction": direction,
        "per_head": per_head,
        "positions": pos,
        "method": method,
        "model_type": model.dims.model_type,
    }
    return PatchResult(
        tensors={"metric": flat.reshape(model.dims.n_layers, n_cols), "clean": clean_value, "corrupt": corrupt_value},
        axes={"metric": ("layer", second), "clean": (), "corrupt": ()},
        labels={"layer": [str(i) for i in layers], second: col_labels},
        config=config,
    )


def _checked_positions(positions: Sequence[int], n_pos: int) -> list[int]:
    out = [int(p) for p in positions]
    bad = [p for p in out if not -n_pos <= p < n_pos]
    if bad or not out:
        raise ConfigError(
            f"positions must be a non-empty list of indices in [{-n_pos}, {n_pos}); got {list(positions)}"
        )
    return out


def _run_loop(
    model: HookedModel,
    base: dict[str, Tensor],
    sources: dict[int, Tensor],
    kind: str,
    cells: list[Cell],
    metric: Metric,
    batch: int,
    head_positions: list[int] | None,
) -> Tensor:
    """One patched forward per cell, through ``hook_fns.patch``: the reference implementation."""
    out = []
    for cell in cells:
        positions = head_positions if cell.head is not None else cell.pos
        fn = hook_fns.patch(sources[cell.layer], heads=cell.head, positions=positions)
        with torch.no_grad(), model.hooks({Site(kind, cell.layer): fn}):
            logits = model(base)
        out.append(_metric_value(metric, logits, batch))
    return torch.stack(out)


def _cell_masks(
    kind: str, cells: list[Cell], shape: torch.Size, head_positions: list[int] | None
) -> dict[int, Bool[Tensor, "variant 1 pos ..."]]:
    """Per layer, a boolean mask [variant, 1, pos(, head)] marking where each variant is patched."""
    n_pos = shape[1]
    n_heads = shape[2] if kind == "attn.hook_z" else 1
    masks: dict[int, Tensor] = {}
    for i, cell in enumerate(cells):
        mask = masks.setdefault(cell.layer, torch.zeros(len(cells), 1, n_pos, n_heads, dtype=torch.bool))
        pos_index: Any = slice(None) if cell.pos is None else cell.pos
        if cell.head is not None:
            pos_index = slice(None) if head_positions is None else torch.tensor(head_positions)
        head_index: Any = slice(None) if cell.head is None else cell.head
        mask[i, 0, pos_index, head_index] = True
    if kind != "attn.hook_z":
        masks = {layer: m[..., 0] for layer, m in masks.items()}
    return masks


def _masked_patch(source: Tensor, mask: Tensor) -> HookFn:
    """Replace entries of a [variant * batch, ...] activation where `mask` [variant, 1, ...] is set."""

    def fn(activation: Tensor, _ctx: HookContext) -> Tensor:
        n_variants = mask.shape[0]
        view = activation.reshape(n_variants, -1, *activation.shape[1:])
        src = source.to(activation.device, activation.dtype).unsqueeze(0)
        m = mask.to(activation.device).reshape(*mask.shape, *([1] * (view.ndim - mask.ndim)))
        return torch.where(m, src, view).reshape(activation.shape)

    return fn


def _run_batched(
    model: HookedModel,
    base: dict[str, Tensor],
    sources: dict[int, Tensor],
    kind: str,
    cells: list[Cell],
    metric: Metric,
    batch: int,
    chunk_size: int,
    head_positions: list[int] | None,
) -> Tensor:
    """Many cells per forward: the base batch repeated once per cell, each copy patched at its cell."""
    out: list[Tensor] = []
    shape = next(iter(sources.values())).shape
    for start in range(0, len(cells), chunk_size):
        chunk = cells[start : start + chunk_size]
        masks = _cell_masks(kind, chunk, shape, head_positions)
        hooks: dict[SiteLike, HookFn] = {
            Site(kind, layer): _masked_patch(sources[layer], mask) for layer, mask in masks.items()
        }
        repeated = {k: v.repeat(len(chunk), 1) for k, v in base.items()}
        with torch.no_grad(), model.hooks(hooks):
            logits: Float[Tensor, "vb pos d_vocab"] = model(repeated)
        for i in range(len(chunk)):
            out.append(_metric_value(metric, logits[i * batch : (i + 1) * batch], batch))
    return torch.stack(out)


__all__ = [
    "KIND_ALIASES",
    "PATCHABLE_KINDS",
    "MetricError",
    "PatchResult",
    "PromptMismatchError",
    "activation_patch",
    "resolve_kind",
]
