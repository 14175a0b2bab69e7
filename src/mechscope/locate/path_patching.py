"""Path patching (Wang et al. 2022, the IOI circuit): the effect of a sender through direct paths only.

For each sender head, the sender's output is taken from the source run while *every other*
component -- all other attention heads and (by default) every MLP -- is frozen at its value in the
base run, so the sender's change reaches a receiver only along the direct residual path:

* receiver ``logits``: the metric of that frozen run (the sender's direct effect on the output);
* receiver heads' ``q``, ``k`` or ``v`` inputs: the receivers' query/key/value vectors of the frozen run
  are recorded, then a normal base run is made with only those receiver vectors patched in, and
  everything downstream recomputed; the metric of that run is reported.

Following the paper, the default direction is ``noising``: the base run is the clean prompt set and
senders take the corrupted (e.g. ABC) activations, so important paths lower the metric. Senders run
in batches (one sender per copy of the base batch), each starting at its layer
(:mod:`mechscope.model.partial`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.locate._engine import metric_value, progress_bar
from mechscope.locate._reads import Scorer
from mechscope.locate.patching import check_pair, tokens_of
from mechscope.metrics import Metric, normalised
from mechscope.model.hooks import HookContext, HookFn
from mechscope.model.partial import BaseRun, base_run, run_from
from mechscope.results import Result
from mechscope.sites import Site, SiteLike

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs

RECEIVER_INPUTS = {"q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v"}


@dataclass(frozen=True)
class Receiver:
    """A receiving head's input: ``layer``, ``head`` (a key/value head for ``k``/``v``) and ``input``."""

    layer: int
    head: int
    input: str = "q"

    def __post_init__(self) -> None:
        if self.input not in RECEIVER_INPUTS:
            raise ConfigError(f"receiver input must be one of {sorted(RECEIVER_INPUTS)}; got {self.input!r}")

    @property
    def site(self) -> Site:
        return Site(RECEIVER_INPUTS[self.input], self.layer)


class PathPatchResult(Result):
    """``metric [layer, head]`` (or ``[sender]`` for sender sets): the metric with that sender
    path-patched to the receivers, averaged over the batch; ``clean`` and ``corrupt`` (0-d): the
    unpatched metrics."""

    method = "path_patch"

    def default_tensor(self) -> str:
        return "metric"

    def normalised(self) -> Tensor:
        """The metric mapped so that the corrupt run is 0 and the clean run is 1."""
        return normalised(self["metric"], self["clean"], self["corrupt"])

    def effect(self) -> Tensor:
        """The change of the metric caused by each sender's path (patched minus base)."""
        base = self["clean"] if self.config["direction"] == "noising" else self["corrupt"]
        return self["metric"] - base


class _Stop(Exception):
    """Ends a sender pass once the receivers' inputs are recorded."""


def _parse_senders(
    senders: Sequence[Sequence[tuple[int, int]]] | None, n_layers: int, n_heads: int
) -> list[tuple[tuple[int, int], ...]]:
    if senders is None:
        return [((layer, head),) for layer in range(n_layers) for head in range(n_heads)]
    out = []
    for group in senders:
        heads = tuple(sorted({(int(layer), int(head)) for layer, head in group}))
        if not heads or any(not (0 <= layer < n_layers and 0 <= head < n_heads) for layer, head in heads):
            raise ConfigError(
                f"each sender set must be a non-empty list of (layer, head) with layer in 0..{n_layers - 1} "
                f"and head in 0..{n_heads - 1}; got {list(group)}"
            )
        out.append(heads)
    if not out:
        raise ConfigError("senders must not be empty")
    return out


def _tail(values: Tensor, activation: Tensor) -> Tensor:
    """`values` ``[batch, pos, ...]`` cut to the last positions `activation` covers (a partial run's)."""
    return values[:, values.shape[1] - activation.shape[1] :]


def _replace(values: Tensor) -> HookFn:
    """Replace a ``[k * batch, ...]`` activation by `values` ``[batch, ...]`` repeated (a frozen site)."""

    def fn(activation: Tensor, _ctx: HookContext) -> Tensor:
        reps = activation.shape[0] // values.shape[0]
        tail = _tail(values, activation)
        return tail.to(activation.device, activation.dtype).repeat(reps, *([1] * (values.ndim - 1)))

    return fn


def _frozen_with_senders(base: Tensor, source: Tensor, heads: list[list[int]]) -> HookFn:
    """hook_z frozen at `base` in every variant, except variant j's sender heads ``heads[j]`` from `source`."""

    def fn(activation: Tensor, _ctx: HookContext) -> Tensor:
        frozen, patched = _tail(base, activation), _tail(source, activation)
        out = frozen.to(activation.dtype).repeat(len(heads), *([1] * (base.ndim - 1)))
        view = out.view(len(heads), -1, *frozen.shape[1:])
        for j, chosen in enumerate(heads):
            if chosen:
                view[j, :, :, chosen] = patched[:, :, chosen].to(activation.dtype)
        return out

    return fn


