"""HookedModel: an HF causal LM addressed by canonical site names, with HF's own numerics.

Nothing here re-implements a forward pass. Sites at module boundaries are torch hooks on HF's modules;
sites inside attention come from mechscope's registered attention function (see ``attention.py``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechscope import observe
from mechscope.errors import AdapterError, AttentionSiteError, ConfigError, SiteError, did_you_mean
from mechscope.model import attention as attention_fn
from mechscope.model import offload
from mechscope.model import tokens as tok
from mechscope.model.adapters import Adapter, adapter_for
from mechscope.model.cache import ActivationCache
from mechscope.model.dims import ModelDims, dims_from_config
from mechscope.model.hooks import HookContext, HookFn, HookSession
from mechscope.model.layout import ModelLayout
from mechscope.model.numerics import Float16Guard, float16_guard
from mechscope.model.weights import WeightViews
from mechscope.sites import (
    BLOCK_KINDS,
    GLOBAL_KINDS_AFTER,
    PATTERN_KINDS,
    Site,
    SiteLike,
    filter_sites,
    parse_sites,
)

Inputs = str | Sequence[str] | Tensor | Mapping[str, Tensor]


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


class ContextLengthWarning(UserWarning):
    """A prompt longer than the positions a rotary-position model was trained on."""


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early (``stop_at_layer``)."""


@dataclass
class GradientResult:
    """What :meth:`HookedModel.run_with_grads` returns."""

    loss: Tensor
    logits: Tensor
    activations: ActivationCache
    gradients: ActivationCache


#: Config entries that describe where/how a model was loaded, not what it computes.
_UNFINGERPRINTED_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset"}
)


