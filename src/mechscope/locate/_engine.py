"""The patched-run engine shared by activation patching, causal tracing and path patching.

A *variant* is one patched run of the base batch: for some sites, a boolean mask saying where that
site's activation is replaced by a source activation. :func:`run_loop` does one full forward per
variant (the reference). :func:`run_batched` runs many variants per forward; each forward starts at
the first layer and the first position its variants patch (earlier layers and positions are the base
run's, by causality: :mod:`mechscope.model.partial`) and projects only the logits the metric reads.
Variants whose patch writes the values already there, or patches nothing the metric can see, get the
base metric without a forward. Both return the metric of every variant, averaged over the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.locate._reads import Scorer, read_plan
from mechscope.metrics import Metric, MetricError, SiteMetric, score, score_rows
from mechscope.model.hooks import HookContext, HookFn
from mechscope.model.partial import BaseRun, run_from
from mechscope.sites import Site, SiteLike

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel

#: Kinds whose last-layer patches reach no other position (no attention runs after them).
POSITIONWISE = frozenset({"hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_post"})
#: Kinds whose patch at position p changes, within its own layer, only position p (it does not feed
#: that layer's keys or values): the patched layer need only run on the patched positions.
LAYER_LOCAL = POSITIONWISE | {"attn.hook_q", "attn.hook_z", "attn.hook_pattern", "attn.hook_attn_scores"}


def metric_value(metric: Metric, logits: Tensor, batch: int, attention_mask: Tensor | None = None) -> Tensor:
    """The metric averaged over batch rows, after checking it returns a scalar or ``[batch]``.

    The metric is scored with `attention_mask` (each row's last real token; see :mod:`mechscope.metrics`)."""
    if logits.shape[0] != batch:
        raise MetricError(f"expected logits of {batch} rows; got {logits.shape[0]}")
    value = score(metric, logits, attention_mask).detach()
    if not bool(torch.isfinite(value).all()):
        raise MetricError(f"the metric must be finite on the unpatched runs; got {value.tolist()}")
    return value


def metric_rows_value(metric: Metric, logits: Tensor, batch: int, attention_mask: Tensor | None = None) -> Tensor:
    """The metric per batch row ``[batch]`` (float32, detached; a scalar metric is broadcast)."""
    if logits.shape[0] != batch:
        raise MetricError(f"expected logits of {batch} rows; got {logits.shape[0]}")
    return score_rows(metric, logits, attention_mask).detach().float()


def metric_positions(
    metric: Metric, logits: Float[Tensor, "batch pos d_vocab"], attention_mask: Tensor | None = None
) -> list[int]:
    """The positions whose logits `metric` reads, from its declaration or its gradient, then verified.

    Positions are kept only if the metric gives the same value with every other logit set to NaN;
    otherwise (a non-differentiable metric, say) every position is returned (:func:`read_plan`)."""
    return read_plan(metric, logits, attention_mask).positions


@dataclass(frozen=True)
class Variant:
    """One patched run: per site, a boolean mask ``[1, ...site dims]`` of the entries to replace."""

    masks: Mapping[Site, Tensor]

    def start(self) -> tuple[int, int]:
        """The first layer and the first position this variant patches."""
        layer = min(s.layer for s in self.masks if s.layer is not None)
        return layer, min(patched_positions(m, s.pos_axis)[0] for s, m in self.masks.items())


def patched_positions(mask: Tensor, pos_axis: int) -> list[int]:
    """The positions a mask patches."""
    return [int(p) for p in mask.movedim(pos_axis, 0).flatten(1).any(1).nonzero().flatten()]


def patch_hook(source: Tensor, mask: Tensor, site: Site, end: int | None = None) -> HookFn:
    """Patch a ``[k * batch, ...]`` activation from `source` ``[batch, ...]`` where `mask` ``[k, ...]``
    is set. In a partial run the activation covers the positions ending at `end` (default: the last):
    the new positions, or for keys/values the cached prefix too; a key axis covers ``0..end``."""
    pos_axis = site.pos_axis
    key_axis = site.axes.index("key_pos") if "key_pos" in site.axes else None

    def fn(activation: Tensor, _ctx: HookContext) -> Tensor:
        n_variants = mask.shape[0]
        length = activation.shape[pos_axis]
        offset = (source.shape[pos_axis] if end is None else end) - length
        src = source.narrow(pos_axis, offset, length)
        m = mask.narrow(pos_axis, offset, length)
        if key_axis is not None:
            n_keys = activation.shape[key_axis]
            src, m = src.narrow(key_axis, 0, n_keys), m.narrow(key_axis, 0, n_keys)
        src, m = src.to(activation.device, activation.dtype), m.to(activation.device)
        view = activation.reshape(n_variants, -1, *activation.shape[1:])
        return torch.where(m.unsqueeze(1), src.unsqueeze(0), view).reshape(activation.shape)

    return fn


def progress_bar(items: Sequence[Any], enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc)


def run_loop(
    model: HookedModel,
    base: BaseRun,
    sources: Mapping[Site, Tensor],
    variants: Sequence[Variant],
    metric: Metric,
    *,
    base_hooks: Mapping[SiteLike, HookFn] | None = None,
    progress: bool = False,
    per_row: bool = False,
    desc: str = "patching",
) -> Tensor:
    """One full patched forward per variant: the reference implementation.

    `base_hooks` recreate the base run when it is not just its tokens (causal tracing's noise).
    Returns ``[variant]`` batch means, or with `per_row` ``[variant, batch]``. A :class:`SiteMetric` is
    scored on its site's activation (the forward ends there)."""
    if isinstance(metric, SiteMetric):
        return _site_loop(model, base, sources, variants, metric, base_hooks, progress, per_row, desc)
    out = []
    inputs = {"input_ids": base.input_ids, "attention_mask": base.attention_mask}
    for variant in progress_bar(variants, progress, f"{desc} (loop)"):
        hooks = {site: patch_hook(sources[site], mask, site) for site, mask in variant.masks.items()}
        with torch.no_grad(), model.hooks(dict(base_hooks or {})), model.hooks(hooks):
            logits = model(inputs)
        rows = metric_rows_value(metric, logits, base.batch, base.attention_mask)
        out.append(rows if per_row else rows.mean())
    return torch.stack(out)


def merge_groups(
    groups: Mapping[tuple[int, int], list[int]], chunk_size: int, n_pos: int
) -> list[tuple[tuple[int, int], list[int]]]:
    """Chunks of at most `chunk_size` variants sharing a first layer, each run from its earliest start.

    Variants of one layer whose first positions differ a little share a forward: a variant that joins
    a chunk starting ``w`` positions before its own start recomputes ``w`` unpatched positions, allowed
    while ``w <= max(4, its own positions / 4)``. Few large forwards beat many small ones on CPU, where
    a forward of a dozen rows costs mostly its fixed overhead (a head x position sweep otherwise runs
    one forward per (layer, position) with only n_heads variants each).
    """
    chunks: list[tuple[tuple[int, int], list[int]]] = []
    for layer in sorted({layer for layer, _ in groups}):
        pending = sorted((start, i) for (lay, start), idx in groups.items() if lay == layer for i in idx)
        current: list[int] = []
        first = 0
        for start, i in pending:
            fits = len(current) < chunk_size and start - first <= max(4, (n_pos - start) // 4)
            if current and not fits:
                chunks.append(((layer, first), current))
                current = []
            if not current:
                first = start
            current.append(i)
        if current:
            chunks.append(((layer, first), current))
    return chunks


class _KeysValues(Exception):
    """Ends a run once the last layer's attention has its keys and values."""


def run_reading(
    model: HookedModel,
    base: BaseRun,
    resid: Float[Tensor, "rows new_pos d_model"],
    *,
    layer: int,
    start: int,
    keep: Sequence[int],
    hooks: Mapping[SiteLike, HookFn] | None = None,
) -> Tensor:
    """:func:`run_from` for the logits at `keep`, running the last layer in full only where they are read.

    The last layer's output is needed only at the positions read, but its keys and values at every
    position from `start` on: layers ``layer..last-1`` run as usual, then the last layer's attention
    inputs of every position are taken (its keys and values, then the run stops), and the last layer runs
    again on positions ``min(keep)..`` only, reading those keys and values from a cache. It is HF's own
    forward each time. Used when `hooks` touch no site of the last layer and ``min(keep) > start``
    (`resid` enters `layer`)."""
    last = model.dims.n_layers - 1
    first = min(keep)
    hooked_last = any(model.site(site).layer == last for site in (hooks or {}))
    kv_sites = set(model.site_names)
    has_kv = f"blocks.{last}.attn.hook_k" in kv_sites and f"blocks.{last}.attn.hook_v" in kv_sites
    if first <= start or hooked_last or not has_kv:
        return run_from(model, base, resid, layer=layer, start_pos=start, logit_positions=keep, hooks=hooks)
    hidden = resid
    if layer < last:
        hidden = run_from(model, base, resid, layer=layer, start_pos=start, hooks=hooks, stop_layer=last)
    got: dict[str, Tensor] = {}

    def keep_k(activation: Tensor, _ctx: HookContext) -> None:
        got["k"] = activation

    def keep_v(activation: Tensor, _ctx: HookContext) -> None:
        got["v"] = activation
        raise _KeysValues

    kv_hooks: dict[SiteLike, HookFn] = {Site("attn.hook_k", last): keep_k, Site("attn.hook_v", last): keep_v}
    with contextlib.suppress(_KeysValues):
        run_from(model, base, hidden, layer=last, start_pos=start, logit_positions=keep, hooks=kv_hooks)
    # Sites are [rows, pos, kv_heads, d_head]; the cache holds [rows, kv_heads, pos, d_head].
    keys, values = got["k"].transpose(1, 2), got["v"].transpose(1, 2)
    rows = resid.shape[0]
    repeats = rows // base.batch
    variants = BaseRun(
        input_ids=base.input_ids.repeat(repeats, 1),
        attention_mask=base.attention_mask.repeat(repeats, 1),
        position_ids=base.position_ids.repeat(repeats, 1),
        resid_pre=[],
        keys=[keys] * model.dims.n_layers,  # only the last layer's are read; the others give a shape
        values=[values] * model.dims.n_layers,
        logits=base.logits,
        cache={},
    )
    return run_from(model, variants, hidden[:, first - start :], layer=last, start_pos=first, logit_positions=keep)


def run_batched(
    model: HookedModel,
    base: BaseRun,
    sources: Mapping[Site, Tensor],
    variants: Sequence[Variant],
    metric: Metric,
    *,
    base_acts: Mapping[Site, Tensor] | None = None,
    chunk_size: int = 32,
    progress: bool = False,
    per_row: bool = False,
    desc: str = "patching",
) -> Tensor:
    """Many variants per forward, grouped by (first layer, first position) and run from there.

    `base_acts` (the base run's activations at the patched sites) let variants whose patch writes the
    values already there be skipped. Returns ``[variant]`` batch means, or with `per_row` ``[variant, batch]``.
    A :class:`SiteMetric` is scored on its site's activation, every forward ending there (the base run's
    ``cache`` must hold that site).
    """
    if isinstance(metric, SiteMetric):
        return _site_batched(model, base, sources, variants, metric, base_acts, chunk_size, progress, per_row, desc)
    batch = base.batch
    scorer = Scorer(model, metric, base)
    base_rows = metric_rows_value(metric, base.logits, batch, base.attention_mask)
    out = base_rows.expand(len(variants), batch).clone()
    read = scorer.plan.positions
    last = model.dims.n_layers - 1
    groups: dict[tuple[int, int], list[int]] = {}
    for i, variant in enumerate(variants):
        layer, start = variant.start()
        if start > max(read):
            continue  # nothing the metric reads comes after this patch
        if all(s.layer == last and s.kind in LAYER_LOCAL for s in variant.masks) and not set(read) & {
            p for s, m in variant.masks.items() for p in patched_positions(m, s.pos_axis)
        }:
            continue  # in the last layer, such a patch only reaches its own positions
        if base_acts is not None and all(
            torch.equal(torch.where(m.to(base_acts[s].device), sources[s], base_acts[s]), base_acts[s])
            for s, m in variant.masks.items()
        ):
            continue  # the patch writes the values already there
        groups.setdefault((layer, start), []).append(i)
    chunks = merge_groups(groups, chunk_size, base.n_pos)
    for (layer, start), members in progress_bar(chunks, progress, desc):
        sites = sorted({s for i in members for s in variants[i].masks}, key=lambda s: s.order)
        # A patch inside one layer that feeds none of its keys/values: run that layer on the patched
        # positions only, then the rest of the model from the next layer.
        local = layer < last and all(s.layer == layer and s.kind in LAYER_LOCAL for s in sites)
        end = base.n_pos
        if local:
            end = 1 + max(max(patched_positions(m, s.pos_axis)) for i in members for s, m in variants[i].masks.items())
        hooks: dict[SiteLike, HookFn] = {}
        for site in sites:
            empty = torch.zeros_like(next(variants[i].masks[site] for i in members if site in variants[i].masks))
            masks = torch.cat([variants[i].masks.get(site, empty) for i in members])
            hooks[site] = patch_hook(sources[site], masks, site, end)
        n = len(members)

        def forward(
            keep: list[int],
            layer: int = layer,
            start: int = start,
            end: int = end,
            local: bool = local,
            hooks: dict[SiteLike, HookFn] = hooks,
            n: int = n,
        ) -> Tensor:
            if local:
                resid = base.resid_pre[layer][:, start:end].repeat(n, 1, 1)
                hidden = run_from(model, base, resid, layer=layer, start_pos=start, hooks=hooks, stop_layer=layer + 1)
                resid = base.resid_pre[layer + 1][:, start:].repeat(n, 1, 1)
                resid[:, : end - start] = hidden
                return run_reading(model, base, resid, layer=layer + 1, start=start, keep=keep)
            resid = base.resid_pre[layer][:, start:].repeat(n, 1, 1)
            return run_reading(model, base, resid, layer=layer, start=start, keep=keep, hooks=hooks)

        out[members] = scorer.chunk(forward, n, start).to(out.device)
    return out if per_row else out.mean(-1)


# Site metrics ------------------------------------------------------------------------------------------------
class _SiteReached(Exception):
    """Ends a run once the metric's site is computed."""


def _capture(got: list[Tensor]) -> HookFn:
    def fn(activation: Tensor, _ctx: HookContext) -> None:
        got.append(activation.detach())
        raise _SiteReached

    return fn


def _hooks_then_capture(
    patches: Mapping[Site, HookFn], metric: SiteMetric, got: list[Tensor]
) -> dict[SiteLike, list[HookFn]]:
    """The patch hooks, plus a capture of the metric's site that runs after a patch of that same site."""
    hooks: dict[SiteLike, list[HookFn]] = {site: [fn] for site, fn in patches.items()}
    hooks.setdefault(metric.site, []).append(_capture(got))
    return hooks


def _site_loop(
    model: HookedModel,
    base: BaseRun,
    sources: Mapping[Site, Tensor],
    variants: Sequence[Variant],
    metric: SiteMetric,
    base_hooks: Mapping[SiteLike, HookFn] | None,
    progress: bool,
    per_row: bool,
    desc: str,
) -> Tensor:
    out = []
    inputs = {"input_ids": base.input_ids, "attention_mask": base.attention_mask}
    for variant in progress_bar(variants, progress, f"{desc} (loop)"):
        got: list[Tensor] = []
        patches = {site: patch_hook(sources[site], mask, site) for site, mask in variant.masks.items()}
        with (
            torch.no_grad(),
            model.hooks(dict(base_hooks or {})),
            model.hooks(_hooks_then_capture(patches, metric, got)),
            contextlib.suppress(_SiteReached),
        ):
            model(inputs)
        rows = metric.rows(got[0])
        out.append(rows if per_row else rows.mean())
    return torch.stack(out)


def _site_batched(
    model: HookedModel,
    base: BaseRun,
    sources: Mapping[Site, Tensor],
    variants: Sequence[Variant],
    metric: SiteMetric,
    base_acts: Mapping[Site, Tensor] | None,
    chunk_size: int,
    progress: bool,
    per_row: bool,
    desc: str,
) -> Tensor:
    """:func:`run_batched` for a site metric: each chunk runs from its first layer and position up to the
    metric's site; positions before the start are the base run's there. Variants patching only sites that
    come after the metric's site get the base value without a forward."""
    target = metric.site
    if target.name not in base.cache:
        raise MetricError(f"the base run must cache the metric's site {target.name}")
    base_target = base.cache[target.name]
    batch, pos_axis = base.batch, target.pos_axis
    base_rows = metric.rows(base_target)
    out = base_rows.expand(len(variants), batch).clone()
    groups: dict[tuple[int, int], list[int]] = {}
    for i, variant in enumerate(variants):
        if all(site.order > target.order for site in variant.masks):
            continue  # patched after the site is computed
        if base_acts is not None and all(
            torch.equal(torch.where(m.to(base_acts[s].device), sources[s], base_acts[s]), base_acts[s])
            for s, m in variant.masks.items()
        ):
            continue  # the patch writes the values already there
        groups.setdefault(variant.start(), []).append(i)
    for (layer, start), members in progress_bar(merge_groups(groups, chunk_size, base.n_pos), progress, desc):
        sites = sorted({s for i in members for s in variants[i].masks}, key=lambda s: s.order)
        patches: dict[Site, HookFn] = {}
        for site in sites:
            empty = torch.zeros_like(next(variants[i].masks[site] for i in members if site in variants[i].masks))
            masks = torch.cat([variants[i].masks.get(site, empty) for i in members])
            patches[site] = patch_hook(sources[site], masks, site)
        n, got = len(members), list[Tensor]()
        resid = base.resid_pre[layer][:, start:].repeat(n, 1, 1)
        with contextlib.suppress(_SiteReached):
            run_from(model, base, resid, layer=layer, start_pos=start, hooks=_hooks_then_capture(patches, metric, got))
        full = base_target.repeat(n, *([1] * (base_target.ndim - 1)))
        tail = got[0]  # positions start.. of the site, every variant
        full.narrow(pos_axis, base.n_pos - tail.shape[pos_axis], tail.shape[pos_axis]).copy_(tail)
        rows = torch.stack([metric.rows(full[j * batch : (j + 1) * batch]) for j in range(n)])
        out[members] = rows.to(out.device)
    return out if per_row else out.mean(-1)


__all__ = [
    "LAYER_LOCAL",
    "POSITIONWISE",
    "MetricError",
    "Scorer",
    "Variant",
    "merge_groups",
    "metric_positions",
    "metric_rows_value",
    "metric_value",
    "patch_hook",
    "patched_positions",
    "progress_bar",
    "read_plan",
    "run_batched",
    "run_loop",
    "run_reading",
]