def _receiver_hook(recorded: Tensor, heads: list[int]) -> HookFn:
    """Write the recorded receiver heads' inputs ``[k * batch, pos, heads, d_head]`` into the run."""

    def fn(activation: Tensor, _ctx: HookContext) -> Tensor:
        out = activation.clone()
        out[:, :, heads] = recorded[:, :, heads].to(activation.dtype)
        return out

    return fn


def _parse_receivers(receivers: str | Sequence[Receiver | tuple[Any, ...]]) -> list[Receiver] | None:
    if isinstance(receivers, str):
        if receivers not in ("logits", "resid"):
            raise ConfigError(
                f"receivers must be 'logits' or a list of Receiver(layer, head, input); got {receivers!r}"
            )
        return None
    out = [r if isinstance(r, Receiver) else Receiver(*r) for r in receivers]
    if not out:
        raise ConfigError("receivers must not be empty")
    return out


def path_patch(
    model: HookedModel,
    clean: Inputs,
    corrupt: Inputs,
    metric: Metric,
    *,
    receivers: str | Sequence[Receiver | tuple[Any, ...]] = "logits",
    senders: Sequence[Sequence[tuple[int, int]]] | None = None,
    direction: str = "noising",
    freeze_mlps: bool = True,
    chunk_size: int = 32,
    progress: bool = False,
) -> PathPatchResult:
    """Path-patch every attention head, one at a time (or each set of `senders`), to `receivers`.

    Args:
        receivers: ``"logits"`` or receiver heads' inputs, ``[Receiver(layer, head, "q"|"k"|"v"), ...]``
            (tuples accepted).
        senders: sets of heads patched together, ``[[(layer, head), ...], ...]``; the result is then
            ``metric [sender]``. Default: every head alone, ``metric [layer, head]``.
        direction: ``noising`` (base = clean, senders from corrupt; the paper's) or ``denoising``.
        freeze_mlps: freeze MLP outputs too (only direct head-to-receiver paths); False lets MLPs
            recompute (paths through MLPs count as direct, as in some implementations).
        chunk_size: senders per forward.
    """
    if direction not in ("noising", "denoising"):
        raise ConfigError(f"direction must be 'noising' or 'denoising'; got {direction!r}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1; got {chunk_size}")
    parsed = _parse_receivers(receivers)
    d = model.dims
    if parsed is not None:
        for r in parsed:
            model.site(r.site)
            limit = d.n_heads if r.input == "q" else d.n_kv_heads
            if not 0 <= r.head < limit:
                raise ConfigError(f"receiver {r} has head {r.head}; {r.input} heads of this model are 0..{limit - 1}")
    clean_t, corrupt_t = tokens_of(model, clean), tokens_of(model, corrupt)
    check_pair(clean_t, corrupt_t)
    base_t, source_t = (clean_t, corrupt_t) if direction == "noising" else (corrupt_t, clean_t)
    z_sites = [Site("attn.hook_z", layer) for layer in range(d.n_layers)]
    mlp_sites = [Site("hook_mlp_out", layer) for layer in range(d.n_layers)]
    final_site = Site("hook_resid_post", d.n_layers - 1)  # the final norm's input
    base = base_run(model, base_t, [*z_sites, *mlp_sites, final_site])
    source = base_run(model, source_t, z_sites)
    batch = base.batch
    mask = base_t["attention_mask"]  # the same for both runs (check_pair): metrics read each row's last real token
    values = {
        "base": metric_value(metric, base.logits, batch, mask),
        "source": metric_value(metric, source.logits, batch, mask),
    }
    scorer = Scorer(model, metric, base)
    # With every head's output fixed, no position reads another: runs to the logits start at the
    # first position the metric reads. With the MLPs fixed too, only the senders' layers need to run.
    first = min(scorer.plan.positions) if parsed is None else 0
    direct = parsed is None and freeze_mlps and scorer.compact
    sets = _parse_senders(senders, d.n_layers, d.n_heads)
    flat = values["base"].expand(len(sets)).clone()
    last_receiver = d.n_layers if parsed is None else max(r.layer for r in parsed)
    by_start: dict[int, list[int]] = {}
    for i, group in enumerate(sets):
        if group[0][0] < last_receiver:  # senders at or after every receiver have no path: base value
            by_start.setdefault(group[0][0], []).append(i)
    chunks = [
        (layer, idx[j : j + chunk_size]) for layer, idx in by_start.items() for j in range(0, len(idx), chunk_size)
    ]
    for layer, members in progress_bar(chunks, progress, "path patching"):
        frozen: dict[SiteLike, HookFn] = {}
        for later in range(layer, d.n_layers):
            heads = [[h for sl, h in sets[i] if sl == later] for i in members]
            name = z_sites[later].name
            frozen[z_sites[later]] = _frozen_with_senders(base.cache[name], source.cache[name], heads)
            if freeze_mlps:
                frozen[mlp_sites[later]] = _replace(base.cache[mlp_sites[later].name])
        resid = base.resid_pre[layer][:, first:].repeat(len(members), 1, 1)
        last_sender = max(sl for i in members for sl, _ in sets[i])

        def forward(
            keep: list[int],
            layer: int = layer,
            resid: Tensor = resid,
            frozen: dict[SiteLike, HookFn] = frozen,
            last_sender: int = last_sender,
        ) -> Tensor:
            if direct:
                return _direct_pass(model, base, resid, layer, last_sender, frozen, first, keep)
            if parsed is None:
                return run_from(model, base, resid, layer=layer, start_pos=first, logit_positions=keep, hooks=frozen)
            return _receiver_pass(model, base, resid, layer, frozen, parsed, keep)

        flat[members] = scorer.chunk(forward, len(members), first).mean(-1).to(flat.device)
    if senders is None:
        axes: tuple[str, ...] = ("layer", "head")
        out = flat.reshape(d.n_layers, d.n_heads)
        labels = {"layer": [str(i) for i in range(d.n_layers)], "head": [f"H{h}" for h in range(d.n_heads)]}
    else:
        out, axes = flat, ("sender",)
        labels = {"sender": ["+".join(f"L{layer}H{head}" for layer, head in group) for group in sets]}
    clean_value, corrupt_value = (
        (values["base"], values["source"]) if direction == "noising" else (values["source"], values["base"])
    )
    return PathPatchResult(
        tensors={"metric": out, "clean": clean_value, "corrupt": corrupt_value},
        axes={"metric": axes, "clean": (), "corrupt": ()},
        labels=labels,
        config={
            "receivers": "logits" if parsed is None else [[r.layer, r.head, r.input] for r in parsed],
            "senders": None if senders is None else [[list(h) for h in group] for group in sets],
            "direction": direction,
            "freeze_mlps": freeze_mlps,
            "model_type": d.model_type,
        },
    )