class HookedModel(nn.Module):
    """Wrap an HF ``PreTrainedModel`` (causal LM) and its tokenizer.

    Args:
        hf_model: the causal LM. Its attention implementation is switched to mechscope's wrapper of
            the same base (``sdpa`` or ``eager``), which calls the base unchanged unless an attention
            site is hooked; pass ``attention_sites=False`` to leave it untouched (attention-internal
            sites then raise :class:`AttentionSiteError`).
        tokenizer: its tokenizer (needed for text inputs and token helpers).
    """

    def __init__(self, hf_model: Any, tokenizer: Any = None, *, attention_sites: bool = True) -> None:
        super().__init__()
        if not isinstance(hf_model, nn.Module) or getattr(hf_model, "config", None) is None:
            raise AdapterError(
                "expected a Hugging Face causal LM (a transformers PreTrainedModel such as "
                f"AutoModelForCausalLM.from_pretrained(...)); got {type(hf_model).__name__}"
            )
        self.hf_model: Any = hf_model
        self.tokenizer = tokenizer
        self.config: Any = hf_model.config
        self.adapter: Adapter = adapter_for(self.config)
        self.dims: ModelDims = dims_from_config(self.config, self.adapter)
        #: module lookups, weight views and head arithmetic; what hooks and weight views work from
        self.layout = ModelLayout(hf_model, self.adapter, self.dims)
        self.weights: WeightViews = self.layout.weights
        #: the hook sessions active now, outermost first (pushed and popped by :meth:`hooks` only)
        self._sessions: list[HookSession] = []
        a = self.adapter
        for path in (a.embed, a.layers, a.final_norm, a.unembed, a.pos_embed):
            if path is not None and not _has_submodule(hf_model, path):
                raise AdapterError(
                    f"{type(hf_model).__name__} has no module {path!r}, which the {a.family} adapter expects; "
                    "pass the causal LM with its language-model head (e.g. AutoModelForCausalLM), not the base model"
                )
        self.attention_base: str | None = self._install_attention() if attention_sites else None
        self._inventory = self._build_inventory()
        #: the float16 guard of the run in progress (see :meth:`guard_float16`), None outside one
        self._float16_guard: Float16Guard | None = None
        observe.notify(self)  # a run record (mechscope.records), when one is open, notes the model

    # Structure ----------------------------------------------------------------------------------------
    def _install_attention(self) -> str | None:
        """Switch to mechscope's attention wrapper when the model routes attention through the registry."""
        current = getattr(self.config, "_attn_implementation", None)
        if attention_fn.base_of(current):
            return attention_fn.base_of(current)
        if current not in attention_fn.BASE_IMPLEMENTATIONS or not getattr(
            self.hf_model, "_supports_attention_backend", False
        ):
            return None
        attention_fn.register()
        self.hf_model.set_attn_implementation(attention_fn.implementation_name(current))
        return current

    def module(self, path: str) -> Any:
        """The HF submodule at a dotted path (cached). Typed Any: HF modules carry dynamic attributes."""
        return self.layout.module(path)

    def layer(self, index: int) -> Any:
        return self.layout.layer(index)

    def layer_module(self, index: int, path: str) -> Any:
        return self.layout.layer_module(index, path)

    @property
    def hooks_active(self) -> bool:
        """Whether any hook or intervention block is active on this model."""
        return bool(self._sessions)

    def _build_inventory(self) -> list[Site]:
        a, d = self.adapter, self.dims
        skipped: set[str] = set()
        if a.ln1 is None:
            skipped.add("ln1.hook_normalized")
        if a.ln2 is None:
            skipped.add("ln2.hook_normalized")
        if d.parallel:
            skipped.add("hook_resid_mid")
        if not d.gated:
            skipped.add("mlp.hook_pre_linear")
        sites = [Site("hook_embed")]
        if a.pos_embed is not None:
            sites.append(Site("hook_pos_embed"))
        for layer in range(d.n_layers):
            sites.extend(Site(kind, layer) for kind in BLOCK_KINDS if kind not in skipped)
        sites.extend(Site(kind) for kind in GLOBAL_KINDS_AFTER)
        return sites

    @property
    def site_names(self) -> list[str]:
        """Every canonical site of this model, in forward order."""
        return [s.name for s in self._inventory]

    def sites(self, kinds: Sequence[str] | str | None = None, layers: Iterable[int] | None = None) -> list[Site]:
        """The model's sites, filtered by kind (``"hook_resid_post"``) and/or layers."""
        return filter_sites(self._inventory, kinds=kinds, layers=layers)

    def site(self, name: SiteLike) -> Site:
        """Validate one site against this model; :class:`SiteError` with close names otherwise."""
        site = Site.parse(name)
        if site not in self._inventory_set:
            if site.layer is not None and site.layer >= self.dims.n_layers:
                raise SiteError(
                    f"site {site.name!r} is past the last layer; this model has layers 0..{self.dims.n_layers - 1}"
                )
            raise SiteError(
                f"this {self.dims.family} model has no site {site.name!r}.{did_you_mean(site.name, self.site_names)}"
            )
        if site.is_attention_internal and self.attention_base is None:
            raise AttentionSiteError(
                f"site {site.name!r} is computed inside attention, which mechscope can only expose through its "
                f"attention function; this model runs attention with "
                f"{getattr(self.config, '_attn_implementation', None)!r}. Load it with "
                "attn_implementation='sdpa' or 'eager' and attention_sites=True."
            )
        return site

    @property
    def _inventory_set(self) -> frozenset[Site]:
        cached = self.__dict__.get("_inventory_frozen")
        if cached is None:
            cached = frozenset(self._inventory)
            self.__dict__["_inventory_frozen"] = cached
        return cached

    @property
    def device(self) -> torch.device:
        """Where inputs go (the embedding's execution device when accelerate offloaded it)."""
        return offload.input_device(self.hf_model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    def fingerprint(self, dtype: torch.dtype | None = None) -> str:
        """A short hash of the config and weights, recorded with artifacts made on this model.

        Where the model was loaded from and with which attention backend does not enter: the same weights
        give the same fingerprint from any folder (so caches and artifacts carry over). The dtype does: the
        same checkpoint in fp32 and bf16 holds other (rounded) weights; the config's ``dtype`` is read as the
        weights' (an in-memory ``.to(dtype)`` does not update the config). With `dtype`, the fingerprint this
        model would have cast to it (exact for a cast to a narrower dtype, as loading with ``dtype=`` does).
        """
        config = {k: v for k, v in self.config.to_dict().items() if k not in _UNFINGERPRINTED_CONFIG_KEYS}
        if config.get("dtype") is not None:
            config["dtype"] = str(dtype or self.dtype).removeprefix("torch.")
        h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        for name, param in offload.state_items(self.hf_model):  # offloaded weights read from their store
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64]
            sample = (sample if dtype is None or not sample.is_floating_point() else sample.to(dtype)).float().cpu()
            h.update(name.encode())
            h.update(str(tuple(param.shape)).encode())
            h.update(sample.numpy().tobytes())
        return h.hexdigest()[:16]

    # Derived activations --------------------------------------------------------------------------------
    def head_results(
        self,
        z: Float[Tensor, "batch pos n_heads_x_d_head"] | Float[Tensor, "batch pos n_heads d_head"],
        layer: int,
    ) -> Float[Tensor, "batch pos n_heads d_model"]:
        """Per-head attention outputs in d_model: ``z[h] @ W_O[h]`` (bias not included)."""
        return self.layout.head_results(z, layer)

    # Inputs ---------------------------------------------------------------------------------------------
    def to_tokens(
        self, text: str | Sequence[str], *, padding_side: str | None = None, add_special_tokens: bool = True
    ) -> dict[str, Tensor]:
        """``{"input_ids", "attention_mask"}`` for one text or a batch (see :mod:`mechscope.model.tokens`)."""
        return tok.to_tokens(self._tokenizer(), text, padding_side=padding_side, add_special_tokens=add_special_tokens)

    def to_str_tokens(self, tokens: str | Tensor | Sequence[int], *, add_special_tokens: bool = True) -> list[str]:
        return tok.to_str_tokens(self._tokenizer(), tokens, add_special_tokens=add_special_tokens)

    def to_string(self, tokens: Tensor | Sequence[int]) -> str:
        ids = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        bad = [i for i in ids if not hasattr(i, "__index__") or not 0 <= int(i) < self.dims.d_vocab]
        if bad:
            raise ConfigError(f"token ids must be integers in [0, {self.dims.d_vocab}); got {bad[:5]}")
        return str(self._tokenizer().decode(ids))

    def to_single_token(self, text: str) -> int:
        return tok.to_single_token(self._tokenizer(), text)

    def find_positions(self, text: str, substring: str, *, occurrence: int = 0) -> list[int]:
        return tok.find_positions(self._tokenizer(), text, substring, occurrence=occurrence)

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ConfigError("this HookedModel has no tokenizer; pass tokenizer= to load_model or use token ids")
        return self.tokenizer

    def prepare_inputs(self, inputs: Inputs) -> dict[str, Tensor]:
        """Normalise text, token ids or an HF encoding to model kwargs on the model's device."""
        if isinstance(inputs, (str, list, tuple)):
            batch = self.to_tokens(inputs)  # type: ignore[arg-type]
        elif isinstance(inputs, Tensor):
            ids = tok.as_batch(inputs)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        elif isinstance(inputs, Mapping):
            if "input_ids" not in inputs:
                raise ConfigError(f"an input mapping needs 'input_ids'; got keys {sorted(inputs)}")
            ids = tok.as_batch(inputs["input_ids"])
            mask = inputs.get("attention_mask")
            batch = {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids) if mask is None else tok.as_batch(mask),
            }
        else:
            raise ConfigError(
                f"inputs must be text, a list of texts, token ids [batch, pos] or a mapping with input_ids; "
                f"got {type(inputs).__name__}"
            )
        if batch["attention_mask"].shape != batch["input_ids"].shape:
            raise ConfigError(
                f"attention_mask shape {tuple(batch['attention_mask'].shape)} != input_ids shape "
                f"{tuple(batch['input_ids'].shape)}"
            )
        self._check_lengths(batch["input_ids"], batch["attention_mask"])
        lo, hi = int(batch["input_ids"].min()), int(batch["input_ids"].max())
        if hi >= self.dims.d_vocab or lo < 0:
            raise ConfigError(f"token ids must lie in [0, {self.dims.d_vocab}); got values from {lo} to {hi}")
        out = {k: v.to(self.device) for k, v in batch.items()}
        position_ids = tok.position_ids_from_mask(out["attention_mask"])
        if position_ids is None and self.adapter.pos_embed is not None:
            # HF would embed positions [1, pos] and broadcast; hook_pos_embed is [batch, pos, d_model].
            ids = out["input_ids"]
            position_ids = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        if position_ids is not None:
            out["position_ids"] = position_ids
        return out

    def _check_lengths(self, ids: Tensor, mask: Tensor) -> None:
        """Refuse empty prompts and prompts past a learned position table; warn past a rotary model's
        trained length (it runs, but outside what the model was trained on)."""
        if ids.numel() == 0 or ids.shape[-1] == 0:
            raise ConfigError(f"expected at least one token per prompt; got an empty batch of shape {tuple(ids.shape)}")
        empty = (mask.reshape(mask.shape[0], -1).sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ConfigError(f"prompts {empty} have no tokens (empty text?); every prompt needs at least one token")
        n_pos, n_ctx = int(ids.shape[-1]), self.dims.n_ctx
        if n_ctx <= 0 or n_pos <= n_ctx:
            return
        if self.adapter.pos_embed is not None:
            raise ConfigError(
                f"a prompt of {n_pos} tokens is longer than this model's context of {n_ctx} positions "
                "(its learned position embeddings stop there); shorten or split the prompt"
            )
        warnings.warn(
            f"a prompt of {n_pos} tokens runs past the {n_ctx} positions this {self.dims.family} model was trained "
            "on; its rotary positions extrapolate and results may not mean what they do inside the context",
            ContextLengthWarning,
            stacklevel=3,
        )

    def _check_new_tokens(self, n_prompt: int, max_new_tokens: Any) -> None:
        """``max_new_tokens`` is a positive integer and, with learned positions, prompt + new tokens fit the context."""
        if max_new_tokens is None:
            return
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
        n_ctx = self.dims.n_ctx
        if self.adapter.pos_embed is not None and 0 < n_ctx < n_prompt + max_new_tokens:
            raise ConfigError(
                f"a prompt of {n_prompt} tokens plus max_new_tokens={max_new_tokens} runs past this model's context "
                f"of {n_ctx} positions (learned position embeddings); ask for at most {max(0, n_ctx - n_prompt)} "
                "new tokens or shorten the prompt"
            )

    # Running ------------------------------------------------------------------------------------------
    def forward(self, inputs: Inputs, *, return_output: bool = False, **hf_kwargs: Any) -> Any:
        """Run the HF model. Returns logits [batch, pos, d_vocab], or HF's output with return_output."""
        kwargs = {**self.prepare_inputs(inputs), "use_cache": False, **hf_kwargs}
        with self.guard_float16():
            output = self.hf_model(**kwargs)
        return output if return_output else output.logits

    @contextmanager
    def guard_float16(self) -> Iterator[Float16Guard | None]:
        """Raise :class:`~mechscope.errors.NumericsError` when a float16 run inside the block overflows.

        A float16 residual stream past 65504 becomes inf and every logit after it NaN (Gemma-3-270M's does,
        after layer 7); this names where instead of returning NaN. Every run through mechscope is guarded;
        wrap direct ``hf_model`` calls to guard them too. Nested blocks share the outermost guard; models in
        other dtypes attach nothing and yield None.
        """
        if self._float16_guard is not None or self.dtype != torch.float16:
            yield self._float16_guard
            return
        layers = [self.layer(i) for i in range(self.dims.n_layers)]
        with float16_guard(layers, self.module(self.adapter.final_norm)) as guard:
            self._float16_guard = guard
            try:
                yield guard
            finally:
                self._float16_guard = None

    @contextmanager
    def hooks(self, hooks: Mapping[SiteLike, HookFn | Sequence[HookFn]]) -> Iterator[HookSession]:
        """Attach ``{site: fn}`` for the block; fns run in order, sessions nest (outer first)."""
        if not isinstance(hooks, Mapping):
            raise ConfigError(f"hooks must be a mapping {{site: fn}}; got {type(hooks).__name__}")
        plan: dict[Site, list[HookFn]] = {}
        for key, fns in hooks.items():
            site = self.site(key)
            fn_list = list(fns) if isinstance(fns, (list, tuple)) else [fns]
            for fn in fn_list:
                if not callable(fn):
                    raise ConfigError(
                        f"hook for {site.name} must be callable(activation, ctx); got {type(fn).__name__}"
                    )
            plan.setdefault(site, []).extend(fn_list)  # type: ignore[arg-type]
        with HookSession(self.layout, plan, self) as session:
            self._sessions.append(session)
            try:
                yield session
            finally:
                self._sessions.remove(session)

    def run_with_cache(
        self,
        inputs: Inputs,
        sites: SiteLike | Iterable[SiteLike] | None = None,
        *,
        positions: Sequence[int] | None = None,
        device: str | torch.device | None = None,
        stop_at_layer: int | None = None,
        **hf_kwargs: Any,
    ) -> tuple[Tensor | None, ActivationCache]:
        """Run and cache activations of `sites` (default: every site) at `positions` (default: all).

        Returns (logits or None when stopped early, cache). Cached tensors are detached; with
        `positions`, the position axis keeps only those (negative indices count from the end).
        """
        chosen = self._inventory if sites is None else [self.site(s) for s in parse_sites(sites)]
        store: dict[str, Tensor] = {}
        lazy: dict[str, Any] = {}
        pos_index = None if positions is None else list(positions)
        if pos_index is not None and not all(isinstance(p, int) and not isinstance(p, bool) for p in pos_index):
            raise ConfigError(f"positions must be integer indices; got {pos_index!r}")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as exc:
                raise ConfigError(f"device must be a torch device such as 'cpu' or 'cuda:0'; got {device!r}") from exc
        hooks: dict[SiteLike, HookFn] = {}

        def keep(activation: Tensor, site: Site) -> Tensor:
            out = activation.detach()
            if pos_index is not None:
                n_pos = out.shape[site.pos_axis]
                bad = [p for p in pos_index if not -n_pos <= p < n_pos]
                if bad:
                    raise ConfigError(
                        f"positions {bad} are out of range for {site.name} with {n_pos} positions; "
                        f"expected indices in [{-n_pos}, {n_pos})"
                    )
                out = out.index_select(
                    site.pos_axis, torch.tensor(pos_index, device=out.device) % out.shape[site.pos_axis]
                )
            return out.to(device) if device is not None else out

        def saver(site: Site) -> HookFn:
            def save(activation: Tensor, _ctx: HookContext) -> None:
                store[site.name] = keep(activation, site)

            return save

        for site in chosen:
            if stop_at_layer is not None and (site.layer is None or site.layer >= stop_at_layer) and site.order[0] >= 0:
                raise ConfigError(f"site {site.name} is not computed before stop_at_layer={stop_at_layer}")
            # Lazily from hook_z when attention exposes it (cheaper); else from the output projection.
            lazy_ok = self.attention_base is not None and not self._result_is_hooked(site)
            if site.kind == "attn.hook_result" and lazy_ok:
                z_site = Site("attn.hook_z", site.layer)
                hooks.setdefault(z_site, saver(z_site))
                layer = site.layer
                assert layer is not None
                lazy[site.name] = (z_site.name, layer)
            else:
                hooks[site] = saver(site)
        requested = {s.name for s in chosen}
        logits: Tensor | None = None
        with torch.no_grad(), self.hooks(hooks):
            if stop_at_layer is not None:
                self._run_until(inputs, stop_at_layer, **hf_kwargs)
            else:
                logits = self.forward(inputs, **hf_kwargs)
        lazy_fns = {name: self._lazy_result(store, z_name, layer) for name, (z_name, layer) in lazy.items()}
        tensors = {k: v for k, v in store.items() if k in requested}
        meta = {"model_type": self.dims.model_type, "fingerprint": None}
        return logits, ActivationCache(tensors, lazy=lazy_fns, positions=pos_index, meta=meta)

    def _lazy_result(self, store: dict[str, Tensor], z_name: str, layer: int) -> Any:
        """Per-head results computed on first access from the cached z and the W_O of *this* run (copied
        now: a weight edit between caching and reading must not change what the cache says)."""
        z = store[z_name]
        w_o = self.weights.W_O_layer(layer).clone()
        return lambda: self.layout.head_results(z, layer, W_O=w_o).detach()

    def _result_is_hooked(self, site: Site) -> bool:
        return any(site in session.hooks for session in self._sessions)

    def _run_until(self, inputs: Inputs, stop_at_layer: int, **hf_kwargs: Any) -> None:
        if not 0 <= stop_at_layer <= self.dims.n_layers:
            raise ConfigError(f"stop_at_layer must be in 0..{self.dims.n_layers}; got {stop_at_layer}")
        if stop_at_layer == self.dims.n_layers:
            self.forward(inputs, **hf_kwargs)
            return None

        def stop(_module: nn.Module, _args: Any) -> None:
            raise _StopForward

        with self.guard_float16():  # opened first, so it sees the residual the stop discards
            handle = self.layer(stop_at_layer).register_forward_pre_hook(stop)
            try:
                self.forward(inputs, **hf_kwargs)
            except _StopForward:
                pass
            finally:
                handle.remove()
        return None

    def run_with_grads(
        self,
        inputs: Inputs,
        loss_fn: Any,
        sites: SiteLike | Iterable[SiteLike],
    ) -> GradientResult:
        """Forward, ``loss = loss_fn(logits)`` (a scalar), backward; activations and d loss / d site.

        Parameters do not need ``requires_grad``: the embedding output becomes the graph's leaf, so
        values are exactly those of a normal forward and no parameter gradients are accumulated.
        """
        chosen = [self.site(s) for s in parse_sites(sites)]
        acts: dict[str, Tensor] = {}
        grads: dict[str, Tensor] = {}

        leaves: list[Tensor] = []

        def leaf(activation: Tensor, _ctx: HookContext) -> Tensor | None:
            new = activation.detach().requires_grad_(True)
            leaves.append(new)
            return new

        def capture(site: Site) -> HookFn:
            def fn(activation: Tensor, _ctx: HookContext) -> None:
                acts[site.name] = activation.detach()
                if activation.requires_grad:
                    activation.register_hook(lambda g: grads.__setitem__(site.name, g.detach()))

            return fn

        hooks: dict[SiteLike, list[HookFn]] = {Site("hook_embed"): [leaf]}
        if self.adapter.pos_embed is not None:
            hooks[Site("hook_pos_embed")] = [leaf]
        for site in chosen:
            hooks.setdefault(site, []).append(capture(site))
        with torch.enable_grad(), self.hooks(hooks):
            logits = self.forward(inputs)
            loss = loss_fn(logits)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ConfigError(
                    f"loss_fn must return a scalar tensor; got {type(loss).__name__} "
                    f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}"
                )
            loss.backward(inputs=leaves)  # gradients stop at the embeddings: no parameter .grad
        missing = [s.name for s in chosen if s.name not in grads]
        for name in missing:  # sites the loss does not depend on get zero gradients
            grads[name] = torch.zeros_like(acts[name])
        return GradientResult(loss.detach(), logits.detach(), ActivationCache(acts), ActivationCache(grads))

    def generate(self, inputs: Inputs, **generate_kwargs: Any) -> Int[Tensor, "batch pos"]:
        """HF ``generate`` (hooks of enclosing ``with model.hooks(...)`` blocks run at every step).

        Text batches are left-padded, as generation requires. Positions seen by hooks are those of
        each forward call: the prompt first, then one new token per step (with the KV cache).
        """
        if isinstance(inputs, (str, list, tuple)):
            batch = self.to_tokens(inputs, padding_side="left")  # type: ignore[arg-type]
            self._check_lengths(batch["input_ids"], batch["attention_mask"])
            batch = {k: v.to(self.device) for k, v in batch.items()}
        else:
            batch = self.prepare_inputs(inputs)
            batch.pop("position_ids", None)
        self._check_new_tokens(int(batch["input_ids"].shape[-1]), generate_kwargs.get("max_new_tokens"))
        if self.tokenizer is not None and "pad_token_id" not in generate_kwargs:
            tok.ensure_pad_token(self.tokenizer)
            generate_kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        generate: Any = self.hf_model.generate
        with self.guard_float16():
            return generate(**batch, **generate_kwargs)  # type: ignore[no-any-return]

    def generate_text(self, prompt: str | Sequence[str], max_new_tokens: int = 20, **kwargs: Any) -> list[str]:
        """Generate and decode only the new tokens of each prompt."""
        out = self.generate(prompt, max_new_tokens=max_new_tokens, **kwargs)
        n_prompt = self.to_tokens(prompt, padding_side="left")["input_ids"].shape[1]
        return [self._tokenizer().decode(row[n_prompt:], skip_special_tokens=True) for row in out]

    def pattern_available(self) -> bool:
        """Whether attention-internal sites (and so ``PATTERN_KINDS``) can be hooked."""
        return self.attention_base is not None

    def __repr__(self) -> str:
        d = self.dims
        return (
            f"HookedModel({d.family}: {d.n_layers} layers, d_model={d.d_model}, heads={d.n_heads}/{d.n_kv_heads} "
            f"(q/kv), d_head={d.d_head}, d_mlp={d.d_mlp}, d_vocab={d.d_vocab}, attention={self.attention_base})"
        )


__all__ = ["PATTERN_KINDS", "GradientResult", "HookedModel", "Inputs"]
