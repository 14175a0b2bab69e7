"""Partial forward passes: run an HF causal LM from a given layer and position, reusing a base run.

A patch at layer ``L`` and position ``p`` cannot change layers before ``L`` (they run earlier) nor
positions before ``p`` (attention is causal). So a patched run only has to compute layers ``L..end`` at
positions ``p..end``: it starts from the base run's residual stream at layer ``L`` and reads the base
run's keys and values for positions ``< p`` from a KV cache. Only the logits the caller asks for are
projected onto the vocabulary.

Nothing is re-implemented: the HF model's own ``forward`` runs (rotary and position embeddings, masks,
softcapping, sliding windows), with its decoder-layer list temporarily cut to ``L..end`` and the first
kept layer's input replaced by the cached residual. Hooks of enclosing ``model.hooks(...)`` blocks
still run on the kept layers, seeing activations of positions ``p..end`` only (keys and values include
the cached prefix, as HF's attention sees them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechscope.errors import ConfigError, ShapeError
from mechscope.model.hooks import HookContext, HookFn
from mechscope.model.kv_cache import cache_keyword
from mechscope.sites import Site, SiteLike

if TYPE_CHECKING:
    from mechscope.model.hooked import HookedModel, Inputs


@dataclass
class BaseRun:
    """What a partial run reuses from one full forward of `inputs`.

    Attributes:
        input_ids, attention_mask: the tokenised inputs ``[batch, pos]``.
        position_ids: the positions HF used ``[batch, pos]``.
        resid_pre: per layer, the residual stream entering it ``[batch, pos, d_model]``.
        keys, values: per layer, HF's cached attention keys/values ``[batch, n_kv_heads, pos, d_head]``.
        logits: the full logits ``[batch, pos, d_vocab]``.
        cache: activations of the extra sites requested, by canonical name.
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"]
    resid_pre: list[Float[Tensor, "batch pos d_model"]]
    keys: list[Tensor]
    values: list[Tensor]
    logits: Float[Tensor, "batch pos d_vocab"]
    cache: dict[str, Tensor]

    @property
    def batch(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.input_ids.shape[1])


def base_run(
    model: HookedModel,
    inputs: Inputs,
    sites: Sequence[SiteLike] = (),
    *,
    hooks: Mapping[SiteLike, HookFn] | None = None,
) -> BaseRun:
    """One full forward of `inputs` keeping every layer's residual input, the KV cache and `sites`.

    `hooks` edit the run (noise on the embeddings, say); partial runs from it inherit their effect,
    since they start after the embeddings from its cached residuals and keys/values."""
    from transformers import DynamicCache

    batch = model.prepare_inputs(inputs)
    n_layers = model.dims.n_layers
    resid: dict[int, Tensor] = {}
    store: dict[str, Tensor] = {}

    def keep_resid(layer: int) -> HookFn:
        def fn(activation: Tensor, _ctx: HookContext) -> None:
            resid[layer] = activation.detach()

        return fn

    def keep(activation: Tensor, ctx: HookContext) -> None:
        store[ctx.name] = activation.detach()

    extra = hooks
    keepers: dict[SiteLike, list[HookFn]] = {Site("hook_resid_pre", i): [keep_resid(i)] for i in range(n_layers)}
    for site in sites:
        keepers.setdefault(model.site(site), []).append(keep)
    cache = DynamicCache()  # no config: full-length layers for every family, so prefixes can be cut
    with torch.no_grad(), model.hooks(dict(extra or {})), model.hooks(keepers), model.guard_float16():
        out = model.hf_model(**batch, use_cache=True, **{cache_keyword(model.hf_model): cache})
    layers: list[Any] = list(cache.layers)
    keys: list[Tensor] = [layer.keys for layer in layers]
    values: list[Tensor] = [layer.values for layer in layers]
    if len(keys) != n_layers:
        raise ShapeError(f"expected a KV cache with {n_layers} layers from the base run; got {len(keys)}")
    ids = batch["input_ids"]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    return BaseRun(
        input_ids=ids,
        attention_mask=batch["attention_mask"],
        position_ids=position_ids,
        resid_pre=[resid[i] for i in range(n_layers)],
        keys=keys,
        values=values,
        logits=out.logits.detach(),
        cache=store,
    )


def _parent_and_attr(model: HookedModel) -> tuple[nn.Module, str]:
    path = model.adapter.layers
    parent, _, attr = path.rpartition(".")
    return (model.module(parent) if parent else model.hf_model), attr


class _Stop(Exception):
    """Ends a partial run once the hidden state entering ``stop_layer`` is known."""


@contextmanager
def _layers_from(model: HookedModel, start: int, stop: int | None = None) -> Iterator[None]:
    """Temporarily cut the HF decoder-layer list (and per-layer config lists) to ``start..stop-1``."""
    parent, attr = _parent_and_attr(model)
    full = getattr(parent, attr)
    config = model.hf_model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None)
    setattr(parent, attr, nn.ModuleList(list(full)[start:stop]))
    if isinstance(layer_types, list) and len(layer_types) == model.dims.n_layers:
        config.layer_types = layer_types[start:stop]
    try:
        yield
    finally:
        setattr(parent, attr, full)
        if isinstance(layer_types, list):
            config.layer_types = layer_types


