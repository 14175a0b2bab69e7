"""Activation patching: swap one component's activation between a clean and a corrupted run.

Denoising runs the corrupted prompts and restores one clean activation per cell; noising runs the
clean prompts and inserts one corrupted activation. A cell is one patched component: a layer and a
position (residual stream, attention or MLP output, all heads at a position), a layer and a unit (a
head of ``hook_z``/``hook_q``/``hook_k``/``hook_v``/``hook_pattern`` or an MLP neuron, over the swept
positions), or a layer, unit and position.

Two implementations with identical results (to fp32 rounding):

* ``loop``: one full patched forward per cell -- the reference, and how TransformerLens's helpers work.
* ``batched``: many cells per forward, each copy of the base batch patched at its own cell, and every
  forward only computes what the patch can change. A patch at layer ``L`` and position ``p`` leaves
  earlier layers and earlier positions exactly as in the base run, so the run starts from the base
  run's residual at layer ``L`` with its KV cache for positions ``< p`` (see
  :mod:`mechscope.model.partial`) and projects onto the vocabulary only the positions the metric
  reads. Cells whose patch changes nothing (source equals base there) or that lie after every
  position the metric reads are the base metric without a forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError, SiteError, did_you_mean, renamed_keywords
from mechscope.locate._engine import MetricError, Variant, metric_positions, metric_value, run_batched, run_loop
from mechscope.metrics import Metric, SiteMetric, normalised
from mechscope.model.partial import base_run
from mechscope.results import Result
from mechscope.sites import HEAD_AXES, Selection, Site

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs

#: Short names accepted for the site kinds that can be swept.
KIND_ALIASES: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "heads": "attn.hook_z",
    "z": "attn.hook_z",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "pattern": "attn.hook_pattern",
    "neurons": "mlp.hook_post",
    "mlp_post": "mlp.hook_post",
}
PATCHABLE_KINDS: tuple[str, ...] = tuple(dict.fromkeys(KIND_ALIASES.values()))
#: Kinds with a unit axis (heads or neurons), and that axis's name.
UNIT_AXES: dict[str, str] = {
    "attn.hook_z": "n_heads",
    "attn.hook_q": "n_heads",
    "attn.hook_k": "n_kv_heads",
    "attn.hook_v": "n_kv_heads",
    "attn.hook_pattern": "n_heads",
    "mlp.hook_post": "d_mlp",
}
DIRECTIONS = ("denoising", "noising")
#: Mask entries (bytes) built at once in a sweep.
_MASK_BUDGET = 64 * 2**20
METHODS = ("batched", "loop")


class PromptMismatchError(ShapeError):
    """Clean and corrupted prompts whose token shapes differ (patching needs position-aligned runs)."""


class PatchResult(Result):
    """``metric [layer, pos]``, ``[layer, head]`` (or ``neuron``) or ``[layer, head, pos]``: the metric
    with each cell patched, averaged over the batch; ``clean`` and ``corrupt`` (0-d): the unpatched
    metrics of both runs."""

    method = "activation_patch"

    def default_tensor(self) -> str:
        return "metric"

    def normalised(self) -> Tensor:
        """The patched metric mapped so that the corrupt run is 0 and the clean run is 1."""
        return normalised(self["metric"], self["clean"], self["corrupt"])

    def plot(self, name: str | None = None, *, reduce: Sequence[str] = ("batch",), title: str | None = None) -> Any:
        """A heatmap; a ``[layer, head, pos]`` sweep is drawn as ``[layer x head, pos]``."""
        if (name or "metric") == "metric" and self["metric"].ndim == 3:
            layers, units, positions = (self.labels[a] for a in self.axes["metric"])
            flat = PatchResult(
                tensors={"metric": self["metric"].flatten(0, 1), "clean": self["clean"], "corrupt": self["corrupt"]},
                axes={"metric": ("cell", "pos"), "clean": (), "corrupt": ()},
                labels={"cell": [f"L{layer} {u}" for layer in layers for u in units], "pos": positions},
                config=self.config,
            )
            return flat.plot(reduce=reduce, title=title)
        return super().plot(name, reduce=reduce, title=title)


@dataclass(frozen=True)
class Cell:
    """One patched component: a layer, a position (None: every swept position) and a unit (None: all)."""

    layer: int
    pos: int | None = None
    unit: int | None = None


def resolve_kind(model: HookedModel, kind: str) -> str:
    """The canonical kind of `kind` (an alias or a canonical kind), checked against this model."""
    canonical = KIND_ALIASES.get(kind, kind)
    if canonical not in PATCHABLE_KINDS:
        options = sorted({*KIND_ALIASES, *PATCHABLE_KINDS})
        raise SiteError(f"cannot sweep site kind {kind!r}; expected one of {options}.{did_you_mean(kind, options)}")
    model.site(Site(canonical, 0))  # raises SiteError when this model lacks the kind
    return canonical


def tokens_of(model: HookedModel, inputs: Inputs) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` of `inputs` on the model's device."""
    batch = model.prepare_inputs(inputs)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def check_pair(clean: dict[str, Tensor], corrupt: dict[str, Tensor]) -> None:
    """Raise :class:`PromptMismatchError` unless both token batches align position by position."""
    a, b = clean["input_ids"].shape, corrupt["input_ids"].shape
    if a != b:
        raise PromptMismatchError(
            f"clean and corrupt prompts must have the same [batch, pos] token shape so positions align; "
            f"got clean {tuple(a)} and corrupt {tuple(b)}. Pad or choose prompts of equal token length."
        )
    if not torch.equal(clean["attention_mask"], corrupt["attention_mask"]):
        raise PromptMismatchError("clean and corrupt prompts must have the same attention mask (same padding)")