def _direct_pass(
    model: HookedModel,
    base: BaseRun,
    resid: Float[Tensor, "rows new_pos d_model"],
    layer: int,
    last_sender: int,
    frozen: dict[SiteLike, HookFn],
    start: int,
    keep: list[int],
) -> Tensor:
    """The senders' paths to the logits when every other head and every MLP is frozen.

    Layers after the last sender add exactly what they add in the base run, so only the senders'
    layers run (positions ``start..``); their change to the residual stream is carried to the final
    norm's input. Ends by calling the unembedding on the final-normed residual at `keep`, where the
    scorer takes it (its input is what the scorer projects; see :class:`Scorer`)."""
    got: list[Tensor] = []

    def grab(activation: Tensor, _ctx: HookContext) -> None:
        got.append(activation)
        raise _Stop

    hooks: dict[SiteLike, list[HookFn]] = {}
    for site, fn in frozen.items():
        if (model.site(site).layer or 0) <= last_sender:  # later layers never run
            hooks[site] = [fn]
    hooks.setdefault(Site("hook_resid_post", last_sender), []).append(grab)
    with contextlib.suppress(_Stop):
        run_from(model, base, resid, layer=layer, start_pos=start, logit_positions=keep, hooks=hooks)
    cols = [p - start for p in keep]
    repeats = resid.shape[0] // base.batch
    final = got[0][:, cols]
    last = model.dims.n_layers - 1
    if last_sender < last:  # what the frozen later layers add in the base run
        added = base.cache[Site("hook_resid_post", last).name] - base.resid_pre[last_sender + 1]
        final = final + added[:, keep].repeat(repeats, 1, 1)
    normed = model.module(model.adapter.final_norm)(final)
    return model.module(model.adapter.unembed)(normed)  # type: ignore[no-any-return]


def _receiver_pass(
    model: HookedModel,
    base: BaseRun,
    resid: Tensor,
    layer: int,
    frozen: dict[SiteLike, HookFn],
    receivers: list[Receiver],
    read: list[int],
) -> Tensor:
    """Record the receivers' inputs in the frozen sender run, then patch them into a base run."""
    recorded: dict[Site, Tensor] = {}
    sites = sorted({r.site for r in receivers if r.layer > layer}, key=lambda s: s.order)
    if not sites:  # every receiver is at or before the sender's layer: no path
        return base.logits[:, read].repeat(resid.shape[0] // base.batch, 1, 1)
    last = max(s.layer for s in sites if s.layer is not None)

    def record(activation: Tensor, ctx: HookContext) -> None:
        recorded[ctx.site] = activation.detach()
        if ctx.site.layer == last and all(s in recorded for s in sites):
            raise _Stop

    hooks: dict[SiteLike, list[HookFn]] = {site: [fn] for site, fn in frozen.items()}
    for site in sites:
        hooks.setdefault(site, []).append(record)
    with contextlib.suppress(_Stop):
        run_from(model, base, resid, layer=layer, logit_positions=read, hooks=hooks)
    first = min(s.layer for s in sites if s.layer is not None)
    patch: dict[SiteLike, HookFn] = {}
    for site in sites:
        heads = sorted({r.head for r in receivers if r.site == site})
        patch[site] = _receiver_hook(recorded[site], heads)
    start = base.resid_pre[first].repeat(resid.shape[0] // base.batch, 1, 1)
    return run_from(model, base, start, layer=first, logit_positions=read, hooks=patch)


__all__ = ["RECEIVER_INPUTS", "PathPatchResult", "Receiver", "path_patch"]