def _prefix_cache(run: BaseRun, start_pos: int, repeats: int, first_layer: int, stop_layer: int | None = None) -> Any:
    """The base run's keys/values of positions ``< start_pos``, repeated per variant. Layers before
    `first_layer` (and from `stop_layer` on) never run, so they hold zero-stride placeholders of the
    right length."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(run.keys, run.values)):
        k, v = k[:, :, :start_pos], v[:, :, :start_pos]
        if i < first_layer or (stop_layer is not None and i >= stop_layer):
            shape = (k.shape[0] * repeats, *k.shape[1:])
            k, v = k.new_zeros(()).expand(shape), v.new_zeros(()).expand(shape)
        elif repeats > 1:  # (one copy: the cache concatenates the new positions onto it anyway)
            k, v = k.repeat(repeats, 1, 1, 1), v.repeat(repeats, 1, 1, 1)
        cache.update(k[:, :, :0], v[:, :, :0], i)  # creates the layer, empty
        layer: Any = cache.layers[i]
        layer.keys, layer.values = k, v  # as they are: updating would copy them (placeholders included)
    return cache


def run_from(
    model: HookedModel,
    run: BaseRun,
    resid: Float[Tensor, "rows new_pos d_model"],
    *,
    layer: int,
    start_pos: int = 0,
    logit_positions: Sequence[int] | None = None,
    hooks: Mapping[SiteLike, HookFn | Sequence[HookFn]] | None = None,
    stop_layer: int | None = None,
) -> Float[Tensor, "rows kept d_vocab"] | Float[Tensor, "rows new_pos d_model"]:
    """Logits of the model run from `layer`'s input `resid` at positions ``start_pos..``.

    `resid` has ``rows = k * batch`` rows: ``k`` variants of the base batch, variant-major. Positions
    before `start_pos` come from the base run's KV cache. Returns logits at `logit_positions`
    (absolute indices ``>= start_pos``; default all of ``start_pos..end``), in that order.

    `resid` may cover fewer positions than ``start_pos..end`` only with `stop_layer`: then the
    layers ``layer..stop_layer-1`` run on those positions and the hidden state entering `stop_layer`
    ``[rows, new_pos, d_model]`` is returned (a patch inside one layer that reaches no later position
    of that layer needs no more).
    """
    n_layers, n_pos, batch = model.dims.n_layers, run.n_pos, run.batch
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer must be in 0..{n_layers - 1}; got {layer}")
    if not 0 <= start_pos < n_pos:
        raise ConfigError(f"start_pos must be in 0..{n_pos - 1}; got {start_pos}")
    if stop_layer is not None and not layer < stop_layer < n_layers:
        raise ConfigError(f"stop_layer must be in {layer + 1}..{n_layers - 1}; got {stop_layer}")
    new = n_pos - start_pos
    width_ok = resid.shape[1] == new or (stop_layer is not None and 0 < resid.shape[1] <= new)
    if resid.ndim != 3 or not width_ok or resid.shape[0] % batch or resid.shape[2] != model.dims.d_model:
        raise ShapeError(
            f"resid must be [k * batch, pos - start_pos, d_model] = [k * {batch}, {new}, {model.dims.d_model}]; "
            f"got {tuple(resid.shape)}"
        )
    end = start_pos + resid.shape[1]
    repeats = resid.shape[0] // batch
    keep = list(range(start_pos, n_pos)) if logit_positions is None else [int(p) for p in logit_positions]
    if any(not start_pos <= p < n_pos for p in keep) or not keep:
        raise ConfigError(f"logit_positions must be a non-empty subset of {start_pos}..{n_pos - 1}; got {keep}")
    relative = torch.tensor([p - start_pos for p in keep], device=resid.device)
    kwargs: dict[str, Any] = {
        "inputs_embeds": resid,
        "attention_mask": run.attention_mask[:, :end].repeat(repeats, 1),
        "position_ids": run.position_ids[:, start_pos:end].repeat(repeats, 1),
        "use_cache": start_pos > 0,
        "logits_to_keep": relative if stop_layer is None else 1,
    }
    if start_pos > 0:
        kwargs[cache_keyword(model.hf_model)] = _prefix_cache(run, start_pos, repeats, layer, stop_layer)
    captured: list[Tensor] = []

    def replace_input(_module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        if args:
            return (resid, *args[1:]), kw
        return args, {**kw, "hidden_states": resid}

    def stop(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output if isinstance(output, Tensor) else output[0])
        raise _Stop

    handles = [model.layer(layer).register_forward_pre_hook(replace_input, with_kwargs=True, prepend=True)]
    try:
        with (
            torch.no_grad(),
            model.hooks(hooks or {}),
            _layers_from(model, layer, stop_layer),
            model.guard_float16() as guard,  # inside the cut, so it watches the layers that run
        ):
            if stop_layer is not None:  # after the session's hooks, so it sees the patched output
                handles.append(model.layer(stop_layer - 1).register_forward_hook(stop))
            try:
                out = model.hf_model(**kwargs)
            except _Stop:
                if guard is not None and stop_layer is not None:  # what layer stop_layer would have received
                    guard.record(stop_layer, captured[0])
                return captured[0]
    finally:
        for handle in handles:
            handle.remove()
    return out.logits  # type: ignore[no-any-return]


__all__ = ["BaseRun", "base_run", "run_from"]