def _cells(
    kind: str, n_layers: int, n_units: int, per_head: bool, per_position: bool, positions: list[int], units: list[int]
) -> list[Cell]:
    layers = range(n_layers)
    if kind in UNIT_AXES and per_head:
        if per_position:
            return [Cell(layer, pos=p, unit=u) for layer in layers for u in units for p in positions]
        return [Cell(layer, unit=u) for layer in layers for u in units]
    return [Cell(layer, pos=p) for layer in layers for p in positions]


def _cell_mask(
    kind: str, cell: Cell, shape: torch.Size, positions: list[int], device: torch.device | None = None
) -> Bool[Tensor, "1 ..."]:
    """Where `cell` patches an activation of `shape` (batch axis of size 1)."""
    site = Site(kind, cell.layer)
    units: dict[str, tuple[int, ...] | None] = {"heads": None, "neurons": None}
    if cell.unit is not None:
        units["heads" if UNIT_AXES[kind] in HEAD_AXES else "neurons"] = (cell.unit,)
    chosen = Selection(positions=tuple(positions if cell.pos is None else [cell.pos]), **units)
    mask = chosen.mask(site, (1, *shape[1:]), device)
    assert mask is not None  # positions are always chosen
    return mask.expand(1, *shape[1:]).clone()


@renamed_keywords(sites_kind="kind")
def activation_patch(
    model: HookedModel,
    clean: Inputs,
    corrupt: Inputs,
    kind: str,
    metric: Metric | SiteMetric,
    *,
    direction: str = "denoising",
    per_head: bool = True,
    per_position: bool = False,
    positions: Sequence[int] | None = None,
    units: Sequence[int] | None = None,
    method: str = "batched",
    chunk_size: int = 32,
    progress: bool = False,
) -> PatchResult:
    """Patch every cell of `kind` and record `metric` (logits -> scalar or ``[batch]``).

    `metric` may instead be a :class:`~mechscope.metrics.SiteMetric` (a site's activation -> scalar or
    ``[batch]``, e.g. a probe's score): every patched run then ends at that site, and cells after it
    keep the base value.

    Args:
        kind: the site kind swept (``sites_kind=`` is its deprecated spelling):
            ``resid_pre|resid_mid|resid_post|attn_out|mlp_out`` (layer x position),
            ``heads|q|k|v|pattern`` (per head) or ``neurons`` (per MLP neuron), or canonical kinds.
        direction: ``denoising`` (run corrupt, restore clean) or ``noising`` (run clean, insert corrupt).
        per_head: for unit kinds, sweep (layer, unit) over the swept positions; False sweeps (layer,
            position) with every unit patched.
        per_position: with `per_head`, sweep (layer, unit, position).
        positions: positions to sweep (default all; for per-unit sweeps, the positions patched).
        units: heads or neurons to sweep (default all).
        method: ``batched`` (many cells per forward, partial runs) or ``loop`` (one full forward per cell).
        chunk_size: cells per forward in the batched method (memory grows with it).
        progress: show a progress bar.
    """
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}; got {method!r}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1; got {chunk_size}")
    kind = resolve_kind(model, kind)
    clean_t, corrupt_t = tokens_of(model, clean), tokens_of(model, corrupt)
    check_pair(clean_t, corrupt_t)
    batch, n_pos = clean_t["input_ids"].shape
    pos = list(range(n_pos)) if positions is None else [p % n_pos for p in checked_positions(positions, n_pos)]
    base_t, source_t = (corrupt_t, clean_t) if direction == "denoising" else (clean_t, corrupt_t)
    n_layers = model.dims.n_layers
    sites = [Site(kind, layer) for layer in range(n_layers)]
    read = [model.site(metric.site)] if isinstance(metric, SiteMetric) else []
    base = base_run(model, base_t, sites + read)
    source = base_run(model, source_t, sites + read)
    unit_axis = UNIT_AXES.get(kind)
    n_units = 0 if unit_axis is None else int(base.cache[sites[0].name].shape[Site(kind, 0).axes.index(unit_axis)])
    unit_list = _checked_units(units, n_units, kind)
    mask = base_t["attention_mask"]  # the same for both runs (check_pair): metrics read each row's last real token
    if isinstance(metric, SiteMetric):  # scored on the site's activation; patched runs stop there
        values = {
            name: metric.rows(run.cache[read[0].name]).mean() for name, run in (("base", base), ("source", source))
        }
    else:
        values = {
            "base": metric_value(metric, base.logits, batch, mask),
            "source": metric_value(metric, source.logits, batch, mask),
        }
    clean_value, corrupt_value = (
        (values["source"], values["base"]) if direction == "denoising" else (values["base"], values["source"])
    )
    cells = _cells(kind, n_layers, n_units, per_head, per_position, pos, unit_list)
    shape = base.cache[sites[0].name].shape
    sources = {site: source.cache[site.name] for site in sites}
    base_acts = {site: base.cache[site.name] for site in sites}
    # Masks are activation-sized; build them a block of cells at a time so memory stays bounded.
    block = max(chunk_size, _MASK_BUDGET // max(1, shape[1:].numel()))
    parts = []
    for first in range(0, len(cells), block):
        variants = [
            Variant({Site(kind, c.layer): _cell_mask(kind, c, shape, pos, base.logits.device)})
            for c in cells[first : first + block]
        ]
        if method == "loop":
            parts.append(run_loop(model, base, sources, variants, metric, progress=progress))
        else:
            parts.append(
                run_batched(
                    model,
                    base,
                    sources,
                    variants,
                    metric,
                    base_acts=base_acts,
                    chunk_size=chunk_size,
                    progress=progress,
                )
            )
    flat = torch.cat(parts)
    unit_name = "neuron" if kind == "mlp.hook_post" else "head"
    layer_labels = [str(i) for i in range(n_layers)]
    if unit_axis is not None and per_head:
        unit_labels = [f"{'N' if unit_name == 'neuron' else 'H'}{u}" for u in unit_list]
        if per_position:
            grid: tuple[int, ...] = (n_layers, len(unit_list), len(pos))
            axes: tuple[str, ...] = ("layer", unit_name, "pos")
        else:
            grid, axes = (n_layers, len(unit_list)), ("layer", unit_name)
        labels = {"layer": layer_labels, unit_name: unit_labels, "pos": [str(p) for p in pos]}
    else:
        grid, axes = (n_layers, len(pos)), ("layer", "pos")
        labels = {"layer": layer_labels, "pos": [str(p) for p in pos]}
    config: dict[str, Any] = {
        "kind": kind,
        "direction": direction,
        "per_head": per_head,
        "per_position": per_position,
        "positions": None if positions is None else pos,
        "units": None if units is None else unit_list,
        "method": method,
        "model_type": model.dims.model_type,
        "dtype": str(model.dtype).removeprefix("torch."),
        "metric_site": read[0].name if read else None,
    }
    return PatchResult(
        tensors={"metric": flat.reshape(grid), "clean": clean_value, "corrupt": corrupt_value},
        axes={"metric": axes, "clean": (), "corrupt": ()},
        labels={k: v for k, v in labels.items() if k in axes},
        config=config,
    )


def checked_positions(positions: Sequence[int], n_pos: int) -> list[int]:
    """`positions` as ints, each in ``[-n_pos, n_pos)``; :class:`ConfigError` otherwise."""
    out = [int(p) for p in positions]
    bad = [p for p in out if not -n_pos <= p < n_pos]
    if bad or not out:
        raise ConfigError(
            f"positions must be a non-empty list of indices in [{-n_pos}, {n_pos}); got {list(positions)}"
        )
    return out


def _checked_units(units: Sequence[int] | None, n_units: int, kind: str) -> list[int]:
    if units is None:
        return list(range(n_units))
    if n_units == 0:
        raise ConfigError(f"units= applies to per-head or per-neuron kinds {sorted(UNIT_AXES)}; got kind {kind!r}")
    out = [int(u) for u in units]
    if not out or any(not 0 <= u < n_units for u in out):
        raise ConfigError(f"units must be a non-empty list of indices in [0, {n_units}) for {kind}; got {list(units)}")
    return out


__all__ = [
    "KIND_ALIASES",
    "PATCHABLE_KINDS",
    "UNIT_AXES",
    "Metric",
    "MetricError",
    "PatchResult",
    "PromptMismatchError",
    "activation_patch",
    "check_pair",
    "checked_positions",
    "metric_positions",
    "metric_value",
    "resolve_kind",
    "tokens_of",
]
