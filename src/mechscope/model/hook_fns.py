"""Ready-made hook functions with per-head / per-position indexing.

Each returns a ``fn(activation, ctx)`` for :meth:`HookedModel.hooks`. The head axis (``n_heads`` or
``n_kv_heads``) and position axis (``pos`` or ``query_pos``) are found from the site, so the same call
works for ``hook_z``, ``hook_result``, ``hook_pattern`` or ``hook_resid_post``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError, SiteError
from mechscope.model.hooks import HookContext, HookFn
from mechscope.sites import Selection, Site

Index = int | Sequence[int] | Tensor | None


def index_for(
    site: Site,
    ndim: int,
    *,
    heads: Index = None,
    positions: Index = None,
    batch: Index = None,
    shape: Sequence[int] | None = None,
) -> tuple:
    """An indexing tuple selecting `heads`, `positions` and `batch` rows of a site's activation.

    With the activation's `shape`, indices outside an axis raise :class:`ShapeError` naming the valid range
    (instead of torch's IndexError from inside the forward)."""
    idx: list[object] = [slice(None)] * ndim

    def as_index(value: Index) -> object:
        if value is None:
            return slice(None)
        if isinstance(value, int):
            return [value]
        return torch.as_tensor(value, dtype=torch.long) if not isinstance(value, Tensor) else value

    chosen = [v for v in (heads, positions, batch) if v is not None and not isinstance(v, int)]
    if len(chosen) > 1:
        raise ConfigError("index at most one of heads/positions/batch with a list; use ints for the others")
    if heads is not None:
        try:
            head_axis = Selection().head_axis(site)
        except SiteError as exc:
            raise ConfigError(str(exc)) from None
        idx[head_axis] = as_index(heads)
        _check_range("heads", heads, head_axis, site, shape)
    if positions is not None:
        idx[site.pos_axis] = as_index(positions)
        _check_range("positions", positions, site.pos_axis, site, shape)
    if batch is not None:
        idx[0] = as_index(batch)
        _check_range("batch rows", batch, 0, site, shape)
    return tuple(idx)


def _check_range(what: str, value: Index, axis: int, site: Site, shape: Sequence[int] | None) -> None:
    if shape is None or value is None:
        return
    n = int(shape[axis])
    values = [value] if isinstance(value, int) else [int(v) for v in torch.as_tensor(value).reshape(-1).tolist()]
    bad = [v for v in values if not -n <= v < n]
    if bad:
        raise ShapeError(
            f"{what} {bad} are out of range for {site.name}: its {site.axes[axis]} axis has {n} entries "
            f"(valid indices {-n}..{n - 1})"
        )


def _finite(name: str, value: float) -> float:
    out = float(value)
    if not math.isfinite(out):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    return out


def patch(source: Tensor, *, heads: Index = None, positions: Index = None, batch: Index = None) -> HookFn:
    """Replace the selected entries by those of `source` (an activation of the same site and shape)."""

    def fn(activation: Tensor, ctx: HookContext) -> Tensor:
        if source.shape != activation.shape:
            raise ShapeError(
                f"patch source for {ctx.name} has shape {tuple(source.shape)}; expected {tuple(activation.shape)}"
            )
        idx = index_for(
            ctx.site, activation.ndim, heads=heads, positions=positions, batch=batch, shape=activation.shape
        )
        out = activation.clone()
        out[idx] = source.to(activation.device, activation.dtype)[idx]
        return out

    return fn


def scale(factor: float, *, heads: Index = None, positions: Index = None, batch: Index = None) -> HookFn:
    """Multiply the selected entries by `factor` (0 is zero-ablation)."""
    factor = _finite("factor", factor)

    def fn(activation: Tensor, ctx: HookContext) -> Tensor:
        idx = index_for(
            ctx.site, activation.ndim, heads=heads, positions=positions, batch=batch, shape=activation.shape
        )
        out = activation.clone()
        out[idx] = out[idx] * factor
        return out

    return fn


def zero(*, heads: Index = None, positions: Index = None, batch: Index = None) -> HookFn:
    """Zero-ablate the selected entries."""
    return scale(0.0, heads=heads, positions=positions, batch=batch)


def add(vector: Tensor, *, coefficient: float = 1.0, positions: Index = None) -> HookFn:
    """Add ``coefficient * vector`` (last-axis width must match) at the selected positions."""
    coefficient = _finite("coefficient", coefficient)
    if not isinstance(vector, Tensor):
        raise ConfigError(f"vector must be a tensor; got {type(vector).__name__}")
    if not bool(torch.isfinite(vector).all()):
        raise ConfigError("vector contains NaN or infinite values")

    def fn(activation: Tensor, ctx: HookContext) -> Tensor:
        if vector.shape[-1] != activation.shape[-1]:
            raise ShapeError(
                f"vector added at {ctx.name} has width {vector.shape[-1]}; expected {activation.shape[-1]}"
            )
        idx = index_for(ctx.site, activation.ndim, positions=positions, shape=activation.shape)
        out = activation.clone()
        out[idx] = out[idx] + coefficient * vector.to(activation.device, activation.dtype)
        return out

    return fn
